"""Inference backends behind one interface (:class:`~.base.Backend`), one module each;
heavy imports (tensorrt, onnxruntime's GPU providers) happen inside them.

:func:`create_backend` builds one by name; ``"auto"`` picks the fastest this machine can
run (:func:`choose_backend`) and records why in ``backend.selection_reason``:

1. ``tensorrt`` when an engine is given, the tensorrt package imports and a CUDA GPU is
   present;
2. ``torch`` CUDA fp16 (channels-last, CUDA graphs) when torch has CUDA;
3. ``onnxruntime`` CPU fp32 (the weights exported to ONNX once, cached): several times
   faster than eager torch on a CPU for this network;
4. ``torch`` CPU fp32.

An ``.onnx`` file as the weights always goes to onnxruntime (CUDA provider on a GPU
when onnxruntime-gpu is installed).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import BackendUnavailableError
from .base import Backend
from .torch_backend import TorchBackend

BACKEND_NAMES = ("auto", "tensorrt", "onnxruntime", "torch")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


@dataclass(frozen=True)
class BackendChoice:
    """What ``"auto"`` resolved to and why."""

    name: str
    device: str
    precision: str
    reason: str


def cuda_available() -> bool:
    """Whether a CUDA GPU is usable (through torch, or numba-cuda without torch CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            return True
    except ImportError:
        pass
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba-cuda missing or a broken driver: no GPU for us
        return False


def torch_cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device."""
    from .cuda_arrays import torch_cuda

    return torch_cuda() is not None


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def onnxruntime_providers() -> list[str]:
    """Execution providers the installed onnxruntime lists (empty when not installed)."""
    if not _has_module("onnxruntime"):
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def is_engine_path(path) -> bool:
    return path is not None and Path(path).suffix.lower() in ENGINE_SUFFIXES


def is_onnx_path(path) -> bool:
    return path is not None and Path(path).suffix.lower() == ".onnx"


def choose_backend(*, weights=None, engine=None) -> BackendChoice:
    """The fastest backend available here for these inputs, with the reason."""
    gpu = cuda_available()
    if engine is not None:
        if not _has_module("tensorrt"):
            missing = "the tensorrt package is not installed"
        elif not gpu:
            missing = "no CUDA GPU is available"
        else:
            return BackendChoice("tensorrt", "cuda", "engine",
                                 "a TensorRT engine was given, tensorrt imports and a CUDA "
                                 "GPU is present")
        raise BackendUnavailableError(f"cannot run the engine {engine}: {missing}; pass "
                                      "--weights and another backend instead")
    if is_onnx_path(weights):
        if gpu and "CUDAExecutionProvider" in onnxruntime_providers():
            return BackendChoice("onnxruntime", "cuda", "fp32",
                                 "an ONNX file was given and onnxruntime has the CUDA provider")
        return BackendChoice("onnxruntime", "cpu", "fp32",
                             "an ONNX file was given; no usable onnxruntime GPU provider")
    if torch_cuda_available():
        return BackendChoice("torch", "cuda", "fp16",
                             "torch has CUDA: fp16, channels-last, CUDA graphs (no TensorRT "
                             "engine given)")
    if onnxruntime_providers():
        return BackendChoice("onnxruntime", "cpu", "fp32",
                             "no GPU: onnxruntime on the CPU is several times faster than "
                             "eager torch for this network (weights exported to ONNX once, "
                             "cached)")
    return BackendChoice("torch", "cpu", "fp32", "no GPU and no onnxruntime: torch on the CPU")


def create_backend(name: str = "auto", weights: str | os.PathLike | None = None,
                   engine: str | os.PathLike | None = None, *, device: str | None = None,
                   precision: str | None = None, cuda_graphs: bool | None = None,
                   provider: str | None = None,
                   cache_dir: str | os.PathLike | None = None) -> Backend:
    """Build an inference backend.

    Parameters
    ----------
    name : {"auto", "tensorrt", "onnxruntime", "torch"}
    weights : path, optional
        ``.t7`` / ``.safetensors`` weights, an ``.onnx`` graph (onnxruntime only), or
        ``None`` for the package default.
    engine : path, optional
        A TensorRT engine (tensorrt only).
    device : {"cpu", "cuda"}, optional
        Default: CUDA where the backend can use it, else the CPU.
    precision : {"fp32", "fp16", "bf16"}, optional
        Default: fp16 for torch on CUDA, fp32 elsewhere. onnxruntime: ``"fp16"`` builds
        fp16 TensorRT-provider kernels. TensorRT: fixed by the engine.
    cuda_graphs : bool, optional
        torch CUDA and TensorRT: capture CUDA graphs (default: on for torch CUDA).
    provider : {"cpu", "cuda", "tensorrt"}, optional
        onnxruntime execution provider (default: from ``device``).
    cache_dir : path, optional
        Where exported ONNX files and provider engine caches go.

    Returns a backend with ``selection_reason`` (why this one) set.
    """
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if weights is not None and engine is not None:
        raise ValueError("give either weights or an engine, not both")
    if is_engine_path(weights):
        weights, engine = None, weights
    reason = "requested"
    if name == "auto":
        choice = choose_backend(weights=weights, engine=engine)
        name, reason = choice.name, choice.reason
        device = device or choice.device
        if precision is None and choice.precision != "engine":
            precision = choice.precision
    if engine is not None and name != "tensorrt":
        raise ValueError(f"a TensorRT engine runs only on the tensorrt backend, not {name!r}")
    if name == "tensorrt":
        if engine is None:
            raise ValueError("the tensorrt backend needs --engine (build one with vrn-export)")
        if device not in (None, "cuda") and not str(device).startswith("cuda"):
            raise ValueError(f"the tensorrt backend runs on CUDA, not {device!r}")
        from .tensorrt_backend import TensorRTBackend

        backend = TensorRTBackend(engine, device_id=_device_index(device),
                                  cuda_graphs=bool(cuda_graphs))
    elif name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        device = device or "cpu"
        provider = provider or ("cpu" if device == "cpu" else "cuda")
        options = dict(provider=provider, device_id=_device_index(device),
                       cache_dir=cache_dir)
        if is_onnx_path(weights):
            backend = OnnxRuntimeBackend(weights, fp16=precision == "fp16", **options)
        else:
            backend = OnnxRuntimeBackend.from_weights(weights, precision=precision or "fp32",
                                                      **options)
    else:
        from ...model import load_model

        if is_onnx_path(weights):
            raise ValueError("an .onnx file runs on the onnxruntime backend, not torch")
        device = device or ("cuda" if torch_cuda_available() else "cpu")
        on_cuda = str(device).startswith("cuda")
        precision = precision or ("fp16" if on_cuda else "fp32")
        graphs = on_cuda if cuda_graphs is None else cuda_graphs
        backend = TorchBackend(load_model(weights), device=device, precision=precision,
                               cuda_graphs=graphs)
    backend.selection_reason = reason
    return backend


def _device_index(device: str | None) -> int:
    """``"cuda:1" -> 1``; anything else -> 0."""
    if device and ":" in str(device):
        return int(str(device).split(":", 1)[1])
    return 0


__all__ = ["BACKEND_NAMES", "Backend", "BackendChoice", "TorchBackend", "choose_backend",
           "create_backend", "cuda_available"]
