"""``vrn-bench``'s measurements: the whole per-frame pipeline for every backend,
precision and batch size available, with the reference implementations beside ours.

For each configuration (backend x device x precision) and batch size ``B``, every frame
is: ``decode`` (the source image decoded from its bytes, or the next video frame),
``detect``, then :class:`vrn.runtime.pipeline.Reconstructor` on ``B`` copies of the
detected face (``landmarks``, ``crop``, ``infer``, ``isosurface``, ``colour`` with
back-mapping into the photo), then ``render`` (:func:`vrn.runtime.render.overlay`). The
landmark stage runs where the pipeline runs it (:func:`landmark_backend`): on ONNX
Runtime beside an onnxruntime configuration, on PyTorch otherwise (the TensorRT engines
built here have no landmark engine beside them). Each stage is timed the pipeline's own
way (:class:`vrn.runtime.timing.StageTimer`), the frame as a whole by the wall clock
(``end_to_end``), and ``crop_to_mesh`` is crop through colour.

Every network call gets the face crops' landmarks in crop pixels beside the crops (a
landmark-guided model needs them; other models ignore them).

The network alone (``infer_only``) is timed outside the pipeline too, every
configuration once per round, so that a change in the machine's load hits all of them
alike and their ratios stay fair. On CUDA backends the network is also timed
trtexec-style with CUDA events: host to device copy, GPU compute with the input and
output on the device, device to host copy, and the three together.

References, in the same run: PyTorch eager fp32 inference on each device (always run,
whatever ``backends`` says), and ``skimage.measure.marching_cubes``, PyMCubes and VTK
flying edges (when installed; see :mod:`vrn.bench.isosurface`) against
:func:`vrn.kernels.marching_cubes` on the network's own output for a face crop and on a
synthetic face-like volume. Reduced-precision configurations are validated by occupancy IoU
against fp32 on face crops (:mod:`vrn.bench.validation`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, EngineError, NoFaceError, VRNError
from .stats import ratio, summarize
from .system import load_average, machine_name, system_info

SCHEMA = "vrn-bench/1"
BACKENDS = ("torch", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8-dynamic", "int8-static")
PRECISION_ALIASES = {"int8": ("int8-dynamic", "int8-static")}
DEVICES = ("cpu", "cuda")
FRAME_STAGES = ("decode", "detect", "landmarks", "crop", "infer", "isosurface", "colour",
                "render")
CROP_TO_MESH = ("crop", "infer", "isosurface", "colour")
GPU_PHASES = ("h2d", "compute", "d2h", "with_transfers")
SETTLE_S = 0.02  # pause before each interleaved call: idle thread pools stop spinning
MODELS = ("default", "full")

# Goals from the issue: speed-up ratios, and per-frame milliseconds on an H100-class GPU.
GOAL_ORT_VS_TORCH = 1.25
GOAL_FASTEST_CPU = 2.0
GOAL_MC_VS_SKIMAGE = 5.0
GOAL_TORCH_FP16_MS = 5.0
GOAL_TRT_FP16_MS = 2.0


@dataclass(frozen=True)
class Combo:
    """One inference configuration."""

    backend: str
    device: str
    precision: str

    @property
    def label(self) -> str:
        return f"{self.backend} {self.device} {self.precision}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


REFERENCE_PRECISION = "fp32"


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
    level: float = 0.5
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


# --------------------------------------------------------------------------- source

class FrameSource:
    """Frames for the ``decode`` stage: an image file decoded from its bytes on every
    read, or a video read frame by frame (rewound at its end). Frames are ``(H, W, 3)``
    uint8 RGB."""

    VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

    def __init__(self, path: str | os.PathLike | None = None):
        import cv2

        from ..image_io import sample_image_path

        self._cv2 = cv2
        self.path = Path(path) if path is not None else sample_image_path()
        if not self.path.is_file():
            raise VRNError(f"{self.path}: source file not found")
        self.kind = "video" if self.path.suffix.lower() in self.VIDEO_SUFFIXES else "image"
        self._capture = None
        if self.kind == "video":
            self._capture = cv2.VideoCapture(str(self.path))
            if not self._capture.isOpened():
                raise VRNError(f"{self.path}: OpenCV cannot open this video")
        else:
            self._bytes = np.fromfile(self.path, dtype=np.uint8)
        self.read()  # fail now, with the file named, if it cannot be decoded

    def read(self) -> np.ndarray:
        cv2 = self._cv2
        if self._capture is not None:
            ok, frame = self._capture.read()
            if not ok:
                self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self._capture.read()
            if not ok:
                raise VRNError(f"{self.path}: no frame could be read from this video")
        else:
            frame = cv2.imdecode(self._bytes, cv2.IMREAD_COLOR)
            if frame is None:
                raise VRNError(f"{self.path}: not a readable image or video")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()


# ---------------------------------------------------------------------------- model

def load_bench_model(settings: BenchSettings):
    """The model to measure, on the CPU, and a label for where it came from."""
    from ..model import load_model, random_model

    if settings.weights is not None:
        return load_model(settings.weights), str(settings.weights)
    if settings.model == "full":
        return (random_model(), "--model full: the released architecture with seeded "
                                "random weights (timing does not depend on their values)")
    from ..model.weights import default_weights_path

    shipped = default_weights_path()
    label = (f"package default ({shipped.name})" if shipped is not None else
             "package default (no checkpoint shipped: seeded random initialisation)")
    return load_model(None), label


def count_macs(model) -> int:
    """Multiply-accumulates of one image through ``model``'s convolutions, counted on
    the ``meta`` device (shapes only, no arithmetic)."""
    import torch
    from torch import nn

    from ..export.onnx_export import example_inputs
    from ..model import build_model, model_info

    info = model_info(model)
    try:
        with torch.device("meta"):
            probe = build_model(info.architecture, info.config)
    except Exception:  # noqa: BLE001 - an architecture build_model cannot rebuild
        probe = copy.deepcopy(model).to("meta")
    probe.eval()
    total = [0]

    def hook(module, inputs, output):
        kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
        total[0] += output[0].numel() * kernel  # output[0]: one image's outputs

    handles = [m.register_forward_hook(hook) for m in probe.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            probe(*example_inputs(probe, 1, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return total[0]


def describe_model(model, source: str) -> dict:
    """Architecture, configuration, size and provenance of ``model``."""
    from ..model import count_parameters, model_info

    info = model_info(model)
    try:
        gmacs = count_macs(model) / 1e9
    except Exception:  # noqa: BLE001 - the count is informative, never essential
        gmacs = None
    return {"architecture": info.architecture, "config": info.config.to_dict(),
            "parameters": count_parameters(model), "gmacs_per_image": gmacs,
            "trained": bool(info.trained), "bn_mode": info.bn_mode,
            "provenance": info.provenance, "weights": source}


# ------------------------------------------------------------------------- backends

def plan(settings: BenchSettings, *, cuda: bool, cpu_bf16: bool, tensorrt: str | None
         ) -> tuple[list[Combo], list[dict]]:
    """Configurations worth building, and those ruled out up front with the reason.

    ``cuda``: a CUDA GPU is usable (torch or numba-cuda); ``cpu_bf16``: the CPU has
    native bf16;
    ``tensorrt``: why TensorRT cannot be used, or ``None`` when it can.
    The torch fp32 reference of each device comes first, whatever was asked for.
    """
    devices = ["cpu"] + (["cuda"] if cuda else [])
    combos: list[Combo] = [Combo("torch", d, REFERENCE_PRECISION) for d in devices]
    unavailable: list[dict] = []

    def skip(backend, device, precision, reason):
        unavailable.append({"backend": backend, "device": device, "precision": precision,
                            "reason": reason})

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
                    skip(backend, device, precision, reason)
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
        return ("bf16 on the CPU: no native bf16 in this CPU (lscpu flags lack "
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
    except Exception as exc:  # noqa: BLE001 - a broken install (missing libnvinfer)
        return f"TensorRT cannot be imported: {exc}"
    return None


class BackendFactory:
    """Builds the backend of a :class:`Combo` for one model, preparing the files it
    needs (ONNX export, int8 quantisation, fp16 graph, TensorRT engine) once, in the
    cache folder. ``prepare_s`` holds the seconds spent on each file made in this run;
    ``reused`` names those found in the cache. ``calibration`` ``(N, 3, S, S)`` float32
    face crops and ``calibration_landmarks`` ``(N, 68, 3)`` float32 crop pixels calibrate
    int8-static."""

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
        if key not in self._files:
            wall, start = time.time(), time.perf_counter()
            path = Path(make())
            if path.stat().st_mtime < wall:
                self.reused.append(key)
            else:
                self.prepare_s[key] = time.perf_counter() - start
            self._files[key] = path
        return self._files[key]

    def onnx_fp32(self) -> Path:
        from ..runtime.backends.onnxruntime_backend import cached_onnx

        return self._file("onnx_fp32", lambda: cached_onnx(self.model, self.cache_dir))

    def onnx_int8(self, recipe: str) -> Path:
        from ..runtime.backends.onnx_cache import cached_file
        from .quantize import RECIPE_VERSION, quantize_int8

        fp32 = self.onnx_fp32()
        digest = hashlib.sha256(f"{fp32.name}/{RECIPE_VERSION}".encode())
        if recipe == "int8-static":
            digest.update(np.ascontiguousarray(self.calibration).tobytes())
            digest.update(np.ascontiguousarray(self.calibration_landmarks).tobytes())
        path = fp32.with_name(f"{fp32.stem}.{recipe}-{digest.hexdigest()[:12]}.onnx")
        return self._file(recipe, lambda: cached_file(path, lambda tmp: quantize_int8(
            fp32, tmp, recipe=recipe, calibration=self.calibration,
            calibration_landmarks=self.calibration_landmarks)))

    def onnx_fp16(self) -> Path:
        from ..runtime.backends.onnxruntime_backend import cached_onnx

        return self._file("onnx_fp16", lambda: cached_onnx(self.model, self.cache_dir,
                                                           fp16=True))

    def build(self, combo: Combo):
        """The backend, or :class:`BackendUnavailableError` saying why not. torch on
        CUDA replays CUDA graphs (as :func:`vrn.runtime.backends.create_backend` does),
        except the eager fp32 reference."""
        from ..runtime.backends import TorchBackend

        if combo.backend == "torch":
            graphs = combo.device == "cuda" and combo.precision != REFERENCE_PRECISION
            return TorchBackend(copy.deepcopy(self.model), device=combo.device,
                                precision=combo.precision, cuda_graphs=graphs)
        if combo.backend == "onnxruntime":
            from ..runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

            if combo.precision == "fp32":
                path = self.onnx_fp32()
            elif combo.precision.startswith("int8"):
                path = self.onnx_int8(combo.precision)
            else:
                path = self.onnx_fp16()
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

        onnx_path = self.onnx_fp32() if precision == "fp32" else self.onnx_fp16()
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


# -------------------------------------------------------------------------- timing

def time_pipeline(reconstructor, source: FrameSource, *, batch: int, frames: int,
                  warmup: int, tick=None) -> dict:
    """Run ``warmup + frames`` frames through decode, detect, the reconstructor on
    ``batch`` copies of the face (landmarks through colour), and render; return
    per-frame millisecond samples ``{stage: [ms, ...]}`` for :data:`FRAME_STAGES`,
    ``"crop_to_mesh"`` and ``"end_to_end"``, plus the mesh size and how many frames had
    no detection (their previous box was reused, as a tracker would)."""
    from ..runtime.render import overlay
    from ..runtime.timing import StageTimer

    samples: dict[str, list[float]] = {s: [] for s in FRAME_STAGES}
    samples["crop_to_mesh"], samples["end_to_end"] = [], []
    last_box, missed, mesh = None, 0, None
    for index in range(warmup + frames):
        timer = StageTimer()
        start = time.perf_counter()
        with timer("decode"):
            frame = source.read()
        with timer("detect"):
            boxes = reconstructor.detector(frame)
        if boxes:
            last_box = boxes[0]
        elif last_box is None:
            raise NoFaceError(f"{source.path}: no face found in the first frame")
        else:
            missed += index >= warmup
        result = reconstructor(frame, boxes=[last_box] * batch)
        with timer("render"):
            overlay(frame, [face.mesh for face in result.faces])
        total_ms = (time.perf_counter() - start) * 1e3
        if tick is not None:
            tick()
        if index < warmup:
            continue
        stage_ms = {**result.timings_ms, **timer.ms}  # our detect replaces the no-op one
        for stage in FRAME_STAGES:
            samples[stage].append(stage_ms.get(stage, 0.0))
        samples["crop_to_mesh"].append(sum(result.timings_ms.get(s, 0.0) for s in CROP_TO_MESH))
        samples["end_to_end"].append(total_ms)
        mesh = result.faces[0].mesh
    return {"samples": samples, "missed_detections": missed,
            "mesh": {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}}


def time_inference(backends: dict, inputs: dict, *, frames: int, warmup: int) -> dict:
    """The networks alone: each ``backends[key].infer(batch, landmarks)``, with
    ``inputs[key] = (batch (N, 3, S, S) float32, landmarks (N, 68, 3) float32 crop
    pixels)`` (NumPy in, NumPy out, so host transfers are included on a GPU), called once
    per round, the keys in turn, for ``warmup + frames`` rounds. Interleaving spreads any
    change in the machine's load over every backend alike, so their ratios stay fair on a
    shared machine; a pause of :data:`SETTLE_S` before each call lets the previous backend's
    worker threads stop spinning first. Returns millisecond samples per key."""
    samples: dict = {key: [] for key in backends}
    for index in range(warmup + frames):
        for key, backend in backends.items():
            time.sleep(SETTLE_S)
            start = time.perf_counter()
            backend.infer(*inputs[key])
            if index >= warmup:
                samples[key].append((time.perf_counter() - start) * 1e3)
    return samples


def time_device_inference(backend, batch: np.ndarray, landmarks: np.ndarray, *,
                          frames: int, warmup: int) -> dict | None:
    """trtexec-style CUDA-event timing of a CUDA backend on ``batch`` ``(N, 3, S, S)``
    and ``landmarks`` ``(N, 68, 3)`` float32: ``h2d`` (the crops, pinned host to
    device), ``compute`` (crops and volume on the device; a guided backend's own copy of
    the landmarks, 816 bytes a face, falls in it), ``d2h`` and ``with_transfers`` (all
    three), as millisecond samples. ``None`` off CUDA."""
    if getattr(backend, "device", "cpu") != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None  # a TensorRT backend on numba-cuda arrays: no torch CUDA events

    host = torch.from_numpy(np.ascontiguousarray(batch)).pin_memory()
    samples: dict[str, list[float]] = {p: [] for p in GPU_PHASES}
    for index in range(warmup + frames):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        x = host.to("cuda", non_blocking=True)
        events[1].record()
        y = backend.infer(x, landmarks, on_device=True)
        events[2].record()
        y.to("cpu")
        events[3].record()
        torch.cuda.synchronize()
        if index < warmup:
            continue
        samples["h2d"].append(events[0].elapsed_time(events[1]))
        samples["compute"].append(events[1].elapsed_time(events[2]))
        samples["d2h"].append(events[2].elapsed_time(events[3]))
        samples["with_transfers"].append(events[0].elapsed_time(events[3]))
    return samples


def _repeat(fn, *, runs: int, budget_s: float) -> tuple[list[float], object]:
    """Call ``fn`` once untimed (compilation, caches), then at least 3 and at most
    ``runs`` times, stopping early once ``budget_s`` is spent; ms samples and the last
    result."""
    result = fn()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max(runs, 3) and (len(samples) < 3 or spent < budget_s):
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        samples.append(elapsed * 1e3)
        spent += elapsed
    return samples, result


def time_isosurface_references(volumes: dict[str, np.ndarray], *, level: float, runs: int,
                               budget_s: float) -> dict:
    """Every isosurface implementation of :mod:`vrn.bench.isosurface` on every volume
    (``{name: (D, H, W) float32}``): millisecond stats, vertex and triangle counts, and
    how many times slower each reference is than ours (ratio of medians)."""
    from .isosurface import OURS, available_implementations

    runners, unavailable = available_implementations()
    results = []
    for name, volume in volumes.items():
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        entry = {"volume": name, "shape": list(volume.shape), "implementations": {}}
        for impl, run in runners.items():
            samples, (vertices, triangles) = _repeat(lambda: run(volume, level), runs=runs,
                                                     budget_s=budget_s)
            entry["implementations"][impl] = {**summarize(samples),
                                              "vertices": int(len(vertices)),
                                              "triangles": int(len(triangles))}
        ours = entry["implementations"][OURS]["p50"]
        entry["slower_than_ours"] = {impl: ratio(stats["p50"], ours)
                                     for impl, stats in entry["implementations"].items()
                                     if impl != OURS}
        results.append(entry)
    return {"level": level, "ours": OURS, "volumes": results, "unavailable": unavailable}


# ------------------------------------------------------------------------ the run

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


def _validation_crops(settings: BenchSettings, detector, landmark_stage, size: int,
                      source: FrameSource) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Face crops ``(N, 3, S, S)``, their landmarks ``(N, 68, 3)`` crop pixels and names,
    of the source image (when it is one), the sample photo and the ``validate_with``
    photos, in that order."""
    from ..image_io import sample_image_path
    from .validation import face_crops, image_files

    sample = sample_image_path()
    images = [source.path] if source.kind == "image" else []
    if not images or source.path.resolve() != sample.resolve():
        images.append(sample)
    images += image_files(list(settings.validate_with))
    return face_crops(images, detector=detector, landmark_stage=landmark_stage, size=size)


