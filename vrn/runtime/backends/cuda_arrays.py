"""CUDA plumbing the GPU backends share: PyTorch with CUDA when it is there, and the
device address of a CUDA array."""

from __future__ import annotations


def torch_cuda():
    """The ``torch`` module when it is installed and sees a CUDA device, else ``None``."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def device_pointer(array) -> int:
    """Device address of a CUDA array (``__cuda_array_interface__``: Numba device arrays,
    CUDA torch tensors, CuPy arrays)."""
    return int(array.__cuda_array_interface__["data"][0])
