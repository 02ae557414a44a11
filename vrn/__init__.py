"""vrn-edge: VRN 3D face reconstruction for edge devices.

>>> import vrn
>>> faces = vrn.reconstruct(vrn.runtime.sample_image_path())  # doctest: +SKIP
>>> faces[0].mesh.vertices.shape  # (V, 3) float32, photo pixels  # doctest: +SKIP

Subpackages, lowest first (each imports only those before it): :mod:`vrn.kernels`,
:mod:`vrn.model`, :mod:`vrn.data`, :mod:`vrn.export` (the ONNX and engine writers),
:mod:`vrn.runtime` (the per-frame pipeline), :mod:`vrn.deploy` (``vrn-export``: the
writers checked through the runtime's backends), :mod:`vrn.train`, :mod:`vrn.eval`,
:mod:`vrn.bench`, :mod:`vrn.viewer`, and :mod:`vrn.cli` (the commands). Shared by all:
:mod:`vrn.errors`, :mod:`vrn.atomic`, :mod:`vrn.metrics`, :mod:`vrn.image_io`,
:mod:`vrn.signals`, :mod:`vrn.cuda_driver`.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Reconstructor", "reconstruct", "__version__"]


def __getattr__(name):
    # Lazy, so `import vrn.model` does not pay for the runtime's imports.
    if name in ("Reconstructor", "reconstruct"):
        return getattr(importlib.import_module("vrn.runtime.pipeline"), name)
    if name in ("model", "export", "kernels", "runtime"):
        return importlib.import_module(f"vrn.{name}")
    raise AttributeError(f"module 'vrn' has no attribute {name!r}")
