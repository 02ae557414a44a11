"""``vrn-bench``'s measurements: the whole per-frame pipeline for every backend,
precision and batch size available, with the reference implementations beside ours.

For each configuration (backend x device x precision, :mod:`vrn.bench.plan`) and batch
size ``B``, every frame is: ``decode`` (the source image decoded from its bytes, or the
next video frame), ``detect``, then :class:`vrn.runtime.pipeline.Reconstructor` on ``B``
copies of the detected face (``landmarks``, ``crop``, ``infer``, ``isosurface``,
``colour`` with back-mapping into the photo), then ``render``
(:func:`vrn.runtime.render.overlay`). The landmark stage runs where the pipeline runs it
(:func:`~vrn.bench.artifacts.landmark_backend`): on ONNX Runtime beside an onnxruntime
configuration, on PyTorch otherwise (the TensorRT engines built here have no landmark
engine beside them). Each stage is timed the pipeline's own way
(:class:`vrn.runtime.timing.StageTimer`), the frame as a whole by the wall clock
(``end_to_end``), and ``crop_to_mesh`` is crop through colour (:mod:`vrn.bench.timing`).

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
synthetic face-like volume. Reduced-precision configurations are validated by occupancy
IoU against fp32 on face crops (:mod:`vrn.bench.validation`); the speed-ups and goals
come from :mod:`vrn.bench.goals`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailableError, NoFaceError, VRNError
from ..metrics import MIN_IOU, summarize
from .artifacts import BackendFactory, LandmarkStages
from .goals import goals, speedups
from .models import describe_model, load_bench_model
from .plan import (BACKENDS, MODELS, PRECISIONS, REFERENCE_PRECISION, BenchSettings, Combo,
                   plan, tensorrt_unavailable_reason)
from .source import FrameSource
from .system import load_average, machine_name, system_info
from .timing import (FRAME_STAGES, time_device_inference, time_inference,
                     time_isosurface_references, time_pipeline)

# The command line reads these here (vrn.cli.bench).
__all__ = ["BACKENDS", "MODELS", "PRECISIONS", "SCHEMA", "BenchSettings", "run_benchmark"]

SCHEMA = "vrn-bench/1"


@dataclass
class _Inputs:
    """What every configuration is measured on: the frames, the detector, the landmark
    stages, the validation face crops ``(N, 3, S, S)`` float32 with their landmarks
    ``(N, 68, 3)`` crop pixels and names, and the int8 calibration crops and landmarks
    (other crops of the same photos: :func:`~vrn.bench.validation.calibration_crops`)."""

    source: FrameSource
    detector: object
    landmark_stages: LandmarkStages
    crops: np.ndarray
    landmarks: np.ndarray
    crop_names: list[str]
    calibration: np.ndarray
    calibration_landmarks: np.ndarray


def _validation_photos(settings: BenchSettings, source: FrameSource) -> list:
    """The source image (when it is one), the sample photo and the ``validate_with``
    photos, in that order."""
    from ..image_io import sample_image_path
    from .validation import image_files

    sample = sample_image_path()
    images = [source.path] if source.kind == "image" else []
    if not images or source.path.resolve() != sample.resolve():
        images.append(sample)
    return images + image_files(list(settings.validate_with))


def _inputs(settings: BenchSettings, source: FrameSource, size: int) -> _Inputs:
    from ..runtime.detect import create_detector
    from .validation import calibration_crops, face_crops

    detector = create_detector()
    stages = LandmarkStages(settings.cache_dir)
    photos = _validation_photos(settings, source)
    crops, landmarks, names = face_crops(photos, detector=detector, landmark_stage=stages(),
                                         size=size)
    if len(crops) == 0:
        raise NoFaceError("no face found in the validation photos (the sample photo "
                          "included); cannot validate or calibrate")
    calibration, calibration_landmarks = calibration_crops(
        photos, detector=detector, landmark_stage=stages(), size=size)
    if len(calibration) == 0:
        raise NoFaceError("no face found in the mirrored validation photos; cannot "
                          "calibrate int8")
    return _Inputs(source, detector, stages, crops, landmarks, names, calibration,
                   calibration_landmarks)


def _repeat_first(crops: np.ndarray, landmarks: np.ndarray, batch: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``batch`` copies of the first crop ``(batch, 3, S, S)`` and of its landmarks
    ``(batch, 68, 3)``."""
    return crops[:1].repeat(batch, axis=0), landmarks[:1].repeat(batch, axis=0)


