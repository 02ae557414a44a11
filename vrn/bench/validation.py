"""Is a faster configuration still right? Occupancy IoU against fp32 on real face crops.

A reduced-precision backend (bf16, fp16, int8) passes when, on every crop, the voxels it
puts inside the surface (occupancy above the level) overlap those of the fp32 reference
with intersection over union of at least :data:`vrn.metrics.MIN_IOU`
(:func:`vrn.metrics.occupancy_iou`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..metrics import MIN_IOU, OCCUPANCY_LEVEL, occupancy_iou

MAX_FACES_PER_PHOTO = 4


def image_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Image files among ``paths``, folders expanded (sorted); missing paths raise."""
    from ..image_io import collect_images

    files, problems = collect_images(paths)
    missing = [p for p in problems if p.endswith("file not found")]
    if missing:
        raise FileNotFoundError(f"{missing[0].rsplit(':', 1)[0]}: no such image or folder")
    return files


def face_crops(images: list[str | os.PathLike], *, size: int, detector=None,
               landmark_stage=None, max_faces_per_photo: int = MAX_FACES_PER_PHOTO
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Network inputs for every face the detector finds in ``images``, made as the
    pipeline makes them (detection, landmarks, the landmark crop:
    :func:`vrn.runtime.pipeline.face_crops`).

    Returns ``(batch, landmarks, names)``: ``(N, 3, size, size)`` float32 RGB in [0, 1],
    the ``(N, 68, 3)`` float32 landmarks in crop pixels ``(x, y, z)`` (what a
    landmark-guided model takes beside each crop), and one ``"file.jpg#k"`` name per
    crop. Photos without a detected face add nothing. ``detector`` and
    ``landmark_stage`` default to the pipeline's (build them once for many calls).
    """
    from ..image_io import load_image
    from ..runtime.detect import create_detector
    from ..runtime.landmarks import LandmarkStage
    from ..runtime.pipeline import face_crops as crops_of

    detector = detector or create_detector()
    landmark_stage = landmark_stage or LandmarkStage()
    batches, landmarks, names = [], [], []
    for path in images:
        batch, points = crops_of(load_image(path), detector=detector,
                                 landmark_stage=landmark_stage, size=size,
                                 max_faces=max_faces_per_photo)
        batches.append(batch)
        landmarks.append(points)
        names += [f"{Path(path).name}#{k}" for k in range(len(batch))]
    if not names:
        return (np.zeros((0, 3, size, size), np.float32), np.zeros((0, 68, 3), np.float32),
                names)
    return np.concatenate(batches), np.concatenate(landmarks), names


CALIBRATION_TURNS = (-8.0, 8.0)  # degrees, besides the mirror image


def calibration_crops(images: list[str | os.PathLike], *, size: int, detector=None,
                      landmark_stage=None, max_faces_per_photo: int = MAX_FACES_PER_PHOTO
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs to calibrate int8 quantisation on that are not the validation
    crops of the same ``images``: each photo mirrored left to right, and mirrored and
    turned by :data:`CALIBRATION_TURNS` about its centre, run through detection,
    landmarks and the landmark crop as :func:`face_crops` does. Returns ``(batch
    (N, 3, size, size) float32, landmarks (N, 68, 3) float32 crop pixels)``."""
    import cv2

    from ..image_io import load_image
    from ..runtime.detect import create_detector
    from ..runtime.landmarks import LandmarkStage
    from ..runtime.pipeline import face_crops as crops_of

    detector = detector or create_detector()
    landmark_stage = landmark_stage or LandmarkStage()
    batches = [np.zeros((0, 3, size, size), np.float32)]
    landmarks = [np.zeros((0, 68, 3), np.float32)]
    for path in images:
        mirrored = np.ascontiguousarray(load_image(path)[:, ::-1])
        h, w = mirrored.shape[:2]
        variants = [mirrored] + [
            cv2.warpAffine(mirrored, cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0),
                           (w, h), borderMode=cv2.BORDER_REFLECT)
            for angle in CALIBRATION_TURNS]
        for image in variants:
            batch, points = crops_of(image, detector=detector, landmark_stage=landmark_stage,
                                     size=size, max_faces=max_faces_per_photo)
            batches.append(batch)
            landmarks.append(points)
    return np.concatenate(batches), np.concatenate(landmarks)


def validate_against_reference(backend, reference_volumes: np.ndarray, batch: np.ndarray,
                               landmarks: np.ndarray, *,
                               level: float = OCCUPANCY_LEVEL,
                               min_iou: float = MIN_IOU) -> dict:
    """Run ``backend`` on ``batch`` ``(N, 3, S, S)`` with its ``landmarks``
    ``(N, 68, 3)`` crop pixels (ignored by a model that is not landmark-guided), one
    crop at a time, and compare with ``reference_volumes`` ``(N, D, H, W)`` (the fp32
    reference's output for the same crops).

    Returns ``{"crops", "iou_min", "iou_mean", "max_abs_diff", "passed", "per_crop"}``;
    ``passed`` means every crop's IoU is at least ``min_iou``.
    """
    if len(batch) == 0:
        raise ValueError("no face crops to validate on")
    if len(landmarks) != len(batch):
        raise ValueError(f"got {len(landmarks)} landmark sets for {len(batch)} crops")
    ious, max_diff = [], 0.0
    for i in range(len(batch)):
        volume = np.asarray(backend.infer(batch[i:i + 1], landmarks[i:i + 1]))[0]
        ious.append(occupancy_iou(reference_volumes[i], volume, level=level))
        max_diff = max(max_diff, float(np.abs(reference_volumes[i] - volume).max()))
    return {"crops": len(ious), "iou_min": float(min(ious)), "iou_mean": float(np.mean(ious)),
            "max_abs_diff": max_diff, "passed": bool(min(ious) >= min_iou),
            "per_crop": [float(x) for x in ious]}
