"""300W-LP / AFLW2000-3D-format folders: photos plus ``.mat`` BFM fits.

Each ``<stem>.jpg`` (or ``.png``) has a ``<stem>.mat`` with ``Shape_Para`` (199,),
``Exp_Para`` (29,), ``Pose_Para`` (7,: pitch, yaw, roll, tx, ty, tz, scale) and, in
AFLW2000-3D, ``pt3d_68`` (3, 68; 1-based pixel coordinates). With the user's BFM basis
(:mod:`vrn.data.bfm`) the fit becomes the dense ground-truth face mesh in photo pixels
(``docs/reference.md``, "Evaluation": ``X = s R V + t``, then ``x = X - 1``,
``y = h - Y``, ``z = Z``), the crop follows the paper's 68-landmark rule, and the target
volume is the mesh voxelised in that crop (:mod:`vrn.data.voxelize`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AnnotationError
from ..image_io import load_image
from ..runtime.crop import CROP_SIZE, landmarks_crop_matrix, points_to_crop, warp_crop
from .bfm import BFM, crop_rotation, pose_vertices
from .voxelize import THICKNESS, VOLUME_DEPTH, column_runs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class AFLWRecord:
    """One annotated photo.

    ``image`` ``(H, W, 3)`` uint8 RGB; ``vertices`` ``(V, 3)`` float64 dense ground-truth
    face mesh (BFM face region, triangles ``bfm.triangles``) in photo pixels (x right,
    y down, z toward the camera); ``landmarks`` ``(68, 3)`` float64 the mesh's 68
    landmarks (same frame); ``annotated_landmarks`` ``(68, 3)`` 0-based ``pt3d_68`` or
    ``None``; ``pose`` ``(7,)`` ``Pose_Para``; ``photo_to_crop`` 2x3 float64 (paper's
    68-landmark rule on ``annotated_landmarks``, else ``landmarks``).
    """

    path: Path
    image: np.ndarray
    vertices: np.ndarray
    landmarks: np.ndarray
    annotated_landmarks: np.ndarray | None
    pose: np.ndarray
    photo_to_crop: np.ndarray


def _numbers(mat: dict, key: str, mat_path: Path) -> np.ndarray:
    """``mat[key]`` as a finite float64 array, or :class:`AnnotationError`."""
    try:
        values = np.asarray(mat[key], np.float64)
    except (TypeError, ValueError):
        raise AnnotationError(f"{mat_path}: {key} is not numeric") from None
    if not np.isfinite(values).all():
        raise AnnotationError(f"{mat_path}: {key} holds non-finite values")
    return values


def read_fit(mat_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{"shape" (199,), "expression" (29,), "pose" (7,), "pt3d_68" (3, 68) or absent}``
    from a 300W-LP / AFLW2000-3D ``.mat`` file."""
    from scipy.io import loadmat

    mat_path = Path(mat_path)
    try:
        mat = loadmat(str(mat_path))
    except Exception as exc:  # scipy raises assorted types for corrupt files
        raise AnnotationError(f"{mat_path}: not a readable .mat file "
                              f"({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("Shape_Para", "Exp_Para", "Pose_Para") if k not in mat]
    if missing:
        raise AnnotationError(f"{mat_path}: missing {', '.join(missing)}")
    fit = {"shape": _numbers(mat, "Shape_Para", mat_path).ravel(),
           "expression": _numbers(mat, "Exp_Para", mat_path).ravel(),
           "pose": _numbers(mat, "Pose_Para", mat_path).ravel()}
    if fit["pose"].size != 7:
        raise AnnotationError(f"{mat_path}: Pose_Para has {fit['pose'].size} values, expected 7")
    if "pt3d_68" in mat:
        pts = _numbers(mat, "pt3d_68", mat_path)
        if pts.shape == (68, 3):
            pts = pts.T
        if pts.shape[1] != 68:
            raise AnnotationError(f"{mat_path}: pt3d_68 has shape {pts.shape}, expected (3, 68)")
        fit["pt3d_68"] = pts
    return fit


class AFLWFolder:
    """An AFLW2000-3D / 300W-LP-format folder. Indexing returns training samples
    ``(crop (192, 192, 3) uint8, runs (K, 2, 192, 192) uint8, landmarks (68, 3) float32)`` in
    crop pixels; :meth:`record` returns the full :class:`AFLWRecord`."""

    def __init__(self, folder: str | os.PathLike, bfm: BFM, *, size: int = CROP_SIZE,
                 depth: int = VOLUME_DEPTH, thickness: int = THICKNESS):
        self.folder = Path(folder)
        self.thickness = thickness
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: folder not found")
        self.bfm = bfm
        self.size = size
        self.depth = depth
        self.paths = sorted(p for p in self.folder.iterdir()
                            if p.suffix.lower() in IMAGE_SUFFIXES
                            and p.with_suffix(".mat").is_file())
        if not self.paths:
            raise FileNotFoundError(f"{self.folder}: no images with a matching .mat file")

    def __len__(self) -> int:
        return len(self.paths)

    def record(self, index: int) -> AFLWRecord:
        path = self.paths[index]
        image = load_image(path)  # the byte and pixel limits, EXIF orientation
        fit = read_fit(path.with_suffix(".mat"))
        model = self.bfm.vertices(fit["shape"], fit["expression"])
        vertices = pose_vertices(model, fit["pose"], image.shape[0])
        landmarks = vertices[self.bfm.landmarks]
        annotated = None
        if "pt3d_68" in fit:
            annotated = fit["pt3d_68"].T.copy()
            annotated[:, :2] -= 1.0  # MATLAB 1-based -> 0-based pixels
        crop_from = annotated if annotated is not None else landmarks
        return AFLWRecord(path=path, image=image, vertices=vertices, landmarks=landmarks,
                          annotated_landmarks=annotated, pose=fit["pose"],
                          photo_to_crop=landmarks_crop_matrix(crop_from[:, :2], self.size))

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rec = self.record(index)
        crop = warp_crop(rec.image, rec.photo_to_crop, self.size)
        vertices = points_to_crop(rec.vertices, rec.photo_to_crop)
        runs = column_runs(vertices, self.bfm.triangles, rotation=crop_rotation(*rec.pose[:3]),
                           size=self.size, depth=self.depth, thickness=self.thickness)
        return crop, runs, vertices[self.bfm.landmarks].astype(np.float32)