def _measure(backend, inputs: _Inputs, combo: Combo, batch: int, settings: BenchSettings,
             tick=None) -> dict:
    """One entry of ``report["runs"]``: the pipeline (with the landmark stage that goes
    with ``backend``) timed frame by frame, and on CUDA the network with CUDA events
    (the network alone is timed later, for all configurations together, by
    :func:`~vrn.bench.timing.time_inference`)."""
    from ..runtime.pipeline import Reconstructor

    landmark_stage = inputs.landmark_stages.for_backend(backend)
    reconstructor = Reconstructor(backend=backend, detector=inputs.detector,
                                  landmark_stage=landmark_stage, all_faces=True,
                                  level=settings.level)
    timed = time_pipeline(reconstructor, inputs.source, batch=batch, frames=settings.frames,
                          warmup=settings.warmup, tick=tick)
    samples = timed["samples"]
    run = {**combo.as_dict(), "batch": batch, "label": f"{combo.label} b{batch}",
           "reference": combo.is_reference, "describe": backend.describe(),
           "landmark_stage": landmark_stage.describe(),
           "stages": {s: summarize(samples[s]) for s in FRAME_STAGES},
           "crop_to_mesh": summarize(samples["crop_to_mesh"]),
           "end_to_end": summarize(samples["end_to_end"]),
           "mesh": timed["mesh"], "missed_detections": timed["missed_detections"]}
    mean_s = run["end_to_end"]["mean"] / 1e3
    run["throughput"] = {"frames_per_s": 1.0 / mean_s, "faces_per_s": batch / mean_s}
    gpu = time_device_inference(backend, *_repeat_first(inputs.crops, inputs.landmarks, batch),
                                frames=settings.frames, warmup=settings.warmup)
    if gpu is not None:
        run["gpu"] = {phase: summarize(v) for phase, v in gpu.items()}
    return run


