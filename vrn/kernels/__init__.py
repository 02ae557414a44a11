"""Mesh kernels: marching cubes (:mod:`.marching_cubes`) and the per-vertex operations
that finish a mesh (:mod:`.mesh_ops`). Each runs on NumPy arrays (Numba CPU kernels) and
on CUDA arrays (Numba-CUDA kernels, imported only when a CUDA array arrives), with the
same output bit for bit."""

from .marching_cubes import marching_cubes, marching_cubes_batch, to_host
from .mesh_ops import photo_z_scale, transform_vertices, vertex_colors

__all__ = ["MarchingCubesCUDA", "marching_cubes", "marching_cubes_batch", "photo_z_scale",
           "to_host", "transform_vertices", "vertex_colors"]


def __getattr__(name):
    if name == "MarchingCubesCUDA":  # imports numba.cuda
        from ._cuda import MarchingCubesCUDA

        return MarchingCubesCUDA
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
