"""Face crops: the affine map from photo pixels to the network's 192x192 crop, and back.

The original (MATLAB ``run.m``) scales the photo by ``90 / sqrt(prod(max(P) - min(P)))``
over the 68 landmarks ``P`` and centres the crop on their mean. With only a detection
box we estimate both from the box; the constants below were calibrated on the eight
AFLW2000-3D sample images (the YuNet box vs the ground-truth 68 landmarks, medians):
``sqrt(area of the landmark box) = 1.03 * box width`` (range 0.97-1.18) and
``landmark mean = box centre + (0, 0.125 * box width)`` (range 0.119-0.201; the x offset,
median -0.029, follows the head's yaw and is ignored).

Matrices are 2x3 float64 ``[A | t]`` acting on column vectors ``(x, y, 1)`` with
pixel centres at integer coordinates, as ``cv2.warpAffine`` takes them.
"""

from __future__ import annotations

import cv2
import numpy as np

from .detect import FaceBox

CROP_SIZE = 192
LANDMARK_EXTENT = 90.0
BOX_TO_LANDMARK_SIZE = 1.03
BOX_TO_LANDMARK_DY = 0.125


def crop_matrix(center: tuple[float, float], landmark_size: float,
                size: int = CROP_SIZE) -> np.ndarray:
    """``photo_to_crop`` (2x3) that puts ``center`` at the crop's centre and scales a
    face whose landmark extent is ``landmark_size`` photo pixels to ``LANDMARK_EXTENT``
    crop pixels."""
    if not landmark_size > 0:
        raise ValueError(f"landmark_size must be positive, got {landmark_size}")
    s = LANDMARK_EXTENT / landmark_size
    c = (size - 1) / 2.0
    return np.array([[s, 0.0, c - s * center[0]],
                     [0.0, s, c - s * center[1]]], dtype=np.float64)


def landmarks_crop_matrix(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The original rule from 68 landmarks ``(68, 2)`` ``(x, y)`` photo pixels."""
    landmarks = np.asarray(landmarks, dtype=np.float64)[:, :2]
    extent = np.sqrt(np.prod(landmarks.max(0) - landmarks.min(0)))
    return crop_matrix(tuple(landmarks.mean(0)), extent, size)


def box_crop_matrix(box: FaceBox, size: int = CROP_SIZE) -> np.ndarray:
    """The original rule adapted to a detection box (see the module docstring)."""
    cx, cy = box.center
    return crop_matrix((cx, cy + BOX_TO_LANDMARK_DY * box.w),
                       BOX_TO_LANDMARK_SIZE * box.w, size)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine map (e.g. ``photo_to_crop -> crop_to_photo``)."""
    return cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))


def warp_crop(image: np.ndarray, photo_to_crop: np.ndarray, size: int = CROP_SIZE
              ) -> np.ndarray:
    """Crop ``image`` ``(H, W, 3)`` uint8 to ``(size, size, 3)``; outside is black."""
    return cv2.warpAffine(image, photo_to_crop, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def to_network_input(crops: np.ndarray) -> np.ndarray:
    """``(N, S, S, 3)`` uint8 RGB crops -> ``(N, 3, S, S)`` float32 in [0, 1]."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    return np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255)


def face_crops(image: np.ndarray, detector, *, size: int = CROP_SIZE,
               max_faces: int | None = None) -> np.ndarray:
    """Network inputs ``(N, 3, size, size)`` float32 for the faces ``detector`` finds in
    ``image`` ``(H, W, 3)`` uint8 RGB (largest first), cropped as the pipeline crops."""
    boxes = detector(image)[:max_faces]
    if not boxes:
        return np.zeros((0, 3, size, size), np.float32)
    return to_network_input(np.stack([warp_crop(image, box_crop_matrix(b, size), size)
                                      for b in boxes]))