class _Session:
    """The configurations of one run, measured in turn: ``runs``, ``validation`` (IoU
    against the CPU fp32 reference, whose volumes are ``reference_volumes``
    ``(N, D, H, W)``), ``unavailable``, and ``built`` (the backends kept for the
    interleaved timing of the networks alone).

    ``validation_factory``, when given, builds each configuration again for another
    model (the trained package default, when the full architecture is measured with
    random weights: IoU on random weights says nothing about a precision), and the IoU
    is taken on that model's volumes instead."""

    def __init__(self, settings: BenchSettings, inputs: _Inputs, factory: BackendFactory,
                 unavailable: list[dict], progress,
                 validation_factory: BackendFactory | None = None):
        self.settings, self.inputs, self.factory = settings, inputs, factory
        self.validation_factory = validation_factory
        self.progress = progress
        self.runs: list[dict] = []
        self.validation: list[dict] = []
        self.unavailable = unavailable
        self.built: dict = {}
        self.reference_volumes: np.ndarray | None = None
        self.validation_volumes: np.ndarray | None = None

    def _volumes(self, backend) -> np.ndarray:
        """``backend``'s volumes ``(N, D, H, W)`` for the validation crops, one by one."""
        inputs = self.inputs
        return np.stack([backend.infer(inputs.crops[i:i + 1], inputs.landmarks[i:i + 1])[0]
                         for i in range(len(inputs.crops))])

    def _validate(self, combo: Combo, backend) -> dict:
        """IoU of ``combo`` against fp32: of ``backend`` itself, or of ``combo`` built
        for the validation model."""
        from .validation import validate_against_reference

        inputs, level = self.inputs, self.settings.level
        if self.validation_factory is None:
            return validate_against_reference(backend, self.reference_volumes, inputs.crops,
                                              inputs.landmarks, level=level)
        check = validate_against_reference(self.validation_factory.build(combo),
                                           self.validation_volumes, inputs.crops,
                                           inputs.landmarks, level=level)
        return {**check, "model": "validation model"}

    def measure(self, combo: Combo) -> None:
        """Build, validate and time ``combo``; a failure is recorded in ``unavailable``
        (except for the CPU reference, which every other figure needs)."""
        settings = self.settings
        cpu_reference = combo == Combo("torch", "cpu", REFERENCE_PRECISION)
        per_combo = len(settings.batches) * (settings.warmup + settings.frames)
        try:
            backend = self.factory.build(combo)
        except (BackendUnavailableError, ImportError, VRNError) as exc:
            if cpu_reference:
                raise
            self.unavailable.append({**combo.as_dict(), "reason": str(exc)})
            self.progress.update(per_combo)
            return
        check = None
        try:
            if cpu_reference:
                self.reference_volumes = self._volumes(backend)
                if self.validation_factory is not None:
                    self.validation_volumes = self._volumes(
                        self.validation_factory.build(combo))
            else:
                check = self._validate(combo, backend)
            measured = [_measure(backend, self.inputs, combo, batch, settings,
                                 tick=self.progress.update) for batch in settings.batches]
        except Exception as exc:
            if cpu_reference:
                raise
            self.unavailable.append({**combo.as_dict(), "reason": "failed while measuring: "
                                     f"{type(exc).__name__}: {exc}"})
            return
        self.built[combo] = backend
        if check is not None:
            self.validation.append({**combo.as_dict(), **check})
        self.runs.extend(measured)

    def time_networks_alone(self) -> None:
        """Every run's ``infer_only``: the networks alone, interleaved round by round."""
        inputs, settings = self.inputs, self.settings
        keys = {(Combo(r["backend"], r["device"], r["precision"]), r["batch"]): r
                for r in self.runs}
        alone = time_inference(
            {key: self.built[key[0]] for key in keys},
            {key: _repeat_first(inputs.crops, inputs.landmarks, key[1]) for key in keys},
            frames=settings.frames, warmup=settings.warmup)
        for key, run in keys.items():
            run["infer_only"] = summarize(alone[key])
        self.built.clear()

    def isosurface_references(self) -> dict:
        """The isosurface references on the network's output for the first crop and on
        two synthetic volumes: a face slab in the front part of the depth range, as the
        network makes it, and a face-like volume filled from a back plane."""
        from .isosurface import face_like_volume, vrn_shaped_volume

        first = self.reference_volumes[0]
        volumes = {f"network output for {self.inputs.crop_names[0]}": first,
                   "VRN-shaped (synthetic)": vrn_shaped_volume(first.shape),
                   "face-like (synthetic)": face_like_volume(first.shape)}
        return time_isosurface_references(volumes, level=self.settings.level,
                                          runs=self.settings.isosurface_runs,
                                          budget_s=self.settings.isosurface_budget_s)


def _validation_model(model, settings: BenchSettings, inputs: _Inputs):
    """``(factory, description)`` of the model the IoU checks run on: ``(None, None)``
    for the measured model itself; the trained package default for ``--model full``
    (the released architecture with random weights), when the default is trained."""
    from ..model import load_model, model_info

    if settings.weights is not None or settings.model != "full" or model_info(model).trained:
        return None, None
    default = load_model(None)
    info = model_info(default)
    if not info.trained or info.config.input_size != model_info(model).config.input_size:
        return None, None
    factory = BackendFactory(default, calibration=inputs.calibration,
                             calibration_landmarks=inputs.calibration_landmarks,
                             cache_dir=settings.cache_dir, max_batch=1)
    return factory, describe_model(default, "package default")


