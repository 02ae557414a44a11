"""The one small interface every inference backend implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs the network on a batch of crops.

    ``infer(batch, landmarks=None, *, on_device=None)``: ``batch`` ``(N, 3, S, S)``
    float32 RGB in [0, 1] and, for a landmark-guided model (``guided`` is true),
    ``landmarks`` ``(N, 68, 3)`` float32 crop pixels ``(x, y, z)`` (ignored by other models)
    -> occupancy ``(N, D, S, S)`` float32 in [0, 1], ``(D, H, W)`` per image. A
    NumPy batch gives a NumPy volume; GPU backends also take CUDA arrays (torch tensors)
    and, with ``on_device=True`` (the default for a CUDA input), return the volume as a
    CUDA array so it never leaves the device (float16 from the torch backend at fp16:
    marching cubes takes it as it is). ``synchronize()`` waits for queued device
    work. ``model_info`` is the :class:`~vrn.model.ModelInfo` of the weights;
    ``selection_reason`` (set by :func:`~vrn.runtime.backends.create_backend`) says why
    this backend was chosen.
    """

    name: str          # "torch", "onnxruntime", "tensorrt"
    device: str        # "cpu" or "cuda"
    precision: str     # "fp32", "fp16", ...
    input_size: int    # S
    out_depth: int     # D
    guided: bool       # takes landmarks
    model_info: object
    selection_reason: str

    def infer(self, batch, landmarks=None, *, on_device: bool | None = None
              ) -> np.ndarray: ...

    def synchronize(self) -> None: ...

    def describe(self) -> str:
        """One line: backend, device, precision and anything the user should know."""
        ...


def checked_landmarks(landmarks, batch_size: int) -> np.ndarray:
    """``landmarks`` as a C-contiguous ``(N, 68, 3)`` float32 array, checked to match the
    batch and to be finite."""
    if landmarks is None:
        raise ValueError("this model is landmark-guided: infer() needs landmarks "
                         "(N, 68, 3) crop pixels")
    if hasattr(landmarks, "detach"):
        landmarks = landmarks.detach().cpu().numpy()
    landmarks = np.ascontiguousarray(landmarks, dtype=np.float32)
    if landmarks.shape != (batch_size, 68, 3):
        raise ValueError(f"landmarks must be ({batch_size}, 68, 3), got {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise ValueError("landmarks must be finite")
    return landmarks


def info_from_metadata(metadata: dict):
    """The :class:`~vrn.model.ModelInfo` that ``metadata`` (an ONNX file's
    ``metadata_props``, or an engine sidecar's copy of them: a ``{str: str}`` dict)
    describes; ``None`` when it describes none or an invalid one."""
    from ...model import ModelInfo

    if "architecture" not in metadata or "config" not in metadata:
        return None
    try:
        return ModelInfo.from_metadata(metadata)
    except (KeyError, ValueError, TypeError):
        return None
