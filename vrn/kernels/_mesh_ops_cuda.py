"""Numba-CUDA twins of the per-vertex kernels of :mod:`.mesh_ops` (same operations in
the same order, one thread per vertex). They run on the device and the stream of their
``vertices`` (for a mesh from :func:`vrn.kernels.marching_cubes`, the stream it was made
on), and their results carry that stream."""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, float64, int64, uint8

from ._checks import check_crop, check_vertices
from ._cuda import array_device_id, as_device_array, on_device

_THREADS = 256


@cuda.jit(cache=True)
def _transform_kernel(vertices, c0, c1, c2, c3, c4, c5, z_factor, out):
    i = cuda.grid(1)
    if i < vertices.shape[0]:
        x = float64(vertices[i, 0])
        y = float64(vertices[i, 1])
        out[i, 0] = float32((c0 * x + c1 * y) + c2)
        out[i, 1] = float32((c3 * x + c4 * y) + c5)
        out[i, 2] = vertices[i, 2] * z_factor


@cuda.jit(cache=True)
def _colors_kernel(crop, vertices, out):
    i = cuda.grid(1)
    if i < vertices.shape[0]:
        height = crop.shape[1]
        width = crop.shape[2]
        x = vertices[i, 0]
        if not x >= 0:  # NaN too
            x = float32(0)
        if x > width - 1:
            x = float32(width - 1)
        y = vertices[i, 1]
        if not y >= 0:
            y = float32(0)
        if y > height - 1:
            y = float32(height - 1)
        x0 = int64(x)  # x, y >= 0, so truncation is floor
        y0 = int64(y)
        x1 = x0 + 1 if x0 + 1 < width else x0
        y1 = y0 + 1 if y0 + 1 < height else y0
        fx = x - float32(x0)
        fy = y - float32(y0)
        for ch in range(3):
            a = crop[ch, y0, x0]
            top = float32(float64(a) + float64(fx) * float64(float32(crop[ch, y0, x1] - a)))
            a = crop[ch, y1, x0]
            bottom = float32(float64(a) + float64(fx) * float64(float32(crop[ch, y1, x1] - a)))
            value = float32(float64(top) + float64(fy) * float64(float32(bottom - top)))
            if value < 0:
                value = float32(0)
            if value > 1:
                value = float32(1)
            out[i, ch] = uint8(int64(float64(value) * 255.0 + 0.5))


def _blocks(n: int) -> int:
    return max(1, -(-n // _THREADS))


def transform_vertices(vertices, coefficients: np.ndarray, out=None):
    """GPU :func:`vrn.kernels.transform_vertices`; ``coefficients`` as packed there."""
    with on_device(array_device_id(vertices)):
        vertices, stream = as_device_array(vertices)
        check_vertices(vertices.shape, vertices.dtype)
        if out is None:
            out = cuda.device_array(vertices.shape, dtype=np.float32, stream=stream)
        c = [float(v) for v in coefficients[:6]]
        _transform_kernel[_blocks(vertices.shape[0]), _THREADS, stream](
            vertices, *c, np.float32(coefficients[6]), out)
    return out


def vertex_colors(crop, vertices, out=None):
    """GPU :func:`vrn.kernels.vertex_colors`."""
    with on_device(array_device_id(vertices)):
        vertices, stream = as_device_array(vertices)
        check_vertices(vertices.shape, vertices.dtype)
        if isinstance(crop, np.ndarray):
            check_crop(crop.shape, crop.dtype)
            crop = cuda.to_device(np.ascontiguousarray(crop), stream=stream)
        else:
            crop, _ = as_device_array(crop)
            check_crop(crop.shape, crop.dtype)
        if out is None:
            out = cuda.device_array(vertices.shape, dtype=np.uint8, stream=stream)
        _colors_kernel[_blocks(vertices.shape[0]), _THREADS, stream](crop, vertices, out)
    return out
