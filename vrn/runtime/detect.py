"""Face detection with YuNet (``cv2.FaceDetectorYN``), whose model ships with the package.

Boxes are in photo pixels: ``x`` right, ``y`` down, ``(x, y)`` the top-left corner. A box
may reach past the photo's edge when a face is cut off by it.

YuNet's cost grows with the pixel count and it misses faces of under about 10 px, so
photos are resized before detection: a longer side over ``DETECT_MAX_SIDE`` is shrunk
to it, one under ``DETECT_MIN_SIDE`` enlarged to it. Boxes are mapped back to the photo.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import ImageError, WeightsError

DEFAULT_MODEL = (Path(__file__).resolve().parent.parent / "model" / "weights_data"
                 / "face_detection_yunet_2023mar.onnx")

# Measured on the development photos (see YuNetFaceDetector): true faces score 0.84-0.95
# (a blurred background face 0.69), false ones at most 0.35.
DEFAULT_SCORE_THRESHOLD = 0.6
DEFAULT_NMS_THRESHOLD = 0.3
DEFAULT_TOP_K = 5000

DETECT_MAX_SIDE = 1280  # 3913x1901 photo: 560 ms at full size, 60 ms at 1280
DETECT_MIN_SIDE = 160   # a 64 px face photo scores 0.37 as is, 0.83 at 160
# OpenCV's YuNet returns garbage boxes (score 1, non-finite or zero size) for images
# with a side of 32 px or less; such images are padded (bottom and right) to this.
_PAD_TO = 64


@dataclass(frozen=True)
class FaceBox:
    """A detected face: top-left ``(x, y)``, size ``(w, h)`` in photo pixels, a score
    (YuNet's confidence in [0, 1]; higher is surer), and the detector kind.

    ``points``: YuNet's five landmarks as ``(x, y)`` photo pixels, in the order right
    eye, left eye, nose tip, right mouth corner, left mouth corner (the subject's right
    and left), or ``None`` (e.g. a box from the tracker).
    """

    x: float
    y: float
    w: float
    h: float
    score: float = 1.0
    kind: str = "frontal"
    points: tuple[tuple[float, float], ...] | None = None

    @property
    def center(self) -> tuple[float, float]:
        return self.x + self.w / 2.0, self.y + self.h / 2.0

    def as_array(self) -> np.ndarray:
        """``(4,)`` float64 ``[x, y, w, h]``."""
        return np.array([self.x, self.y, self.w, self.h], dtype=np.float64)


def iou(a: FaceBox, b: FaceBox) -> float:
    """Intersection over union of two boxes."""
    ix = max(0.0, min(a.x + a.w, b.x + b.w) - max(a.x, b.x))
    iy = max(0.0, min(a.y + a.h, b.y + b.h) - max(a.y, b.y))
    inter = ix * iy
    union = a.w * a.h + b.w * b.h - inter
    return inter / union if union > 0 else 0.0


class YuNetFaceDetector:
    """YuNet face detector: ``detector(image) -> list[FaceBox]``, largest face first.

    Parameters
    ----------
    model_path : path, optional
        A YuNet ``.onnx`` file; default: the shipped ``face_detection_yunet_2023mar.onnx``.
    score_threshold : float
        Least confidence of a face. On the development photos true faces scored
        0.84-0.95 (a blurred, half-hidden background face 0.70) and false ones at most
        0.35, so 0.6 sits in the gap.
    nms_threshold : float
        Overlapping boxes with an IoU above this are merged (non-maximum suppression).
    top_k : int
        Candidates kept before non-maximum suppression.

    One instance may be shared by several threads: each thread runs its own
    ``cv2.FaceDetectorYN`` (an OpenCV detector keeps per-call state), built on first use
    from the model bytes read here. Raises :class:`~vrn.errors.WeightsError` for a
    missing or unreadable model file.
    """

    def __init__(self, model_path: str | os.PathLike | None = None, *,
                 score_threshold: float = DEFAULT_SCORE_THRESHOLD,
                 nms_threshold: float = DEFAULT_NMS_THRESHOLD, top_k: int = DEFAULT_TOP_K):
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        if not self.model_path.is_file():
            raise WeightsError(f"{self.model_path}: YuNet model file not found")
        try:
            self._model = np.fromfile(self.model_path, dtype=np.uint8)
        except OSError as exc:
            raise WeightsError(f"{self.model_path}: cannot read the YuNet model "
                               f"({exc.strerror})") from None
        self._local = threading.local()
        self._cv_detector()  # fail here, not on the first photo

    def _cv_detector(self):
        """This thread's ``cv2.FaceDetectorYN``."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            try:
                detector = cv2.FaceDetectorYN.create(
                    "onnx", self._model, np.zeros(0, np.uint8), (320, 320),
                    self.score_threshold, self.nms_threshold, self.top_k)
            except cv2.error as exc:
                raise WeightsError(f"{self.model_path}: not a YuNet ONNX model (OpenCV: "
                                   f"{exc.err.strip()})") from None
            self._local.detector = detector
        return detector

    def __call__(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in ``image`` ``(H, W, 3)`` uint8 RGB (also ``(H, W)``, 1, 2 or 4
        channels, uint16 or float in [0, 1]), largest first."""
        bgr = _to_bgr_uint8(image)
        h, w = bgr.shape[:2]
        if h == 0 or w == 0:
            return []
        scale = 1.0
        if max(h, w) > DETECT_MAX_SIDE:
            scale = DETECT_MAX_SIDE / max(h, w)
        elif max(h, w) < DETECT_MIN_SIDE:
            scale = DETECT_MIN_SIDE / max(h, w)
        if scale != 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
            bgr = cv2.resize(bgr, size, interpolation=interp)
        sh, sw = bgr.shape[:2]
        if min(sh, sw) < _PAD_TO:
            bgr = cv2.copyMakeBorder(bgr, 0, max(0, _PAD_TO - sh), 0, max(0, _PAD_TO - sw),
                                     cv2.BORDER_CONSTANT, value=(0, 0, 0))
        detector = self._cv_detector()
        detector.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, faces = detector.detect(bgr)
        if faces is None:
            return []
        # faces: (N, 15) float32: x, y, w, h, five (x, y) landmarks, score
        sx, sy = sw / w, sh / h
        boxes = []
        for f in faces.astype(np.float64):
            cx, cy = f[0] + f[2] / 2, f[1] + f[3] / 2
            if (not np.isfinite(f).all() or f[2] <= 0 or f[3] <= 0
                    or not (0 <= cx < sw and 0 <= cy < sh)):
                continue  # a centre in the padding, or one of OpenCV's garbage rows
            points = tuple((float(px / sx), float(py / sy)) for px, py in f[4:14].reshape(5, 2))
            boxes.append(FaceBox(float(f[0] / sx), float(f[1] / sy), float(f[2] / sx),
                                 float(f[3] / sy), float(f[14]), "yunet", points))
        return sorted(boxes, key=lambda b: -b.w * b.h)


def create_detector(model_path: str | os.PathLike | None = None, **kwargs
                    ) -> YuNetFaceDetector:
    """The face detector: YuNet from ``model_path`` (default: the shipped model);
    ``kwargs`` go to :class:`YuNetFaceDetector` (``score_threshold``, ...)."""
    return YuNetFaceDetector(model_path, **kwargs)


def _to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` (C = 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA) uint8,
    uint16 or float [0, 1] -> contiguous ``(H, W, 3)`` uint8 BGR."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or not 1 <= image.shape[2] <= 4:
        raise ImageError(f"face detection needs an (H, W) or (H, W, 1-4) image, "
                         f"got shape {image.shape}")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    elif image.dtype.kind == "f":
        image = np.clip(np.nan_to_num(image) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(f"face detection: unsupported pixel type {image.dtype}")
    if image.shape[2] in (1, 2):  # gray, gray + alpha
        return np.ascontiguousarray(np.repeat(image[..., :1], 3, axis=2))
    return np.ascontiguousarray(image[..., 2::-1])  # RGB(A) -> BGR
