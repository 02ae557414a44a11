"""What this CPU offers: its model, physical core count, and the instruction-set
features that decide which reduced-precision paths are fast (AVX-512 F, VNNI and BF16,
AMX; Arm's BF16 and I8MM).

Read from ``/proc/cpuinfo`` (Linux, x86 and Arm). Elsewhere, or when it is unreadable,
the features are all absent, the model is :func:`platform.processor`'s and the core
count is :func:`os.cpu_count`'s: a probe that cannot tell never claims a feature.
Nothing here runs a command or imports more than the standard library.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

CPUINFO = "/proc/cpuinfo"

# Flags worth reporting, as /proc/cpuinfo spells them (x86, then Arm).
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
            "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimdhp", "bf16", "i8mm")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # native bf16 arithmetic: x86, Arm


@dataclass(frozen=True)
class CpuInfo:
    """One CPU probe.

    Attributes
    ----------
    model : str or None
        Model name (``"model name"``, or Arm's ``"Hardware"``/``"CPU model"``).
    flags : frozenset of str
        Every flag the kernel lists (``flags`` on x86, ``Features`` on Arm).
    physical_cores : int or None
        Distinct ``(physical id, core id)`` pairs (hyper-threads not counted); ``None``
        when the text does not say.
    """

    model: str | None
    flags: frozenset
    physical_cores: int | None

    @property
    def avx512f(self) -> bool:
        return "avx512f" in self.flags

    @property
    def vnni(self) -> bool:
        """int8 dot products: AVX-512 VNNI or AVX-VNNI."""
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags

    @property
    def avx512_bf16(self) -> bool:
        return "avx512_bf16" in self.flags

    @property
    def amx(self) -> bool:
        """Intel AMX tiles (with ``amx_bf16``/``amx_int8`` for the arithmetic)."""
        return "amx_tile" in self.flags

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic (:data:`BF16_FLAGS`): bf16 autocast is fast here."""
        return any(f in self.flags for f in BF16_FLAGS)

    @property
    def features(self) -> list[str]:
        """The flags of :data:`FEATURES` present, sorted."""
        return sorted(f for f in FEATURES if f in self.flags)


def parse_cpuinfo(text: str) -> CpuInfo:
    """A :class:`CpuInfo` from the text of ``/proc/cpuinfo`` (the first processor's
    model and flags; cores counted over all processors)."""
    model, flags, cores, physical_id = None, None, set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("model name", "hardware", "cpu model") and model is None and value:
            model = value
        elif key in ("flags", "features") and flags is None:
            flags = frozenset(value.split())
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            cores.add((physical_id, value))
    return CpuInfo(model=model, flags=flags or frozenset(), physical_cores=len(cores) or None)


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (read once per process)."""
    try:
        info = parse_cpuinfo(Path(CPUINFO).read_text(errors="replace"))
    except OSError:  # not Linux, or no /proc
        info = CpuInfo(model=None, flags=frozenset(), physical_cores=None)
    if info.model is None:
        info = CpuInfo(platform.processor() or platform.machine() or None, info.flags,
                       info.physical_cores)
    return info


def affinity_cores() -> int | None:
    """Logical cores this process may run on, where the OS says."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def physical_cores() -> int:
    """Physical cores this process may use: the machine's physical cores, capped by
    the cores it may run on; at least 1 (thread pools are sized with it)."""
    cores = cpu_info().physical_cores or os.cpu_count() or 1
    allowed = affinity_cores()
    return max(1, min(cores, allowed) if allowed else cores)
