"""The landmark regressor (:class:`~vrn.model.landmark_net.LandmarkRegressor`) as one
fp32 ONNX graph: input ``crop`` ``(N, 3, 120, 120)`` float32 (BGR, ``(pixel - 127.5) /
128``), output ``landmarks`` ``(N, 68, 3)`` float32 in the crop's MATLAB-style frame,
with a symbolic batch. Batch norms are folded into the convolutions before export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch

from ..model.landmark_net import INPUT_SIZE, NUM_LANDMARKS, LandmarkRegressor, fuse_batch_norms
from .onnx_export import BATCH_DIM, DEFAULT_OPSET, save_onnx

INPUT_NAME = "crop"
OUTPUT_NAME = "landmarks"


def export_landmark_onnx(model: LandmarkRegressor, path: str | os.PathLike, *,
                         opset: int = DEFAULT_OPSET,
                         metadata: dict[str, str] | None = None) -> Path:
    """Export ``model`` (not modified) to ``path`` as one self-contained ONNX file,
    atomically, with the dynamo exporter; ``metadata`` goes to ``metadata_props``.
    Raises ``ValueError`` if the graph's interface is not the documented one."""
    prepared = fuse_batch_norms(model)
    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)  # 2 keeps the batch symbolic
    batch = torch.export.Dim(BATCH_DIM, min=1, max=1024)
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(prepared, (example,), dynamo=True, optimize=True,
                                        dynamic_shapes=({0: batch},), opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        external_data=False, verbose=False)
    finally:
        logger.setLevel(level)
    proto = program.model_proto
    for node in proto.graph.node:  # exporter stack traces: machine-specific, unused
        del node.metadata_props[:]
    _check_interface(proto)
    if metadata:
        props = {p.key: p.value for p in proto.metadata_props}
        props.update({str(k): str(v) for k, v in metadata.items()})
        onnx.helper.set_model_props(proto, props)
    return save_onnx(proto, path)


def _check_interface(proto: onnx.ModelProto) -> None:
    onnx.checker.check_model(proto)
    want = {INPUT_NAME: [BATCH_DIM, 3, INPUT_SIZE, INPUT_SIZE],
            OUTPUT_NAME: [BATCH_DIM, NUM_LANDMARKS, 3]}
    values = list(proto.graph.input) + list(proto.graph.output)
    got = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
           for v in values}
    if got != want:
        raise ValueError(f"landmark graph interface is {got}, expected {want}")
