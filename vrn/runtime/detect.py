"""Face detection: OpenCV Haar cascades (shipped with opencv-python), or YuNet
(``cv2.FaceDetectorYN``) when the user gives its ``.onnx`` model file.

Boxes are in photo pixels: ``x`` right, ``y`` down, ``(x, y)`` the top-left corner.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import VRNError

# Haar works best on faces of 40-400 px: small photos are enlarged, big ones shrunk.
_DETECT_MIN_SIDE = 480
_DETECT_MAX_SIDE = 800
_MAX_UPSCALE = 4.0


@dataclass(frozen=True)
class FaceBox:
    """A detected face: top-left ``(x, y)``, size ``(w, h)`` in photo pixels, a score
    (cascade level weight or YuNet confidence; higher is surer), and the detector kind."""

    x: float
    y: float
    w: float
    h: float
    score: float = 1.0
    kind: str = "frontal"

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


def non_max_suppression(boxes: list[FaceBox], threshold: float = 0.3) -> list[FaceBox]:
    """Keep the highest-scoring of overlapping boxes; result sorted by score."""
    kept: list[FaceBox] = []
    for box in sorted(boxes, key=lambda b: -b.score):
        if all(iou(box, k) < threshold for k in kept):
            kept.append(box)
    return kept


class HaarFaceDetector:
    """Frontal Haar cascade, with the profile cascade (both directions) as a fallback
    when no frontal face is found.

    ``min_score`` drops weak frontal detections (the cascade's level weight), which are
    mostly false positives on textured backgrounds.
    """

    def __init__(self, *, min_neighbors: int = 4, min_score: float = 1.0,
                 min_face_fraction: float = 0.04):
        root = Path(cv2.data.haarcascades)
        self._frontal = _load_cascade(root / "haarcascade_frontalface_default.xml")
        self._profile = _load_cascade(root / "haarcascade_profileface.xml")
        self.min_neighbors = min_neighbors
        self.min_score = min_score
        self.min_face_fraction = min_face_fraction

    def __call__(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in ``image`` ``(H, W, 3)`` uint8 RGB, largest first."""
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        side = max(gray.shape)
        scale = 1.0
        if side < _DETECT_MIN_SIDE:
            scale = min(_MAX_UPSCALE, _DETECT_MIN_SIDE / side)
        elif side > _DETECT_MAX_SIDE:
            scale = _DETECT_MAX_SIDE / side
        if scale != 1.0:
            interp = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=interp)
        gray = cv2.equalizeHist(gray)
        min_size = max(20, int(self.min_face_fraction * min(gray.shape)))
        boxes = [b for b in self._run(self._frontal, gray, min_size, "frontal", False)
                 if b.score >= self.min_score]
        if not boxes:
            boxes = (self._run(self._profile, gray, min_size, "profile", False)
                     + self._run(self._profile, gray, min_size, "profile", True))
        boxes = non_max_suppression(boxes)
        boxes = [FaceBox(b.x / scale, b.y / scale, b.w / scale, b.h / scale, b.score, b.kind)
                 for b in boxes]
        return sorted(boxes, key=lambda b: -b.w * b.h)

    def _run(self, cascade, gray, min_size, kind, flipped) -> list[FaceBox]:
        src = cv2.flip(gray, 1) if flipped else gray
        rects, _, weights = cascade.detectMultiScale3(
            src, scaleFactor=1.1, minNeighbors=self.min_neighbors,
            minSize=(min_size, min_size), outputRejectLevels=True)
        width = gray.shape[1]
        boxes = []
        for (x, y, w, h), weight in zip(np.asarray(rects).reshape(-1, 4),
                                        np.asarray(weights).reshape(-1)):
            if flipped:
                x = width - x - w
            boxes.append(FaceBox(float(x), float(y), float(w), float(h), float(weight), kind))
        return boxes


class YuNetFaceDetector:
    """YuNet (``cv2.FaceDetectorYN``) from a user-supplied ``.onnx`` model file."""

    def __init__(self, model_path: str | os.PathLike, *, score_threshold: float = 0.7):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise VRNError(f"{model_path}: YuNet model file not found")
        try:
            self._detector = cv2.FaceDetectorYN.create(str(model_path), "", (320, 320),
                                                       score_threshold)
        except cv2.error as exc:
            raise VRNError(f"{model_path}: cannot load YuNet model ({exc.err})") from None

    def __call__(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in ``image`` ``(H, W, 3)`` uint8 RGB, largest first."""
        h, w = image.shape[:2]
        self._detector.setInputSize((w, h))
        _, faces = self._detector.detect(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        if faces is None:
            return []
        boxes = [FaceBox(float(f[0]), float(f[1]), float(f[2]), float(f[3]), float(f[-1]),
                         "yunet") for f in faces]
        return sorted(boxes, key=lambda b: -b.w * b.h)


def create_detector(yunet_model: str | os.PathLike | None = None):
    """YuNet when a model file is given, else the Haar cascades."""
    return YuNetFaceDetector(yunet_model) if yunet_model else HaarFaceDetector()


def _load_cascade(path: Path) -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise VRNError(f"{path}: OpenCV Haar cascade missing; opencv-python>=4.8,<5 ships it")
    return cascade