def _settings_block(settings: BenchSettings, inputs: _Inputs) -> dict:
    return {"model": "weights" if settings.weights is not None else settings.model,
            "backends": list(settings.backends), "precisions": list(settings.precisions),
            "batches": list(settings.batches), "frames": settings.frames,
            "warmup": settings.warmup, "source": str(inputs.source.path),
            "source_kind": inputs.source.kind, "level": settings.level,
            "validation_crops": inputs.crop_names, "min_iou": MIN_IOU,
            "calibration_crops": len(inputs.calibration)}


def run_benchmark(settings: BenchSettings) -> dict:
    """Measure everything :class:`~vrn.bench.plan.BenchSettings` asks for and return
    the report, a JSON-ready dict (``schema`` :data:`SCHEMA`):

    - ``machine``, ``system`` (:func:`vrn.bench.system.system_info` plus
      ``load_average_end``), ``model`` (:func:`~vrn.bench.models.describe_model`),
      ``settings``;
    - ``runs``: per configuration and batch, ``stages``
      (:data:`~vrn.bench.timing.FRAME_STAGES` -> :func:`~vrn.metrics.summarize` stats
      in ms), ``crop_to_mesh``, ``end_to_end``, ``infer_only`` (the network alone),
      ``throughput``, ``mesh`` (vertices and triangles per face), ``gpu``
      (:data:`~vrn.bench.timing.GPU_PHASES`, CUDA only), ``describe`` and
      ``landmark_stage`` (what ran the network and the landmarks);
    - ``speedups`` (:func:`~vrn.bench.goals.speedups`), ``validation`` (IoU against
      fp32 per configuration; with ``--model full`` on ``validation_model``, the
      trained default, else ``validation_model`` is ``None``),
      ``references`` (``isosurface``), ``goals`` (:func:`~vrn.bench.goals.goals`),
      ``unavailable`` (configuration and reason), ``prepare_s`` and
      ``reused_from_cache`` (exported, quantised and built files).
    """
    from tqdm import tqdm

    from ..runtime.backends import cuda_available

    system = system_info()
    source = FrameSource(settings.source)
    model, model_source = load_bench_model(settings)
    model_block = describe_model(model, model_source)
    inputs = _inputs(settings, source, model.config.input_size)
    combos, unavailable = plan(settings, cuda=cuda_available(),
                               tensorrt=tensorrt_unavailable_reason())
    factory = BackendFactory(model, calibration=inputs.calibration,
                             calibration_landmarks=inputs.calibration_landmarks,
                             cache_dir=settings.cache_dir, max_batch=max(settings.batches))
    total = len(combos) * len(settings.batches) * (settings.warmup + settings.frames)
    progress = tqdm(total=total, disable=not settings.progress, unit="frame",
                    dynamic_ncols=True, leave=False)
    validation_factory, validation_model = _validation_model(model, settings, inputs)
    session = _Session(settings, inputs, factory, unavailable, progress, validation_factory)
    try:
        for combo in combos:
            progress.set_description(combo.label)
            session.measure(combo)
        progress.set_description("networks alone")
        session.time_networks_alone()
        progress.set_description("isosurface references")
        references = {"isosurface": session.isosurface_references()}
    finally:
        progress.close()
        source.close()
    report = {"schema": SCHEMA, "machine": machine_name(system),
              "system": {**system, "load_average_end": load_average()},
              "model": model_block, "settings": _settings_block(settings, inputs),
              "validation_model": validation_model,
              "prepare_s": dict(factory.prepare_s),
              "reused_from_cache": list(factory.reused), "runs": session.runs,
              "unavailable": session.unavailable, "validation": session.validation,
              "references": references}
    report["speedups"] = speedups(report)
    report["goals"] = goals(report)
    return report
