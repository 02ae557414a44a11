"""The one small interface every inference backend implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs the network on a batch of crops.

    ``infer(batch, *, on_device=None)``: ``batch`` ``(N, 3, S, S)`` float32 RGB in
    [0, 1] -> occupancy ``(N, D, S, S)`` float32 in [0, 1], ``(D, H, W)`` per image. A
    NumPy batch gives a NumPy volume; GPU backends also take CUDA arrays (torch tensors)
    and, with ``on_device=True`` (the default for a CUDA input), return the volume as a
    CUDA array so it never leaves the device. ``synchronize()`` waits for queued device
    work. ``model_info`` is the :class:`~vrn.model.ModelInfo` of the weights;
    ``selection_reason`` (set by :func:`~vrn.runtime.backends.create_backend`) says why
    this backend was chosen.
    """

    name: str          # "torch", "onnxruntime", "tensorrt"
    device: str        # "cpu" or "cuda"
    precision: str     # "fp32", "fp16", ...
    input_size: int    # S
    out_depth: int     # D
    model_info: object
    selection_reason: str

    def infer(self, batch, *, on_device: bool | None = None) -> np.ndarray: ...

    def synchronize(self) -> None: ...

    def describe(self) -> str:
        """One line: backend, device, precision and anything the user should know."""
        ...
