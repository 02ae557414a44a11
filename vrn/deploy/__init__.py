"""Deployment: ``vrn-export``'s orchestration above both :mod:`vrn.export` (which
writes the artifacts: ONNX graphs, fp16 graphs, TensorRT engines and their sidecars)
and :mod:`vrn.runtime` (whose backends run them). :mod:`.exporter` chains the steps;
:mod:`.parity` checks each artifact by running it through the runtime's own backend
classes, the ones ``vrn-live`` runs.

Names are imported on first use.
"""

import importlib

_NAMES = {
    "ExportError": "exporter", "Exporter": "exporter", "GRAPH_TARGETS": "exporter",
    "ParityReport": "parity", "check_parity": "parity", "parity_inputs": "parity",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
