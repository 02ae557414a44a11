"""The CUDA driver library (``libcuda``) through ctypes: what the engine checks and the
marching-cubes kernels ask the driver directly (device count and names, compute
capability, which device a pointer lives on), without importing torch or numba."""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def libcuda() -> ctypes.CDLL | None:
    """The CUDA driver library, or ``None`` where there is no NVIDIA driver."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None
