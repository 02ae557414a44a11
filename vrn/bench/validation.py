"""Is a faster configuration still right? Occupancy IoU against fp32 on real face crops.

A reduced-precision backend (bf16, fp16, int8) passes when, on every crop, the voxels it
puts inside the surface (occupancy above the level) overlap those of the fp32 reference
with intersection over union of at least :data:`MIN_IOU`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

MIN_IOU = 0.98
MAX_FACES_PER_PHOTO = 4


def occupancy_iou(reference: np.ndarray, candidate: np.ndarray, *, level: float = 0.5) -> float:
    """IoU of ``reference > level`` and ``candidate > level``, two ``(D, H, W)`` (or any
    equal-shaped) volumes. Two empty volumes agree perfectly (1.0)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape:
        raise ValueError(f"volumes differ in shape: {reference.shape} vs {candidate.shape}")
    a, b = reference > level, candidate > level
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def image_files(paths: list[str | os.PathLike]) -> list[Path]:
    """Image files among ``paths``, folders expanded (sorted); missing paths raise."""
    from ..runtime.image_io import collect_images

    files, problems = collect_images(paths)
    missing = [p for p in problems if p.endswith("file not found")]
    if missing:
        raise FileNotFoundError(f"{missing[0].rsplit(':', 1)[0]}: no such image or folder")
    return files


def face_crops(images: list[str | os.PathLike], *, detector, size: int,
               max_faces_per_photo: int = MAX_FACES_PER_PHOTO
               ) -> tuple[np.ndarray, list[str]]:
    """Network inputs for every face the detector finds in ``images``.

    Returns ``(batch, names)``: ``(N, 3, size, size)`` float32 RGB in [0, 1], cropped
    the way the pipeline crops (:func:`vrn.runtime.crop.box_crop_matrix`), and one
    ``"file.jpg#k"`` name per crop. Photos without a detected face add nothing.
    """
    from ..runtime.crop import face_crops as crops_of
    from ..runtime.image_io import load_image

    batches, names = [], []
    for path in images:
        batch = crops_of(load_image(path), detector, size=size, max_faces=max_faces_per_photo)
        batches.append(batch)
        names += [f"{Path(path).name}#{k}" for k in range(len(batch))]
    if not names:
        return np.zeros((0, 3, size, size), np.float32), names
    return np.concatenate(batches), names


def validate_against_reference(backend, reference_volumes: np.ndarray, batch: np.ndarray, *,
                               level: float = 0.5, min_iou: float = MIN_IOU) -> dict:
    """Run ``backend`` on ``batch`` one crop at a time and compare with
    ``reference_volumes`` ``(N, D, H, W)`` (the fp32 reference's output for the same
    crops).

    Returns ``{"crops", "iou_min", "iou_mean", "max_abs_diff", "passed", "per_crop"}``;
    ``passed`` means every crop's IoU is at least ``min_iou``.
    """
    if len(batch) == 0:
        raise ValueError("no face crops to validate on")
    ious, max_diff = [], 0.0
    for i in range(len(batch)):
        volume = np.asarray(backend.infer(batch[i:i + 1]))[0]
        ious.append(occupancy_iou(reference_volumes[i], volume, level=level))
        max_diff = max(max_diff, float(np.abs(reference_volumes[i] - volume).max()))
    return {"crops": len(ious), "iou_min": float(min(ious)), "iou_mean": float(np.mean(ious)),
            "max_abs_diff": max_diff, "passed": bool(min(ious) >= min_iou),
            "per_crop": [float(x) for x in ious]}
