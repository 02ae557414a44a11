"""Deployment artifacts: PyTorch -> fp32 ONNX (:mod:`.onnx_export`) -> fp16 ONNX
(:mod:`.fp16`) -> TensorRT engine (:mod:`.tensorrt_build`; engine files and their
metadata in :mod:`.engine_file`), and the landmark stage's graph
(:mod:`.landmark_onnx`). The writers only: :mod:`vrn.deploy` chains them for
``vrn-export`` and checks each artifact through the runtime's backends, which import
this package (so it imports neither).

Names are imported on first use, so loading an engine (:func:`load_engine`) does not
import the ONNX tooling; TensorRT itself is only imported inside functions.
"""

import importlib

_NAMES = {
    "EngineMetadata": "engine_file", "GpuInfo": "engine_file", "check_engine": "engine_file",
    "current_gpu": "engine_file", "load_engine": "engine_file", "read_metadata": "engine_file",
    "convert_to_fp16": "fp16", "export_fp16": "fp16",
    "export_onnx": "onnx_export", "fold_batch_norms": "onnx_export",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
