"""What ``vrn-bench`` measures: its settings, and the configurations (backend x device x
precision) this machine can run, each ruled-out one with the reason.

Whether bf16 is offered on the CPU follows the CPU feature probe
(:func:`vrn.runtime.cpu.cpu_info`): PyTorch's bf16 autocast is fast only where the CPU
has native bf16 (AVX-512 BF16, AMX, Arm BF16).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..metrics import OCCUPANCY_LEVEL

BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8-dynamic", "int8-static")
PRECISION_ALIASES = {"int8": ("int8-dynamic", "int8-static")}
DEVICES = ("cpu", "cuda")
MODELS = ("default", "full")
REFERENCE_PRECISION = "fp32"


@dataclass(frozen=True)
class Combo:
    """One inference configuration."""

    backend: str
    device: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend} {self.device} {self.precision}"

    @property
    def is_reference(self) -> bool:
        """PyTorch eager fp32, the reference of its device."""
        return self.backend == "torch" and self.precision == REFERENCE_PRECISION

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BenchSettings:
    """What to measure (see ``vrn-bench --help``)."""

    backends: tuple[str, ...] = BACKENDS
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
    batches: tuple[int, ...] = (1,)
    frames: int = 20
    warmup: int = 3
    source: str | os.PathLike | None = None  # image or video; None: the sample photo
    model: str = "default"                   # "default" or "full" (ignored with weights)
    weights: str | os.PathLike | None = None
    level: float = OCCUPANCY_LEVEL           # isosurface and IoU threshold
    validate_with: tuple[str, ...] = ()      # extra photos/folders for the IoU check
    isosurface_runs: int = 10                # most runs per isosurface reference
    isosurface_budget_s: float = 3.0         # ... or until this much time is spent
    cache_dir: str | os.PathLike | None = None
    progress: bool = True

    def __post_init__(self):
        self.backends = tuple(self.backends)
        self.batches = tuple(int(b) for b in self.batches)
        expanded = []
        for p in self.precisions:
            for q in PRECISION_ALIASES.get(p, (p,)):
                if q not in expanded:
                    expanded.append(q)
        self.precisions = tuple(expanded)
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise ValueError(f"unknown precision(s) {unknown}; choose from "
                             f"{', '.join(PRECISIONS)} (int8 means both int8 recipes)")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batches)}")
        if self.frames < 1 or self.warmup < 0:
            raise ValueError(f"need frames >= 1 and warmup >= 0, got {self.frames}, "
                             f"{self.warmup}")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")


def plan(settings: BenchSettings, *, cuda: bool, cpu_bf16: bool | None = None,
         tensorrt: str | None) -> tuple[list[Combo], list[dict]]:
    """Configurations worth building, and those ruled out up front with the reason.

    ``cuda``: a CUDA GPU is usable (torch or numba-cuda); ``cpu_bf16``: the CPU has
    native bf16 (default: the CPU feature probe says so); ``tensorrt``: why TensorRT
    cannot be used, or ``None`` when it can. The torch fp32 reference of each device
    comes first, whatever was asked for.
    """
    if cpu_bf16 is None:
        from ..runtime.cpu import cpu_info

        cpu_bf16 = cpu_info().bf16
    devices = ["cpu"] + (["cuda"] if cuda else [])
    combos: list[Combo] = [Combo("torch", d, REFERENCE_PRECISION) for d in devices]
    unavailable: list[dict] = []
    for backend in settings.backends:
        for device in DEVICES:
            for precision in settings.precisions:
                combo = Combo(backend, device, precision)
                if combo in combos:
                    continue
                reason = _static_reason(combo, cuda=cuda, cpu_bf16=cpu_bf16,
                                        tensorrt=tensorrt)
                if reason is None:
                    combos.append(combo)
                elif reason != "":
                    unavailable.append({**combo.as_dict(), "reason": reason})
    return combos, unavailable


def _static_reason(combo: Combo, *, cuda: bool, cpu_bf16: bool, tensorrt: str | None
                   ) -> str | None:
    """Why ``combo`` cannot run here (``""``: not a meaningful combination, not
    listed), or ``None`` when it is worth trying."""
    backend, device, precision = combo.backend, combo.device, combo.precision
    if backend == "tensorrt" and device == "cpu":
        return ""
    if precision.startswith("int8") and not (backend == "onnxruntime" and device == "cpu"):
        return ""  # int8 here means ONNX Runtime's CPU quantisation recipes
    if backend in ("onnxruntime", "tensorrt") and precision == "bf16":
        return ""
    if device == "cuda" and not cuda:
        return "no CUDA GPU found (neither torch nor numba-cuda sees one)"
    if backend == "tensorrt" and tensorrt is not None:
        return tensorrt
    if backend == "torch" and device == "cpu" and precision == "fp16":
        return "fp16 on the CPU: PyTorch has no fast fp16 CPU kernels (use bf16 or int8)"
    if backend == "torch" and device == "cpu" and precision == "bf16" and not cpu_bf16:
        return ("bf16 on the CPU: no native bf16 in this CPU (its flags lack "
                "avx512_bf16/amx_bf16); autocast would emulate it slowly")
    if backend == "onnxruntime" and device == "cpu" and precision == "fp16":
        return "fp16 on the ONNX Runtime CPU provider: no fast fp16 kernels (use int8)"
    return None


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT Python package cannot be used, or ``None``."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT not installed (the tensorrt Python package is missing)"
    except Exception as exc:
        return f"TensorRT cannot be imported: {exc}"
    return None
