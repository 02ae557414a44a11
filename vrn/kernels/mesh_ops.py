"""Per-vertex operations on a marching-cubes mesh: placing it in the photo and colouring
it from the crop. NumPy arrays run a Numba CPU kernel, CUDA arrays a Numba-CUDA kernel
(:mod:`._mesh_ops_cuda`), so a mesh made on the GPU is finished there.

Both twins give the same bits: every product they form is a float32 times a float32
(or times 255), exact in float64, so a fused multiply-add on the GPU rounds exactly as
the separate multiply and add on the CPU do.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ._checks import check_crop, check_vertices, is_cuda_array

__all__ = ["photo_z_scale", "transform_vertices", "vertex_colors"]


def photo_z_scale(crop_to_photo, z_scale: float = 0.5) -> float:
    """Photo pixels per depth voxel: ``z_scale * sqrt(|det A|)`` for
    ``crop_to_photo = [A | t]``."""
    matrix = _check_affine(crop_to_photo)
    return float(z_scale) * math.sqrt(abs(float(np.linalg.det(matrix[:, :2]))))


def transform_vertices(vertices, crop_to_photo, *, z_scale: float = 0.5, out=None):
    """Map vertices from crop voxel space to photo pixels.

    Parameters
    ----------
    vertices : (V, 3) float32 array
        ``(x, y, z)`` = (column, row, depth index) in the crop's voxel grid, as from
        :func:`vrn.kernels.marching_cubes`. NumPy, or a CUDA array (then the result is a
        Numba device array on the same GPU).
    crop_to_photo : (2, 3) array
        Affine ``[A | t]`` from crop pixels to photo pixels (the inverse of the matrix
        given to ``cv2.warpAffine`` to cut the crop; pixel centres at integer
        coordinates).
    z_scale : float
        Crop pixels per depth voxel: VRN's training volumes were voxelised with z twice
        as deep as x and y, hence 0.5.
    out : (V, 3) float32 array, optional
        Where to write the result (same kind of array as ``vertices``).

    Returns
    -------
    (V, 3) float32 array
        ``(X, Y) = A @ (x, y) + t`` and ``Z = z * z_scale * sqrt(|det A|)``: photo pixel
        coordinates, Z toward the camera in photo pixels. ``A`` is rounded to float32
        (an error below 1e-7 relative); sums are formed in float64.
    """
    matrix = _check_affine(crop_to_photo)
    coefficients = np.empty(7, dtype=np.float64)
    coefficients[[0, 1, 3, 4]] = matrix[:, :2].astype(np.float32).ravel()
    coefficients[[2, 5]] = matrix[:, 2]
    coefficients[6] = np.float32(photo_z_scale(matrix, z_scale))
    if is_cuda_array(vertices):
        from . import _mesh_ops_cuda

        return _mesh_ops_cuda.transform_vertices(vertices, coefficients, out)
    vertices = np.asarray(vertices)
    check_vertices(vertices.shape, vertices.dtype)
    out = _output(out, vertices.shape, np.float32)
    _transform_cpu(vertices, coefficients, out)
    return out


def vertex_colors(crop, vertices, *, out=None):
    """Colour each vertex by bilinear sampling of the crop at its ``(x, y)``.

    Parameters
    ----------
    crop : (3, H, W) float32 array
        The network's input crop, channels first, values in [0, 1]; the returned
        colours keep its channel order.
    vertices : (V, 3) float32 array
        Vertices in crop voxel space (before :func:`transform_vertices`); ``(x, y)``
        are crop pixel coordinates, pixel centres at integers, clamped to the crop (NaN
        reads its first column or row).
    out : (V, 3) uint8 array, optional
        Where to write the result.

    Returns
    -------
    (V, 3) uint8 array
        ``floor(255 * clip(c, 0, 1) + 0.5)`` of the interpolated colour ``c``: first
        along x in each of the two rows, each rounded to float32, then along y.
        On the GPU when ``vertices`` is a CUDA array (``crop`` is then copied there if
        it is a NumPy array).
    """
    if is_cuda_array(vertices):
        from . import _mesh_ops_cuda

        return _mesh_ops_cuda.vertex_colors(crop, vertices, out)
    crop = np.asarray(crop)
    check_crop(crop.shape, crop.dtype)
    vertices = np.asarray(vertices)
    check_vertices(vertices.shape, vertices.dtype)
    out = _output(out, vertices.shape, np.uint8)
    _colors_cpu(np.ascontiguousarray(crop), vertices, out)
    return out


def _check_affine(crop_to_photo) -> np.ndarray:
    matrix = np.asarray(crop_to_photo, dtype=np.float64)
    if matrix.shape != (2, 3):
        raise ValueError(f"crop_to_photo must be a 2x3 affine matrix; got shape "
                         f"{matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("crop_to_photo has non-finite entries")
    return matrix


def _output(out, shape, dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must be a {np.dtype(dtype)} NumPy array of shape {shape}")
    return out


@njit(nogil=True, cache=True)
def _transform_cpu(vertices, c, out):
    for i in range(vertices.shape[0]):
        x = np.float64(vertices[i, 0])
        y = np.float64(vertices[i, 1])
        out[i, 0] = np.float32((c[0] * x + c[1] * y) + c[2])
        out[i, 1] = np.float32((c[3] * x + c[4] * y) + c[5])
        out[i, 2] = vertices[i, 2] * np.float32(c[6])


@njit(inline="always")
def _lerp(a, b, t):
    """``a + t (b - a)`` for float32 ``a``, ``b``, ``t``: the difference in float32, the
    exact product and the sum in float64, then float32."""
    return np.float32(np.float64(a) + np.float64(t) * np.float64(np.float32(b - a)))


@njit(nogil=True, cache=True)
def _colors_cpu(crop, vertices, out):
    height = crop.shape[1]
    width = crop.shape[2]
    for i in range(vertices.shape[0]):
        # Clamped with min and max, which compile without branches; NaN reads column
        # or row 0 (the twin of _mesh_ops_cuda._colors_kernel).
        x = vertices[i, 0]
        if not x >= 0:
            x = np.float32(0)
        x = min(x, np.float32(width - 1))
        y = vertices[i, 1]
        if not y >= 0:
            y = np.float32(0)
        y = min(y, np.float32(height - 1))
        x0 = np.int64(x)  # x, y >= 0, so truncation is floor
        y0 = np.int64(y)
        x1 = min(x0 + 1, width - 1)
        y1 = min(y0 + 1, height - 1)
        fx = x - np.float32(x0)
        fy = y - np.float32(y0)
        for ch in range(3):
            top = _lerp(crop[ch, y0, x0], crop[ch, y0, x1], fx)
            bottom = _lerp(crop[ch, y1, x0], crop[ch, y1, x1], fx)
            value = min(max(_lerp(top, bottom, fy), np.float32(0)), np.float32(1))
            out[i, ch] = np.uint8(np.int64(np.float64(value) * 255.0 + 0.5))
