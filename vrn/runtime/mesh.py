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


GLTF_FRAME = np.array([1, -1, 1], np.float32)  # photo pixels -> glTF's y-up frame


def mesh_bytes(mesh: FaceMesh, fmt: str) -> bytes:
    """``mesh`` as the contents of a ``fmt`` file (one of :data:`MESH_FORMATS`).

    OBJ (lines ``v x y z r g b``, colours in [0, 1]) and PLY keep photo pixels (x right,
    y down, z toward the camera). GLB follows glTF, whose y axis points up: its vertices
    are ``(x, -y, z)`` and each triangle's winding is reversed to undo the mirror, so
    glTF viewers show the face upright with its outside out.
    """
    if fmt not in MESH_FORMATS:
        raise ValueError(f"unsupported mesh format {fmt!r}; use one of {MESH_FORMATS}")
    if fmt == "glb":
        mesh = FaceMesh(mesh.vertices * GLTF_FRAME, mesh.faces[:, ::-1], mesh.colors)
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
    return data.encode("utf-8") if isinstance(data, str) else data


def save_mesh(mesh: FaceMesh, path: str | os.PathLike) -> Path:
    """Write ``mesh`` atomically; the format follows the suffix (see :func:`mesh_bytes`:
    ``.obj`` and ``.ply`` in photo pixels, ``.glb`` in glTF's y-up frame)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in MESH_FORMATS:
        raise ValueError(f"{path}: unsupported mesh format {fmt!r}; use one of {MESH_FORMATS}")
    write_bytes_atomic(path, mesh_bytes(mesh, fmt))
    return path
