"""Numerical parity of an exported graph (or engine) against a reference, run through
the backends that ship.

The reference and the candidate are the runtime's own
:class:`~vrn.runtime.backends.base.Backend` objects, the classes ``vrn-live`` and
``vrn-reconstruct`` run (PyTorch:
:class:`~vrn.runtime.backends.torch_backend.TorchBackend`; an ONNX file:
:class:`~vrn.runtime.backends.onnxruntime_backend.OnnxRuntimeBackend`; an engine:
:class:`~vrn.runtime.backends.tensorrt_backend.TensorRTBackend`), driven the way
Polygraphy's ``Comparator`` drives its runners: same inputs, outputs compared. A bug
in a backend therefore fails the export's check instead of passing it.

Each comparison runs the same inputs through the reference and the candidate, one
image at a time and then the first few as one batch (which exercises the dynamic batch
dimension), and compares the occupancy volumes ``(N, D, H, W)`` float32:

- fp32 candidates: the largest absolute difference must stay under
  :data:`FP32_MAX_ABS`, on every input and the batch;
- fp16 candidates (the fp16 gate): the occupancy at 0.5 must overlap the fp32
  reference's with an IoU of at least :data:`FP16_MIN_IOU` on every *face crop*, and
  the batch must agree with the same images run one at a time (IoU of at least
  :data:`FP16_MIN_IOU`: it checks the batch dimension, not the precision). Random
  images only have to give finite volumes: fp16 error on a face is what matters, and
  random colour fields put much more of the volume near the level. The threshold
  comes from an fp16 emulation measured on real face crops (``docs/deploy.md``).

Inputs (:func:`parity_inputs`): a few seeded random images (smooth random colour fields
with pixel noise, so that the activations have image-like statistics) and real face
crops: the packaged sample photo's face cropped as the pipeline crops it, from the
detected box and from a wider and a shifted box (:func:`face_crop_variants`). White
noise is not used: through the released architecture it drives the instance norms'
inputs to means many times their spread, where ONNX Runtime's
``InstanceNormalization`` kernel (``x * s + (b - mean * s)``) is 2-3 times less
accurate than PyTorch's, and the fp32 difference reaches 0.8-1.1e-4 on its own.

A report whose target is not ``enforced`` (the exporter's choice for fp16 with
untrained weights, whose volume hovers around 0.5 so that occupancy flips on any
difference) still has to be :attr:`~ParityReport.sane`: finite and free of gross errors.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from typing import Protocol

import cv2
import numpy as np

from ..metrics import OCCUPANCY_LEVEL, occupancy_iou

FP32_MAX_ABS = 1e-4
# fp16 gate on face crops. An fp16 emulation on the CPU (every fp16 tensor rounded to
# fp16, fp32 accumulation: TensorRT's best case) against fp32 on 22 real face crops gave
# IoU >= 0.99977 with the default weights and >= 0.9943 (0.9979 on the sample photo)
# with a trained head active; 0.99 leaves room for kernels that accumulate in fp16
# (docs/deploy.md, "The fp16 gate").
FP16_MIN_IOU = 0.99
# Gross-error floors, checked even where the targets above are not enforced (untrained
# weights): a broken conversion (wrong types, overflow, garbage) falls far below them.
FP32_SANE_MAX_ABS = 1e-2
FP16_SANE_IOU = 0.95
ROW_KINDS = ("face", "random", "batch")
LANDMARKS_MAX_ABS_PX = 1e-2  # landmark stage: largest difference, 120-pixel crop frame


class Runner(Protocol):
    """What a parity check runs: a :class:`~vrn.runtime.backends.base.Backend` (or
    :class:`CachedRunner` around one). ``infer(image (N, C, S, S) float32, landmarks
    (N, 68, 3) float32 or None, on_device=False) -> (N, D, S, S)`` float32 NumPy."""

    def infer(self, batch, landmarks=None, *, on_device: bool | None = None): ...


class CachedRunner:
    """A runner that runs each distinct input once (a reference shared by several
    checks: the fp32 and fp16 graphs against PyTorch)."""

    def __init__(self, runner: Runner):
        self.runner = runner
        self._memo: dict = {}

    def infer(self, batch, landmarks=None, *, on_device: bool | None = None) -> np.ndarray:
        key = (batch.shape, batch.tobytes(), None if landmarks is None else landmarks.tobytes())
        if key not in self._memo:
            self._memo[key] = run(self.runner, batch, landmarks)
        return self._memo[key]


def run(runner: Runner, image: np.ndarray, landmarks: np.ndarray | None = None
        ) -> np.ndarray:
    """``runner``'s volumes ``(N, D, S, S)`` for ``image`` as a NumPy array."""
    return np.asarray(runner.infer(image, landmarks, on_device=False))


