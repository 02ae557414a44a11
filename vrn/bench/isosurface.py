"""Marching-cubes references and test volumes, shared by ``vrn-bench`` and
``benchmarks/bench_marching_cubes.py``.

:data:`IMPLEMENTATIONS` maps a name to a factory; a factory returns
``run(volume, level) -> (vertices, faces)`` for a ``(D, H, W)`` float32 volume, or raises
``ImportError`` when its library is missing. Our kernel
(:func:`vrn.kernels.marching_cubes`) is :data:`OURS`; the references are scikit-image
(``lewiner``, its default, and ``lorensen``), PyMCubes and VTK's ``vtkFlyingEdges3D``.
Their vertex arrays differ in axis order (skimage and PyMCubes give ``(d, y, x)``, we and
VTK ``(x, y, z)``); only the timings and the mesh sizes are compared here.
"""

from __future__ import annotations

import numpy as np

SHAPE = (200, 192, 192)
OURS = "vrn (numba cpu)"
SKIMAGE_DEFAULT = "skimage lewiner"
SKIMAGE_LORENSEN = "skimage lorensen"


def _face_front(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A face's front surface over the ``(H, W)`` grid, as depth-index units toward the
    camera (higher is nearer; head ellipse, nose, brows, eyes, lips), and its head-ellipse
    radius squared (1 on the outline)."""
    depth, height, width = shape
    y = (np.arange(height, dtype=np.float32)[:, None] - height * 0.52) / (height * 0.42)
    x = (np.arange(width, dtype=np.float32)[None, :] - width * 0.5) / (width * 0.33)
    r2 = x ** 2 + y ** 2
    front = depth * 0.35 * np.sqrt(np.clip(1 - r2, 0, 1))
    front += depth * 0.1 * np.exp(-(x ** 2 / 0.02 + (y - 0.05) ** 2 / 0.06))  # nose
    front += depth * 0.02 * np.exp(-((np.abs(x) - 0.35) ** 2 + (y + 0.3) ** 2) / 0.01)  # brows
    front -= depth * 0.03 * np.exp(-((np.abs(x) - 0.35) ** 2 + (y + 0.15) ** 2) / 0.008)  # eyes
    front += depth * 0.015 * np.exp(-(x ** 2 / 0.03 + (y - 0.45) ** 2 / 0.003))  # lips
    return front, r2


def _sigmoid(t):
    return 1 / (1 + np.exp(-np.clip(t, -50, 50)))


def face_like_volume(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A smooth stand-in for a VRN output: ``(D, H, W)`` float32 occupancy in [0, 1],
    1 between a back plane at 0.2 D and a face-shaped front surface (head ellipse, nose,
    brows, lips) from 0.3 D to 0.75 D, with sigmoid edges about 1.5 voxels wide."""
    depth = shape[0]
    d = np.arange(depth, dtype=np.float32)[:, None, None]
    front, r2 = _face_front(shape)
    front = depth * 0.3 + front
    back = depth * 0.2
    inside = _sigmoid((1 - np.sqrt(r2)) / 0.01)
    volume = _sigmoid((front[None] - d) / 1.5) * _sigmoid((d - back) / 1.5) * inside[None]
    return volume.astype(np.float32)


def vrn_shaped_volume(shape: tuple[int, int, int] = SHAPE, *,
                      thickness: float = 0.2) -> np.ndarray:
    """A face as the network outputs it: ``(D, H, W)`` float32 occupancy in [0, 1], a
    slab ``thickness * D`` deep (40 planes at D = 200) behind the face-shaped front
    surface of :func:`face_like_volume`, placed in the front part of the depth range
    (0.55 D to 1 D), so that the surface occupies only some of the z-planes, most of
    them in a band near the front, as in the default model's output for the sample
    photo. The depth range over which the work lies is what decides how evenly slabs
    of z-planes share it."""
    depth = shape[0]
    d = np.arange(depth, dtype=np.float32)[:, None, None]
    front, r2 = _face_front(shape)
    front = depth * 0.6 + front * 0.8
    back = front - depth * thickness
    inside = _sigmoid((1 - np.sqrt(r2)) / 0.01)
    volume = (_sigmoid((front[None] - d) / 1.5) * _sigmoid((d - back[None]) / 1.5)
              * inside[None])
    return volume.astype(np.float32)


def noisy_volume(shape: tuple[int, int, int] = SHAPE, sigma: float = 0.1,
                 seed: int = 0) -> np.ndarray:
    """:func:`face_like_volume` plus Gaussian noise, clipped to [0, 1]."""
    noise = np.random.default_rng(seed).normal(0, sigma, shape).astype(np.float32)
    return np.clip(face_like_volume(shape) + noise, 0, 1).astype(np.float32)


def _ours():
    from ..kernels import marching_cubes

    return lambda volume, level: marching_cubes(volume, level)


def _skimage(method: str):
    from skimage.measure import marching_cubes

    def run(volume, level):
        vertices, faces, _, _ = marching_cubes(volume, level, method=method)
        return vertices, faces

    return run


def _pymcubes():
    import mcubes

    return lambda volume, level: mcubes.marching_cubes(volume, level)


def _vtk_flying_edges():
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkFlyingEdges3D

    def run(volume, level):
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        image = vtkImageData()
        image.SetDimensions(volume.shape[2], volume.shape[1], volume.shape[0])
        image.GetPointData().SetScalars(numpy_to_vtk(volume.ravel(), deep=False))
        flying_edges = vtkFlyingEdges3D()
        flying_edges.SetInputData(image)
        flying_edges.SetValue(0, level)
        flying_edges.ComputeNormalsOff()
        flying_edges.ComputeGradientsOff()
        flying_edges.ComputeScalarsOff()
        flying_edges.Update()
        output = flying_edges.GetOutput()
        if output.GetNumberOfPoints() == 0:
            return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
        vertices = vtk_to_numpy(output.GetPoints().GetData())
        faces = vtk_to_numpy(output.GetPolys().GetConnectivityArray()).reshape(-1, 3)
        return vertices, faces

    return run


IMPLEMENTATIONS = {
    OURS: _ours,
    SKIMAGE_DEFAULT: lambda: _skimage("lewiner"),
    SKIMAGE_LORENSEN: lambda: _skimage("lorensen"),
    "pymcubes": _pymcubes,
    "vtk flying edges": _vtk_flying_edges,
}


def available_implementations() -> tuple[dict, dict]:
    """``(runners, unavailable)``: ``runners[name](volume, level) -> (vertices, faces)``
    for each implementation whose library imports, and ``unavailable[name]``, the
    reason for each one that does not."""
    runners, unavailable = {}, {}
    for name, factory in IMPLEMENTATIONS.items():
        try:
            runners[name] = factory()
        except ImportError as exc:
            unavailable[name] = f"not installed ({exc})"
    return runners, unavailable
