"""Face crops: the affine map from photo pixels to the network's 192x192 crop, and back.

The original (MATLAB ``run.m``) scales the photo by ``90 / sqrt(prod(max(P) - min(P)))``
over the 68 landmarks ``P`` and centres the crop on their mean
(:func:`landmarks_crop_matrix`); the pipeline takes ``P`` from its landmark stage (see
:func:`vrn.runtime.pipeline.landmark_crops`).

Matrices are 2x3 float64 ``[A | t]`` acting on column vectors ``(x, y, 1)`` with
pixel centres at integer coordinates, as ``cv2.warpAffine`` takes them.
"""

from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE = 192
LANDMARK_EXTENT = 90.0


def crop_matrix(center: tuple[float, float], landmark_size: float,
                size: int = CROP_SIZE) -> np.ndarray:
    """``photo_to_crop`` (2x3) that puts ``center`` at the crop's centre and scales a
    face whose landmark extent is ``landmark_size`` photo pixels to ``LANDMARK_EXTENT``
    crop pixels at the original 192-pixel crop (``LANDMARK_EXTENT * size / 192`` at
    another ``size``, so the face fills the same share of any crop)."""
    if not landmark_size > 0:
        raise ValueError(f"landmark_size must be positive, got {landmark_size}")
    s = LANDMARK_EXTENT * (size / CROP_SIZE) / landmark_size
    c = (size - 1) / 2.0
    return np.array([[s, 0.0, c - s * center[0]],
                     [0.0, s, c - s * center[1]]], dtype=np.float64)


def landmarks_crop_matrix(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The original rule from 68 landmarks ``(68, 2)`` ``(x, y)`` photo pixels."""
    landmarks = np.asarray(landmarks, dtype=np.float64)[:, :2]
    extent = np.sqrt(np.prod(landmarks.max(0) - landmarks.min(0)))
    return crop_matrix(tuple(landmarks.mean(0)), extent, size)


def points_to_crop(points: np.ndarray, photo_to_crop: np.ndarray) -> np.ndarray:
    """Points ``(K, 3)`` photo pixels ``(x, y, z)`` (landmarks, mesh vertices) -> crop
    pixels ``(K, 3)`` float64: ``(x, y)`` through the affine map, ``z`` scaled by its
    ``sqrt|det A|`` (the inverse of :func:`vrn.kernels.transform_vertices` up to the
    volume's 0.5 depth scale)."""
    points = np.asarray(points, np.float64)
    m = np.asarray(photo_to_crop, np.float64)
    out = np.empty((len(points), 3))
    out[:, :2] = points[:, :2] @ m[:, :2].T + m[:, 2]
    out[:, 2] = points[:, 2] * np.sqrt(abs(np.linalg.det(m[:, :2])))
    return out


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

