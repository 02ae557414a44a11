"""Inference backends behind one interface (:class:`~.base.Backend`), one module each;
heavy imports happen inside them."""

from .base import Backend
from .torch_backend import TorchBackend

__all__ = ["Backend", "TorchBackend"]
