"""The one small interface every inference backend implements."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs the network on a batch of crops.

    ``infer(batch)``: ``batch`` ``(N, 3, S, S)`` float32 RGB in [0, 1] -> occupancy
    ``(N, D, S, S)`` float32 in [0, 1], ``(D, H, W)`` per image. A NumPy batch gives a
    NumPy volume; GPU backends also take and return CUDA arrays (torch tensors) so the
    volume can stay on the device.
    """

    name: str          # "torch", "onnxruntime", "tensorrt"
    device: str        # "cpu" or "cuda"
    precision: str     # "fp32", "fp16", ...
    input_size: int    # S
    out_depth: int     # D

    def infer(self, batch) -> np.ndarray: ...

    def describe(self) -> str:
        """One line: backend, device, precision and anything the user should know."""
        ...
