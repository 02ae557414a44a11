"""Importing TensorRT: the version check and the process's one logger, shared by the
engine builder (:mod:`.tensorrt_build`) and the engine reader (:mod:`.engine_file`).

``tensorrt`` is imported inside the functions; importing this module needs nothing.
"""

from __future__ import annotations

import functools
import re

from ..errors import BackendUnavailableError

MIN_VERSION = (10, 3)


def import_tensorrt():
    """Import ``tensorrt`` or raise :class:`BackendUnavailableError` saying why.

    Versions before 10.3 are refused (no strongly typed ONNX path we rely on).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT is not available ({exc}); install it (`pip install tensorrt` on a "
            "desktop GPU; on Jetson it comes with JetPack: create the venv with "
            "--system-site-packages)") from None
    version = parse_version(trt.__version__)
    if version[:2] < MIN_VERSION:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old; vrn-export "
                                      f"needs {MIN_VERSION[0]}.{MIN_VERSION[1]} or newer")
    return trt


def parse_version(text: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)`` (non-numeric parts end the tuple)."""
    parts = []
    for piece in str(text).split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts) or (0,)


@functools.lru_cache(maxsize=1)
def tensorrt_logger():
    """One ``tensorrt.Logger`` (warnings and errors) per process."""
    trt = import_tensorrt()
    return trt.Logger(trt.Logger.WARNING)