@dataclass
class ParityInput:
    """One named input batch: ``image`` ``(N, C, S, S)`` float32, RGB in [0, 1], and for
    a landmark-guided model ``landmarks`` ``(N, 68, 3)`` float32 crop pixels; ``kind``
    ``"face"`` (a real face crop) or ``"random"``."""

    label: str
    image: np.ndarray
    landmarks: np.ndarray | None = None
    kind: str = "random"


@dataclass
class ParityRow:
    """Differences between reference and candidate volumes for one input (``kind``
    ``"face"`` or ``"random"``), or for the batch (``"batch"``)."""

    label: str
    batch: int
    max_abs: float
    mean_abs: float
    iou: float
    kind: str = "face"


@dataclass
class ParityReport:
    """A reference-vs-candidate comparison over all inputs."""

    name: str  # e.g. "ONNX fp32 vs PyTorch"
    precision: str  # "fp32" or "fp16": selects the criterion
    rows: list[ParityRow] = field(default_factory=list)
    enforced: bool = True  # whether missing the target fails (else only gross errors do)
    accepted: bool = False  # kept although it missed the target (--accept-parity)

    @property
    def max_abs(self) -> float:
        return max(row.max_abs for row in self.rows)

    @property
    def mean_abs(self) -> float:
        return float(np.mean([row.mean_abs for row in self.rows]))

    @property
    def min_iou(self) -> float:
        """The smallest IoU over every row (random inputs included)."""
        return min(row.iou for row in self.rows)

    @property
    def gated_rows(self) -> list[ParityRow]:
        """The rows the fp16 IoU target applies to: the face crops and the batch; every
        row when there is no face crop (a model without RGB input)."""
        if not any(row.kind == "face" for row in self.rows):
            return list(self.rows)
        return [row for row in self.rows if row.kind != "random"]

    @property
    def gate_iou(self) -> float:
        """The smallest IoU over :attr:`gated_rows` (what the fp16 gate compares)."""
        return min((row.iou for row in self.gated_rows), default=float("nan"))

    @property
    def criterion(self) -> str:
        if self.precision == "fp32":
            return f"max |diff| < {FP32_MAX_ABS:g}"
        where = ("face crops and batch; random inputs: finite"
                 if any(row.kind == "face" for row in self.rows) else "every input")
        return f"occupancy IoU at {OCCUPANCY_LEVEL} >= {FP16_MIN_IOU} on {where}"

    @property
    def passed(self) -> bool:
        """Whether the candidate meets the target (:data:`FP32_MAX_ABS` or
        :data:`FP16_MIN_IOU`)."""
        return self._meets(FP32_MAX_ABS, FP16_MIN_IOU)

    @property
    def sane(self) -> bool:
        """Whether the candidate is free of gross errors (finite, and within
        :data:`FP32_SANE_MAX_ABS` or :data:`FP16_SANE_IOU`)."""
        return self._meets(FP32_SANE_MAX_ABS, FP16_SANE_IOU)

    def _meets(self, max_abs: float, min_iou: float) -> bool:
        if not self.rows or not all(np.isfinite([r.max_abs for r in self.rows])):
            return False
        if self.precision == "fp32":
            return self.max_abs < max_abs
        return self.gate_iou >= min_iou

    def to_dict(self) -> dict:
        return {"name": self.name, "precision": self.precision, "criterion": self.criterion,
                "passed": self.passed, "enforced": self.enforced, "sane": self.sane,
                "accepted": self.accepted, "max_abs": self.max_abs,
                "mean_abs": self.mean_abs, "min_iou": self.min_iou,
                "gate_iou": self.gate_iou, "rows": [asdict(row) for row in self.rows]}


