"""Inference at run time: image reading (:mod:`vrn.image_io`), detection (:mod:`.detect`),
cropping (:mod:`.crop`), backends (:mod:`.backends`), the per-frame pipeline
(:mod:`.pipeline`), mesh output (:mod:`.mesh`) and drawing (:mod:`.render`)."""

import importlib

from .detect import FaceBox, create_detector
from ..image_io import load_image, sample_image_path
from .mesh import FaceMesh, save_mesh

__all__ = ["FaceBox", "FaceMesh", "FaceResult", "FrameResult", "Reconstructor",
           "create_detector", "load_image", "reconstruct", "sample_image_path", "save_mesh"]


def __getattr__(name):
    if name in ("FaceResult", "FrameResult", "Reconstructor", "reconstruct"):
        return getattr(importlib.import_module("vrn.runtime.pipeline"), name)
    raise AttributeError(f"module 'vrn.runtime' has no attribute {name!r}")
