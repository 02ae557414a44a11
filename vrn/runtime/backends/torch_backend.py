"""PyTorch backend: CPU fp32, or CUDA fp16/fp32 with channels-last."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...errors import BackendUnavailableError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchBackend:
    """Eager PyTorch inference of a loaded model (see :func:`vrn.model.load_model`).

    ``precision`` ``"fp16"`` needs CUDA; ``"bf16"`` runs on CPUs that support it.
    """

    name = "torch"

    def __init__(self, model: nn.Module, *, device: str = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("torch backend: CUDA requested but "
                                          "torch.cuda.is_available() is False")
        if device.type == "cpu" and precision == "fp16":
            raise BackendUnavailableError("torch backend: fp16 needs CUDA; use fp32 or bf16 "
                                          "on the CPU")
        self.model = model.eval().to(device)
        self.device = device.type
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        if self.device == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.input_size = model.config.input_size
        self.out_depth = model.config.out_depth
        self._torch_device = device

    @torch.inference_mode()
    def infer(self, batch):
        """``(N, 3, S, S)`` float32 -> ``(N, D, S, S)`` float32 (NumPy in, NumPy out;
        a torch tensor in gives a torch tensor on this backend's device out)."""
        as_numpy = isinstance(batch, np.ndarray)
        x = torch.from_numpy(batch) if as_numpy else batch
        x = x.to(self._torch_device, non_blocking=True)
        if self.device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype != torch.float32:
            with torch.autocast(self.device, dtype=self.dtype):
                y = self.model(x)
        else:
            y = self.model(x)
        y = y.float()
        return y.cpu().numpy() if as_numpy else y

    def describe(self) -> str:
        threads = f", {torch.get_num_threads()} threads" if self.device == "cpu" else ""
        return f"torch {torch.__version__} ({self.device}, {self.precision}{threads})"
