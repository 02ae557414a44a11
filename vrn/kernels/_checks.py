"""Argument checks shared by the CPU and CUDA kernels, and the level classification both
marching-cubes twins use (so they give the same bits)."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

VOLUME_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint8))


def is_cuda_array(obj) -> bool:
    """Whether ``obj`` is a CUDA array (Numba device array, simulated too, or anything
    with ``__cuda_array_interface__``, such as a CUDA torch tensor)."""
    if type(obj).__module__.startswith("numba.cuda"):  # device arrays, simulated too
        return True
    try:
        return hasattr(obj, "__cuda_array_interface__")
    except Exception:  # some objects raise from the property instead of AttributeError
        return False


def check_level(level) -> float:
    """``level`` as a finite float32 value (a Python float), or ``ValueError``."""
    if isinstance(level, (bool, np.bool_)) or not isinstance(level, (Real, np.number)):
        raise ValueError(f"level must be a real number; got {level!r}")
    with np.errstate(over="ignore"):
        level32 = np.float32(level)
    if not math.isfinite(level32):
        raise ValueError(f"level must be a finite float32; got {level!r}")
    return float(level32)


def check_volume(shape: tuple, dtype, ndim: int) -> None:
    """Raise unless ``shape`` and ``dtype`` describe a ``(D, H, W)`` (``ndim`` 3) or
    ``(N, D, H, W)`` (``ndim`` 4) volume the kernels take."""
    layout = "(D, H, W)" if ndim == 3 else "(N, D, H, W)"
    if len(shape) != ndim:
        raise ValueError(f"volume must be {ndim}-D {layout}; got shape {tuple(shape)}")
    if min(shape[-3:]) < 2:
        raise ValueError(f"volume must be at least 2 x 2 x 2; got shape {tuple(shape)}")
    if np.dtype(dtype) not in VOLUME_DTYPES:
        raise TypeError(f"volume dtype must be float32, float16 or uint8; got "
                        f"{np.dtype(dtype)} (convert with .astype(np.float32))")


def classification(dtype, level: float) -> tuple[float, float, float]:
    """``(threshold, level, divisor)`` for the kernels, for volumes of ``dtype``.

    A raw voxel value ``v`` is above the level when ``float32(v) > threshold``; a vertex
    between raw values ``a`` and ``b`` uses ``a / divisor`` and ``b / divisor``. For
    uint8 the threshold is the integer cut that makes ``v > threshold`` equal to
    ``float32(v) / 255 > level``, so uint8 and the float32 volume ``v / 255`` give the
    same mesh, bit for bit, without converting the volume.
    """
    level32 = np.float32(level)
    if np.dtype(dtype) == np.uint8:
        scaled = np.arange(256, dtype=np.float32) / np.float32(255)
        first_above = int(np.argmax(scaled > level32)) if (scaled > level32).any() else 256
        return float(np.float32(first_above) - np.float32(0.5)), float(level32), 255.0
    return float(level32), float(level32), 1.0


def check_vertices(shape, dtype) -> None:
    """Raise unless ``shape`` and ``dtype`` describe ``(V, 3)`` float32 vertices."""
    if len(shape) != 2 or shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3); got {tuple(shape)}")
    if np.dtype(dtype) != np.float32:
        raise TypeError(f"vertices must be float32; got {np.dtype(dtype)}")


def check_crop(shape, dtype) -> None:
    """Raise unless ``shape`` and ``dtype`` describe a ``(3, H, W)`` float32 crop."""
    if len(shape) != 3 or shape[0] != 3 or min(shape) < 1:
        raise ValueError(f"crop must have shape (3, H, W); got {tuple(shape)}")
    if np.dtype(dtype) != np.float32:
        raise TypeError(f"crop must be float32; got {np.dtype(dtype)}")