def run_benchmark(settings: BenchSettings) -> dict:
    """Measure everything :class:`BenchSettings` asks for and return the report, a
    JSON-ready dict (``schema`` ``"vrn-bench/1"``):

    - ``machine``, ``system`` (:func:`vrn.bench.system.system_info` plus
      ``load_average_end``), ``model`` (:func:`describe_model`), ``settings``;
    - ``runs``: per configuration and batch, ``stages`` (:data:`FRAME_STAGES` ->
      :func:`~vrn.bench.stats.summarize` stats in ms), ``crop_to_mesh``, ``end_to_end``,
      ``infer_only`` (the network alone), ``throughput``, ``mesh`` (vertices and
      triangles per face), ``gpu`` (:data:`GPU_PHASES`, CUDA only), ``describe`` and
      ``landmark_stage`` (what ran the network and the landmarks);
    - ``speedups`` (:func:`speedups`), ``validation`` (IoU against fp32 per
      configuration), ``references`` (``isosurface``), ``goals`` (:func:`goals`),
      ``unavailable`` (configuration and reason), ``prepare_s`` and
      ``reused_from_cache`` (exported, quantised and built files).
    """
    from tqdm import tqdm

    from ..runtime.backends import cuda_available
    from ..runtime.detect import create_detector
    from .isosurface import face_like_volume
    from .validation import MIN_IOU, validate_against_reference

    system = system_info()
    source = FrameSource(settings.source)
    model, model_source = load_bench_model(settings)
    model_block = describe_model(model, model_source)
    detector = create_detector()
    landmark_stages = LandmarkStages(settings.cache_dir)
    size = model.config.input_size
    crops, landmarks, crop_names = _validation_crops(settings, detector, landmark_stages(),
                                                     size, source)
    if len(crops) == 0:
        raise NoFaceError("no face found in the validation photos (the sample photo "
                          "included); cannot validate or calibrate")

    cuda = cuda_available()
    combos, unavailable = plan(settings, cuda=cuda, cpu_bf16=system["cpu"]["bf16"],
                               tensorrt=tensorrt_unavailable_reason())
    factory = BackendFactory(model, calibration=crops, calibration_landmarks=landmarks,
                             cache_dir=settings.cache_dir, max_batch=max(settings.batches))
    per_combo = settings.warmup + settings.frames
    total = len(combos) * len(settings.batches) * per_combo
    progress = tqdm(total=total, disable=not settings.progress, unit="frame",
                    dynamic_ncols=True, leave=False)
    runs, validation, references = [], [], {}
    built: dict = {}  # kept for the interleaved timing of the networks alone
    reference_volumes = None
    try:
        for combo in combos:
            progress.set_description(combo.label)
            cpu_reference = combo == Combo("torch", "cpu", REFERENCE_PRECISION)
            try:
                backend = factory.build(combo)
            except (BackendUnavailableError, ImportError, VRNError) as exc:
                if cpu_reference:
                    raise
                unavailable.append({**combo.as_dict(), "reason": str(exc)})
                progress.update(len(settings.batches) * per_combo)
                continue
            check = None
            built[combo] = backend
            try:
                if cpu_reference:
                    reference_volumes = np.stack([
                        backend.infer(crops[i:i + 1], landmarks[i:i + 1])[0]
                        for i in range(len(crops))])
                else:
                    check = validate_against_reference(backend, reference_volumes, crops,
                                                       landmarks, level=settings.level)
                stage = landmark_stages.for_backend(backend)
                measured = [_measure(backend, detector, stage, source, combo, batch,
                                     settings, crops=crops, landmarks=landmarks,
                                     tick=progress.update)
                            for batch in settings.batches]
            except Exception as exc:  # noqa: BLE001 - one broken backend must not end the run
                if cpu_reference:
                    raise
                unavailable.append({**combo.as_dict(), "reason": "failed while measuring: "
                                    f"{type(exc).__name__}: {exc}"})
                del built[combo]
                continue
            if check is not None:
                validation.append({**combo.as_dict(), **check})
            runs.extend(measured)
        progress.set_description("networks alone")
        keys = {(Combo(r["backend"], r["device"], r["precision"]), r["batch"]): r for r in runs}
        alone = time_inference({key: built[key[0]] for key in keys},
                               {key: _repeat_first(crops, landmarks, key[1]) for key in keys},
                               frames=settings.frames, warmup=settings.warmup)
        for key, run in keys.items():
            run["infer_only"] = summarize(alone[key])
        built.clear()
        progress.set_description("isosurface references")
        volumes = {f"network output for {crop_names[0]}": reference_volumes[0],
                   "face-like (synthetic)": face_like_volume(reference_volumes[0].shape)}
        references["isosurface"] = time_isosurface_references(
            volumes, level=settings.level, runs=settings.isosurface_runs,
            budget_s=settings.isosurface_budget_s)
    finally:
        progress.close()
        source.close()

    report = {
        "schema": SCHEMA,
        "machine": machine_name(system),
        "system": {**system, "load_average_end": load_average()},
        "model": model_block,
        "settings": {"model": "weights" if settings.weights is not None else settings.model,
                     "backends": list(settings.backends), "precisions": list(settings.precisions),
                     "batches": list(settings.batches), "frames": settings.frames,
                     "warmup": settings.warmup, "source": str(source.path),
                     "source_kind": source.kind, "level": settings.level,
                     "validation_crops": crop_names, "min_iou": MIN_IOU},
        "prepare_s": dict(factory.prepare_s),
        "reused_from_cache": list(factory.reused),
        "runs": runs,
        "unavailable": unavailable,
        "validation": validation,
        "references": references,
    }
    report["speedups"] = speedups(report)
    report["goals"] = goals(report)
    return report