def random_images(count: int, channels: int, size: int, *, seed: int = 0) -> list[ParityInput]:
    """``count`` seeded random images ``(1, channels, size, size)`` float32 in [0, 1]:
    bicubic-upsampled 8x8 random colour fields plus Gaussian pixel noise (sigma 0.05)."""
    rng = np.random.default_rng(seed)
    images = []
    for k in range(count):
        coarse = rng.random((8, 8, channels), dtype=np.float32)
        field_ = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        field_ = field_.reshape(size, size, channels)
        noisy = field_ + 0.05 * rng.standard_normal(field_.shape, dtype=np.float32)
        image = np.clip(noisy, 0.0, 1.0).transpose(2, 0, 1)[None]
        images.append(ParityInput(f"random {k}", np.ascontiguousarray(image, np.float32)))
    return images


def sample_photo_and_boxes() -> tuple[np.ndarray, list]:
    """The packaged sample photo ``(H, W, 3)`` uint8 RGB and three face boxes in it:
    the detected one, a wider one and a shifted one (the landmark stage then finds other
    landmarks, and the crops differ as the pipeline's do from frame to frame)."""
    from ..image_io import load_image, sample_image_path
    from ..runtime.detect import FaceBox, create_detector

    photo = load_image(sample_image_path())
    box = create_detector()(photo)[0]
    return photo, [box, FaceBox(box.x - 15, box.y - 15, box.w + 30, box.h + 30),
                   FaceBox(box.x + 8, box.y - 6, box.w, box.h)]


@functools.lru_cache(maxsize=4)
def _face_crop_variants(size: int) -> tuple[np.ndarray, np.ndarray]:
    from ..runtime.crop import to_network_input
    from ..runtime.landmarks import LandmarkStage
    from ..runtime.pipeline import landmark_crops

    photo, boxes = sample_photo_and_boxes()
    _, crops, landmarks = landmark_crops(photo, LandmarkStage()(photo, boxes), size)
    return to_network_input(crops), landmarks


