"""The reconstructed face mesh and how it is written to disk (through trimesh)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_bytes_atomic

MESH_FORMATS = ("obj", "ply", "glb")


@dataclass
class FaceMesh:
    """An indexed, vertex-coloured triangle mesh.

    ``vertices`` ``(V, 3)`` float32 ``(x, y, z)`` in photo pixels (x right, y down, z
    toward the camera) unless stated otherwise; ``faces`` ``(F, 3)`` int32 vertex
    indices; ``colors`` ``(V, 3)`` uint8 RGB.
    """

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray

    @property
    def is_empty(self) -> bool:
        return len(self.faces) == 0

    def to_trimesh(self):
        import trimesh

        rgba = np.concatenate([self.colors, np.full((len(self.colors), 1), 255, np.uint8)], 1)
        return trimesh.Trimesh(vertices=self.vertices, faces=self.faces, vertex_colors=rgba,
                               process=False)


def save_mesh(mesh: FaceMesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` atomically; the format follows the suffix (``.obj`` lines are
    ``v x y z r g b`` with colours in [0, 1], ``.ply``, ``.glb``)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in MESH_FORMATS:
        raise ValueError(f"{path}: unsupported mesh format {fmt!r}; use one of {MESH_FORMATS}")
    tm = mesh.to_trimesh()
    try:
        if fmt == "obj":
            data = tm.export(file_type="obj", include_color=True, include_normals=False,
                             include_texture=False)
        else:
            data = tm.export(file_type=fmt)
    finally:
        # A Trimesh is a reference cycle (its visual, ray, permutate and nearest point back
        # at it), so its float64 copies of the arrays would wait for a full garbage
        # collection: dozens of them pile up while vrn-live saves a mesh per frame.
        vars(tm).clear()
    write_bytes_atomic(path, data.encode("utf-8") if isinstance(data, str) else data)
    return path