def _repeat_first(crops: np.ndarray, landmarks: np.ndarray, batch: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` copies of the first crop ``(batch, 3, S, S)`` and of its landmarks
    ``(batch, 68, 3)``."""
    return crops[:1].repeat(batch, axis=0), landmarks[:1].repeat(batch, axis=0)


def _measure(backend, detector, landmark_stage, source, combo: Combo, batch: int,
             settings: BenchSettings, *, crops: np.ndarray, landmarks: np.ndarray,
             tick=None) -> dict:
    """One entry of ``report["runs"]``: the pipeline (with ``landmark_stage``) timed
    frame by frame, and on CUDA the network with CUDA events (the network alone is timed
    later, for all configurations together, by :func:`time_inference`)."""
    from ..runtime.pipeline import Reconstructor

    reconstructor = Reconstructor(backend=backend, detector=detector,
                                  landmark_stage=landmark_stage, all_faces=True,
                                  level=settings.level)
    timed = time_pipeline(reconstructor, source, batch=batch, frames=settings.frames,
                          warmup=settings.warmup, tick=tick)
    samples = timed["samples"]
    reference = combo.backend == "torch" and combo.precision == REFERENCE_PRECISION
    run = {**combo.as_dict(), "batch": batch, "label": f"{combo.label} b{batch}",
           "reference": reference, "describe": backend.describe(),
           "landmark_stage": landmark_stage.describe(),
           "stages": {s: summarize(samples[s]) for s in FRAME_STAGES},
           "crop_to_mesh": summarize(samples["crop_to_mesh"]),
           "end_to_end": summarize(samples["end_to_end"]),
           "mesh": timed["mesh"], "missed_detections": timed["missed_detections"]}
    mean_s = run["end_to_end"]["mean"] / 1e3
    run["throughput"] = {"frames_per_s": 1.0 / mean_s, "faces_per_s": batch / mean_s}
    gpu = time_device_inference(backend, *_repeat_first(crops, landmarks, batch),
                                frames=settings.frames, warmup=settings.warmup)
    if gpu is not None:
        run["gpu"] = {phase: summarize(v) for phase, v in gpu.items()}
    return run


# --------------------------------------------------------------------- derived

def _find(runs, backend, device, precision, batch):
    for run in runs:
        if (run["backend"], run["device"], run["precision"], run["batch"]) == \
                (backend, device, precision, batch):
            return run
    return None


def speedups(report: dict) -> list[dict]:
    """Each run against PyTorch eager fp32 on the same device and batch, as ratios of
    medians (``reference p50 / run p50``; medians shrug off the spikes a shared machine
    adds): the network alone (``inference``), the network inside the pipeline
    (``inference_in_pipeline``) and the whole frame (``end_to_end``)."""
    out = []
    for run in report["runs"]:
        if run["reference"]:
            continue
        ref = _find(report["runs"], "torch", run["device"], REFERENCE_PRECISION, run["batch"])
        if ref is None:
            continue
        out.append({"label": run["label"], "reference": ref["label"],
                    "inference": ratio(ref["infer_only"]["p50"], run["infer_only"]["p50"]),
                    "inference_in_pipeline": ratio(ref["stages"]["infer"]["p50"],
                                                   run["stages"]["infer"]["p50"]),
                    "end_to_end": ratio(ref["end_to_end"]["p50"], run["end_to_end"]["p50"])})
    return out


def passes_validation(report: dict, run: dict) -> bool:
    """Whether ``run``'s configuration reached the IoU threshold against fp32 (the
    PyTorch fp32 references pass by definition)."""
    if run["reference"]:
        return True
    for entry in report["validation"]:
        if (entry["backend"], entry["device"], entry["precision"]) == \
                (run["backend"], run["device"], run["precision"]):
            return entry["passed"]
    return False


def goals(report: dict) -> list[dict]:
    """The issue's goals, each with the measured value (``None`` when not measured
    here) and whether it is met."""
    runs = report["runs"]
    model = report["model"]
    full = model["config"] == _full_config()
    out = []

    def goal(name, target, value, *, higher_is_better=True, note=""):
        met = None if value is None else (value >= target if higher_is_better
                                          else value < target)
        out.append({"name": name, "target": target, "value": value, "met": met,
                    "comparison": ">=" if higher_is_better else "<", "note": note})

    torch_cpu = _find(runs, "torch", "cpu", REFERENCE_PRECISION, 1)
    ort_cpu = _find(runs, "onnxruntime", "cpu", "fp32", 1)
    value = (ratio(torch_cpu["infer_only"]["p50"], ort_cpu["infer_only"]["p50"])
             if torch_cpu and ort_cpu else None)
    goal("ONNX Runtime CPU fp32 vs PyTorch eager CPU fp32, network alone, batch 1 "
         "(medians)", GOAL_ORT_VS_TORCH, value,
         note="" if full else "the goal is set for the full model; this run measured "
                              f"{model['architecture']} with {model['parameters']:,} parameters")

    cpu_runs = [r for r in runs if r["device"] == "cpu" and r["batch"] == 1
                and passes_validation(report, r)]
    from .validation import MIN_IOU

    name = (f"fastest CPU configuration (IoU >= {MIN_IOU}) vs PyTorch eager CPU fp32, "
            "network alone, batch 1 (medians)")
    if torch_cpu and cpu_runs:
        best = min(cpu_runs, key=lambda r: r["infer_only"]["p50"])
        goal(name, GOAL_FASTEST_CPU,
             ratio(torch_cpu["infer_only"]["p50"], best["infer_only"]["p50"]),
             note=f"fastest: {best['label']}")
    else:
        goal(name, GOAL_FASTEST_CPU, None)

    from .isosurface import SKIMAGE_DEFAULT

    iso = report["references"].get("isosurface", {})
    for entry in iso.get("volumes", []):
        triangles = entry["implementations"][iso["ours"]]["triangles"]
        goal(f"our CPU marching cubes vs skimage ({entry['volume']})", GOAL_MC_VS_SKIMAGE,
             entry["slower_than_ours"].get(SKIMAGE_DEFAULT),
             note=f"against {SKIMAGE_DEFAULT} (skimage's default method); {triangles:,} "
                  "triangles")

    for backend, target in (("torch", GOAL_TORCH_FP16_MS), ("tensorrt", GOAL_TRT_FP16_MS)):
        run = _find(runs, backend, "cuda", "fp16", 1)
        goal(f"{backend} CUDA fp16 crop-to-mesh-on-host latency, batch 1 (ms)", target,
             run["crop_to_mesh"]["mean"] if run else None, higher_is_better=False,
             note="H100-class GPU goal" + ("" if run else "; not measured: no such run here"))
    return out


def _full_config() -> dict:
    from ..model import VRNConfig

    return VRNConfig().to_dict()
