"""Marching cubes on NumPy arrays (Numba CPU kernel) and CUDA arrays (Numba-CUDA kernel).

One vertex per crossed grid edge, owned by the edge's lower grid point; vertices ordered
by ``(z, y, x, axis)`` and faces by the cube they lie in, so the mesh is indexed,
watertight and identical on every run and on both devices.
"""

from __future__ import annotations

import numpy as np

from ._checks import check_level, check_volume, classification, is_cuda_array
from ._cpu import marching_cubes_cpu

__all__ = ["marching_cubes", "marching_cubes_batch", "to_host"]


def marching_cubes(volume, level: float = 0.5, *, stream=None):
    """Triangle mesh of the isosurface ``volume == level``.

    Parameters
    ----------
    volume : (D, H, W) array
        Depth, rows, columns. float32, float16, or uint8 (read as ``value / 255``: the
        mesh is exactly that of the float32 volume ``value / 255``, with no converted
        copy). A NumPy array (or what :func:`numpy.asarray` makes one of) runs on the
        CPU, in ``NUMBA_NUM_THREADS`` threads; an object with
        ``__cuda_array_interface__`` (Numba device array, CUDA ``torch.Tensor``, CuPy
        array) runs on its GPU without leaving it.
    level : float
        Iso value, compared in float32. A voxel is *above* when ``value > level``;
        NaN voxels count as below.
    stream : numba.cuda stream, optional
        GPU only: the stream to run on. Default: the array's own stream (torch's
        current stream for a torch tensor, the ``__cuda_array_interface__`` stream
        otherwise), else the default stream.

    Returns
    -------
    vertices : (V, 3) float32 array
        ``(x, y, z)`` = (column, row, depth) in voxel index units. A vertex on the edge
        from voxel value ``a`` to its +axis neighbour ``b`` sits at
        ``t = (level - a) / (b - a)`` along it (0.5 if ``t`` is NaN), computed in float64
        and rounded once to float32.
    faces : (F, 3) int32 array
        Vertex indices, counter-clockwise seen from the side of values below the level:
        the normal ``(v1 - v0) x (v2 - v0)`` points toward lower values.

    On the GPU both are new Numba device arrays (see :func:`to_host`); the call waits
    for the GPU once, to learn the mesh size. ``MarchingCubesCUDA`` does the same into
    buffers it reuses from frame to frame.

    Notes
    -----
    Ambiguous faces keep the above-level corners apart, as the classic table of
    ``skimage.measure.marching_cubes(method='lorensen')`` does, so meshes are closed
    except where they meet the volume's border, and the vertices and the polygon of
    every cube equal skimage's; the split of polygons into triangles differs (see
    :mod:`vrn.kernels._tables`). An empty or full volume gives ``(0, 3)`` arrays.

    Raises
    ------
    TypeError
        ``volume`` has another dtype.
    ValueError
        ``volume`` is not 3-D or is smaller than 2 in some dimension, or ``level`` is
        not a finite number.
    """
    if is_cuda_array(volume):
        from ._cuda import marching_cubes_cuda  # numba.cuda only when a GPU array arrives

        return marching_cubes_cuda(volume, level, stream, ndim=3)[0]
    return _marching_cubes_numpy(volume, level, ndim=3)[0]


def marching_cubes_batch(volumes, level: float = 0.5, *, stream=None) -> list:
    """:func:`marching_cubes` of each volume of a batch, in one pass.

    Parameters
    ----------
    volumes : (N, D, H, W) array
        As ``volume`` in :func:`marching_cubes`; on the GPU the whole batch costs one
        host synchronisation.
    level, stream
        As in :func:`marching_cubes`.

    Returns
    -------
    list of (vertices, faces)
        One pair per volume, each indexed from 0. They are views into two arrays shared
        by the batch.
    """
    if is_cuda_array(volumes):
        from ._cuda import marching_cubes_cuda

        return marching_cubes_cuda(volumes, level, stream, ndim=4)
    return _marching_cubes_numpy(volumes, level, ndim=4)


def to_host(vertices, faces) -> tuple[np.ndarray, np.ndarray]:
    """Copy a mesh from the GPU (Numba device arrays or torch tensors) to NumPy arrays;
    NumPy arrays pass through unchanged."""
    return _array_to_host(vertices), _array_to_host(faces)


def _array_to_host(array) -> np.ndarray:
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "copy_to_host"):  # on the array's own stream, then wait for it
        host = array.copy_to_host()
        if getattr(array, "stream", 0):
            array.stream.synchronize()
        return host
    if hasattr(array, "detach"):  # torch tensor
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _marching_cubes_numpy(volumes, level, ndim: int) -> list:
    volumes = np.asarray(volumes)
    check_volume(volumes.shape, volumes.dtype, ndim)
    level = check_level(level)
    volumes = np.ascontiguousarray(volumes)
    if ndim == 3:
        volumes = volumes[None]
    threshold, level, divisor = classification(volumes.dtype, level)
    return marching_cubes_cpu(volumes, threshold, level, divisor)
