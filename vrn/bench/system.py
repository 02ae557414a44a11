"""The system block of a benchmark report: what machine, which libraries, how loaded.

Everything here reads the machine without changing it; anything unreadable is ``None``.
Heavy or optional libraries (TensorRT, ONNX Runtime, torch) are imported only here,
inside functions.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..runtime import cpu
from ..runtime.backends import onnxruntime_providers

LIBRARIES = ("numpy", "torch", "onnxruntime", "onnx", "tensorrt", "numba", "cv2",
             "skimage", "mcubes", "vtk")


def _run(command: list[str], timeout: float = 10.0) -> str | None:
    """stdout of ``command``, or ``None`` when it is missing, fails or hangs."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def cpu_info() -> dict:
    """CPU model, logical and physical core counts and the instruction-set features
    that matter (:data:`vrn.runtime.cpu.FEATURES`; ``bf16``, ``avx512``, ``vnni`` and
    ``amx`` as booleans), from the runtime's probe (:func:`vrn.runtime.cpu.cpu_info`);
    ``lscpu``, where present, adds the vendor family and may name the model better."""
    probe = cpu.cpu_info()
    fields = {}
    for line in (_run(["lscpu"]) or "").splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    model = probe.model
    if fields.get("Model name") and (model is None or len(fields["Model name"]) > len(model)):
        model = fields["Model name"]
    family = fields.get("CPU family")
    return {
        "model": model or platform.processor() or platform.machine(),
        "family": f"{fields.get('Vendor ID', '')} family {family} model "
                  f"{fields.get('Model', '?')}".strip() if family else None,
        "architecture": platform.machine(),
        "logical_cores": os.cpu_count(),
        "physical_cores": probe.physical_cores,
        "affinity_cores": cpu.affinity_cores(),
        "features": probe.features,
        "bf16": probe.bf16,
        "avx512": probe.avx512f,
        "vnni": probe.vnni,
        "amx": probe.amx,
    }


def memory_gib() -> float | None:
    """Total memory in GiB, from ``/proc/meminfo``."""
    text = _read("/proc/meminfo") or ""
    match = re.search(r"MemTotal:\s+(\d+)\s+kB", text)
    return round(int(match.group(1)) / 2**20, 1) if match else None


def library_versions() -> dict[str, str | None]:
    """Versions of :data:`LIBRARIES` (``None`` when not installed or not importable)."""
    versions = {}
    for name in LIBRARIES:
        try:
            module = importlib.import_module(name)
        except Exception:
            versions[name] = None
            continue
        version = getattr(module, "__version__", None)
        if name == "vtk" and version is None:
            version = getattr(module, "VTK_VERSION", None)
        versions[name] = str(version) if version is not None else "unknown"
    return versions


def gpu_info() -> dict | None:
    """The first NVIDIA GPU: name, memory, driver, CUDA (driver and torch runtime);
    ``None`` when there is none that ``nvidia-smi`` or torch can see."""
    info: dict = {}
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                "--format=csv,noheader,nounits"])
    if smi and smi.strip():
        parts = [p.strip() for p in smi.strip().splitlines()[0].split(",")]
        if len(parts) == 3:
            info.update(name=parts[0], driver=parts[1])
            try:
                info["memory_gib"] = round(float(parts[2]) / 1024, 1)
            except ValueError:
                pass
        header = _run(["nvidia-smi"]) or ""
        match = re.search(r"CUDA Version:\s*([\d.]+)", header)
        if match:
            info["cuda_driver"] = match.group(1)
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.setdefault("name", props.name)
            info.setdefault("memory_gib", round(props.total_memory / 2**30, 1))
            info["compute_capability"] = f"{props.major}.{props.minor}"
            info["cuda_torch"] = torch.version.cuda
            info["count"] = torch.cuda.device_count()
    except Exception:
        pass
    return info or None


def jetson_info() -> dict | None:
    """Jetson board, L4T release and power mode (``nvpmodel -q``) when readable."""
    model = _read("/proc/device-tree/model")
    release = _read("/etc/nv_tegra_release")
    if not model and not release:
        return None
    if model and "jetson" not in model.lower() and not release:
        return None
    info = {"model": model, "l4t": release.splitlines()[0] if release else None}
    query = _run(["nvpmodel", "-q"])
    if query:
        match = re.search(r"NV Power Mode:\s*(\S+)", query)
        info["power_mode"] = match.group(1) if match else query.strip().splitlines()[0]
    else:
        info["power_mode"] = None  # needs nvpmodel on PATH (and sometimes root)
    return info


# Environment variables that change how the thread pools of torch (OpenMP), numba and
# ONNX Runtime share the cores; recorded because they change the timings.
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
              "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")


def thread_counts() -> dict:
    """Intra-op threads of torch and numba, and the environment variables of
    :data:`THREAD_ENV` that are set."""
    threads: dict = {}
    try:
        import torch

        threads["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import numba

        threads["numba"] = numba.config.NUMBA_NUM_THREADS
    except ImportError:
        pass
    for name in THREAD_ENV:
        if os.environ.get(name):
            threads[name] = os.environ[name]
    return threads


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes compete for the CPU)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def system_info() -> dict:
    """Everything above, plus OS, Python and the time, as one JSON-ready dict."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": cpu_info(),
        "memory_gib": memory_gib(),
        "gpu": gpu_info(),
        "jetson": jetson_info(),
        "libraries": library_versions(),
        "onnxruntime_providers": onnxruntime_providers(),
        "threads": thread_counts(),
        "load_average": load_average(),
    }


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)|\bcpu\b|processor|\bwith\b.*$", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def machine_name(system: dict) -> str:
    """A short file-name-safe name for the machine: the Jetson board, else the GPU, else
    the CPU model and core count (``"amd-epyc-2core"``)."""
    jetson = system.get("jetson") or {}
    if jetson.get("model"):
        return _slug(jetson["model"].replace("Developer Kit", ""))
    gpu = system.get("gpu") or {}
    if gpu.get("name"):
        return _slug(gpu["name"])
    cpu = system.get("cpu") or {}
    cores = cpu.get("logical_cores")
    return _slug(f"{cpu.get('model') or 'cpu'}") + (f"-{cores}core" if cores else "")
