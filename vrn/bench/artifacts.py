"""What each ``vrn-bench`` configuration runs, and the files it needs.

:class:`BackendFactory` builds the VRN backend of a :class:`~vrn.bench.plan.Combo`;
:class:`LandmarkStages` the landmark stage the pipeline pairs with it. Their files live
in the runtime's one cache (``--cache-dir``, else
:func:`~vrn.runtime.backends.onnxruntime_backend.default_cache_dir`), under the
runtime's names and checksums: the fp32 and fp16 graphs are
:func:`~vrn.runtime.backends.onnxruntime_backend.cached_onnx`'s, the int8 graphs are
checksummed by :func:`~vrn.runtime.backends.onnx_cache.cached_file`, and a TensorRT
engine sits beside its graph with the engine's own sidecar
(:func:`vrn.export.engine_file.check_engine`).
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path

import numpy as np

from ..errors import EngineError
from .plan import REFERENCE_PRECISION, Combo


class BackendFactory:
    """Builds the backend of a :class:`~vrn.bench.plan.Combo` for one model, preparing
    the files it needs (ONNX export, int8 quantisation, fp16 graph, TensorRT engine)
    once, in the cache folder. ``prepare_s`` holds the seconds spent on each file made
    in this run; ``reused`` names those found in the cache. ``calibration``
    ``(N, 3, S, S)`` float32 face crops and ``calibration_landmarks`` ``(N, 68, 3)``
    float32 crop pixels calibrate int8-static."""

    def __init__(self, model, *, calibration: np.ndarray, calibration_landmarks: np.ndarray,
                 cache_dir=None, max_batch: int = 1):
        self.model = model
        self.calibration = calibration
        self.calibration_landmarks = calibration_landmarks
        self.cache_dir = cache_dir
        self.max_batch = max_batch
        self.prepare_s: dict[str, float] = {}
        self.reused: list[str] = []
        self._files: dict[str, Path] = {}

    def _file(self, key: str, make) -> Path:
        """``make()``'s path, once per ``key``; reused if older than this call."""
        if key not in self._files:
            wall, start = time.time(), time.perf_counter()
            path = Path(make())
            if path.stat().st_mtime < wall:
                self.reused.append(key)
            else:
                self.prepare_s[key] = time.perf_counter() - start
            self._files[key] = path
        return self._files[key]

    def onnx(self, precision: str = "fp32") -> Path:
        """The runtime's cached fp32 graph, or its fp16 conversion."""
        from ..runtime.backends.onnxruntime_backend import cached_onnx

        if precision not in ("fp32", "fp16"):
            raise ValueError(f"no ONNX graph of precision {precision!r} (fp32 or fp16)")
        fp16 = precision == "fp16"
        return self._file(f"onnx_{precision}",
                          lambda: cached_onnx(self.model, self.cache_dir, fp16=fp16))

    def onnx_int8(self, recipe: str) -> Path:
        """The fp32 graph quantised by ``recipe`` (``"int8-dynamic"`` or
        ``"int8-static"``), named after the graph, the recipe version and, for the
        static recipe, the calibration data."""
        from ..runtime.backends.onnx_cache import cached_file
        from .quantize import RECIPE_VERSION, quantize_int8

        fp32 = self.onnx()
        digest = hashlib.sha256(f"{fp32.name}/{RECIPE_VERSION}".encode())
        if recipe == "int8-static":
            digest.update(np.ascontiguousarray(self.calibration).tobytes())
            digest.update(np.ascontiguousarray(self.calibration_landmarks).tobytes())
        path = fp32.with_name(f"{fp32.stem}.{recipe}-{digest.hexdigest()[:12]}.onnx")
        return self._file(recipe, lambda: cached_file(path, lambda tmp: quantize_int8(
            fp32, tmp, recipe=recipe, calibration=self.calibration,
            calibration_landmarks=self.calibration_landmarks)))

    def build(self, combo: Combo):
        """The backend, or :class:`~vrn.errors.BackendUnavailableError` saying why not.
        torch on CUDA replays CUDA graphs (as
        :func:`vrn.runtime.backends.create_backend` does), except the eager fp32
        reference."""
        from ..runtime.backends import TorchBackend

        if combo.backend == "torch":
            graphs = combo.device == "cuda" and combo.precision != REFERENCE_PRECISION
            return TorchBackend(copy.deepcopy(self.model), device=combo.device,
                                precision=combo.precision, cuda_graphs=graphs)
        if combo.backend == "onnxruntime":
            from ..runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

            path = (self.onnx_int8(combo.precision) if combo.precision.startswith("int8")
                    else self.onnx(combo.precision))
            return OnnxRuntimeBackend(path, provider=combo.device,
                                      model_info=getattr(self.model, "info", None))
        if combo.backend == "tensorrt":
            return self.tensorrt(combo.precision)
        raise ValueError(f"unknown backend {combo.backend!r}")

    def engine(self, precision: str) -> Path:
        """A TensorRT engine of the fp32 or fp16 graph for this GPU, batch 1 to
        ``max_batch``, built once into the cache (rebuilt when the cached one does not
        fit this machine, see :func:`vrn.export.engine_file.check_engine`)."""
        from ..export.engine_file import check_engine
        from ..export.tensorrt_build import build_engine

        onnx_path = self.onnx(precision)
        path = onnx_path.with_name(f"{onnx_path.stem}.b{self.max_batch}.engine")

        def make():
            try:
                check_engine(path, onnx=onnx_path)
                return path
            except EngineError:  # missing, or built for another GPU or TensorRT
                return build_engine(onnx_path, path, max_batch=self.max_batch, opt_batch=1,
                                    precision=precision).engine_path

        return self._file(f"tensorrt_{precision}", make)

    def tensorrt(self, precision: str):
        """The TensorRT backend on a cached engine, replaying CUDA graphs when torch has
        CUDA (the runtime's fastest path)."""
        from ..runtime.backends import create_backend, torch_cuda_available

        return create_backend("tensorrt", engine=self.engine(precision), device="cuda",
                              cuda_graphs=torch_cuda_available())


def landmark_backend(backend) -> tuple[str, Path | None]:
    """The landmark stage the pipeline pairs with the VRN ``backend``, as
    :func:`vrn.runtime.pipeline.default_landmark_stage` picks it: ``("tensorrt",
    engine)`` for a TensorRT backend with ``landmarks.engine`` beside its engine,
    ``("onnxruntime", None)`` beside onnxruntime, else ``("torch", None)``."""
    name = getattr(backend, "name", "")
    if name == "tensorrt":
        engine = Path(backend.path).with_name("landmarks.engine")
        if engine.is_file():
            return "tensorrt", engine
    return ("onnxruntime" if name == "onnxruntime" else "torch"), None


class LandmarkStages:
    """One :class:`~vrn.runtime.landmarks.LandmarkStage` per landmark backend, built on
    first use and shared by every configuration (the ONNX Runtime one exports its graph
    into ``cache_dir``)."""

    def __init__(self, cache_dir=None):
        self.cache_dir = cache_dir
        self._stages: dict = {}

    def __call__(self, kind: str = "torch", engine: Path | None = None):
        from ..runtime.landmarks import LandmarkStage

        if (kind, engine) not in self._stages:
            self._stages[kind, engine] = LandmarkStage(kind, cache_dir=self.cache_dir,
                                                       engine=engine)
        return self._stages[kind, engine]

    def for_backend(self, backend):
        """The stage the pipeline would run beside ``backend`` (:func:`landmark_backend`)."""
        return self(*landmark_backend(backend))