def face_crop_variants(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The real face crops of the fp16 gate and ``benchmarks/gpu_check.py``: the sample
    photo's face in the boxes of :func:`sample_photo_and_boxes`, through the pipeline's
    landmark stage and landmark crop: ``(3, 3, size, size)`` float32 in [0, 1] and
    ``(3, 68, 3)`` float32 landmarks in crop pixels."""
    crops, landmarks = _face_crop_variants(int(size))
    return crops.copy(), landmarks.copy()


def face_images(size: int, face_crops) -> list[ParityInput]:
    """Real face crops as parity inputs: ``face_crops(size)`` returns ``(crops (N, 3,
    size, size) float32, landmarks (N, 68, 3) float32)`` as the pipeline makes them
    (:func:`face_crop_variants`, or :func:`vrn.runtime.pipeline.sample_face_crops`);
    image ``(1, 3, size, size)`` and landmarks ``(1, 68, 3)`` each."""
    batch, landmarks = face_crops(size)
    return [ParityInput(f"face {k}", crop[None], lm[None], kind="face")
            for k, (crop, lm) in enumerate(zip(batch, landmarks))]


def random_landmarks(count: int, size: int, *, seed: int = 0) -> np.ndarray:
    """``(count, 68, 3)`` float32 seeded random crop pixels ``(x, y, z)`` about the
    crop's centre, spread over a face-sized cube (90 of 192 pixels)."""
    rng = np.random.default_rng(seed)
    spread = rng.random((count, 68, 3)) - 0.5
    return ((size - 1) / 2 + spread * (90.0 * size / 192)).astype(np.float32)


def parity_inputs(channels: int, size: int, *, random_count: int = 3, faces=None,
                  seed: int = 0, guided: bool = False) -> list[ParityInput]:
    """The standard parity inputs: ``random_count`` random images, then, with ``faces``
    (a ``face_crops`` function for :func:`face_images`), the face crop(s) (only for
    3-channel inputs); ``guided``: each with landmarks (random ones for the random
    images, the landmark stage's for the faces)."""
    inputs = random_images(random_count, channels, size, seed=seed)
    if guided:
        for k, item in enumerate(inputs):
            item.landmarks = random_landmarks(1, size, seed=seed + 1000 + k)
    if faces is not None and channels == 3:
        inputs += face_images(size, faces)
    if not guided:
        for item in inputs:
            item.landmarks = None
    return inputs


def compare(reference: np.ndarray, candidate: np.ndarray, label: str, kind: str = "face"
            ) -> ParityRow:
    """Differences between two volume batches ``(N, D, H, W)`` float32."""
    if reference.shape != candidate.shape:
        raise ValueError(f"{label}: candidate volume shape {candidate.shape} differs from "
                         f"the reference {reference.shape}")
    diff = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    iou = occupancy_iou(reference, candidate, level=OCCUPANCY_LEVEL)
    max_abs = float(diff.max()) if np.isfinite(candidate).all() else float("inf")
    return ParityRow(label=label, batch=int(reference.shape[0]), max_abs=max_abs,
                     mean_abs=float(diff.mean()), iou=float(iou), kind=kind)


def check_parity(reference: Runner, candidate: Runner, inputs: list[ParityInput], *,
                 name: str, precision: str, max_batch: int = 1,
                 enforced: bool = True) -> ParityReport:
    """Run ``inputs`` through both runners (backends) and compare.

    Each input runs alone; then, when ``max_batch > 1``, the first ``max_batch`` inputs
    run through the candidate as one batch (row ``"batch of N"``), compared with their
    single-image volumes: the reference's for fp32, the candidate's own for fp16 (the
    batch dimension is checked there, the precision by the single images).
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    report = ParityReport(name=name, precision=precision, enforced=enforced)
    singles = []
    for item in inputs:
        ref = run(reference, item.image, item.landmarks)
        out = run(candidate, item.image, item.landmarks)
        singles.append(ref if precision == "fp32" else out)
        report.rows.append(compare(ref, out, item.label, item.kind))
    batched = inputs[:max_batch]
    if len(batched) > 1:
        landmarks = None
        if batched[0].landmarks is not None:
            landmarks = np.concatenate([item.landmarks for item in batched])
        out = run(candidate, np.concatenate([item.image for item in batched]), landmarks)
        report.rows.append(compare(np.concatenate(singles[:len(batched)]), out,
                                   f"batch of {len(batched)}", "batch"))
    return report


def landmark_difference(reference, candidate, crops: np.ndarray) -> float:
    """Largest absolute difference, in crop pixels, between the landmarks of two
    landmark-stage runners (:class:`~vrn.runtime.landmarks.TorchLandmarkRunner` and its
    kin: ``runner(crops) -> (N, 68, 3)`` float32) for ``crops`` ``(N, 3, 120, 120)``
    float32; ``inf`` when the candidate's are not all finite. The check passes under
    :data:`LANDMARKS_MAX_ABS_PX`."""
    expected, got = np.asarray(reference(crops)), np.asarray(candidate(crops))
    if expected.shape != got.shape:
        raise ValueError(f"candidate landmarks {got.shape} differ in shape from the "
                         f"reference {expected.shape}")
    return float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")


def format_table(reports: list[ParityReport]) -> str:
    """A small fixed-width table: one line per input and comparison, then a verdict."""
    lines = [f"{'comparison':<32} {'input':<12} {'N':>2} {'max|diff|':>10} "
             f"{'mean|diff|':>10} {'IoU@0.5':>8}"]
    for report in reports:
        for row in report.rows:
            lines.append(f"{report.name:<32} {row.label:<12} {row.batch:>2} "
                         f"{row.max_abs:>10.2e} {row.mean_abs:>10.2e} {row.iou:>8.5f}")
        verdict = "pass" if report.passed else ("FAIL" if report.enforced else "below target")
        if report.accepted:
            verdict += ", kept with --accept-parity"
        lines.append(f"{report.name:<32} -> {verdict} ({report.criterion})")
    return "\n".join(lines)
