"""ONNX Runtime int8 post-training quantisation of an fp32 volume graph, for the CPU.

Two recipes (:data:`INT8_RECIPES`):

- ``"int8-dynamic"``: :func:`onnxruntime.quantization.quantize_dynamic`, int8 weights,
  activation ranges computed per run (``ConvInteger`` / ``DynamicQuantizeLinear``).
- ``"int8-static"``: :func:`onnxruntime.quantization.quantize_static`, QDQ format with
  uint8 activations and per-channel int8 weights calibrated (min/max) on face crops
  (with their landmarks, for a landmark-guided graph; ``vrn-bench`` calibrates on crops
  other than those it validates on, :func:`vrn.bench.validation.calibration_crops`);
  ONNX Runtime fuses the pairs into ``QLinearConv``. Activations are uint8 because the
  x86 AVX2/AVX512 int8 kernels take u8 x s8 products. Every op but
  ``InstanceNormalization`` (:data:`STATIC_OPS`) is quantised; the normalisations stay
  float, between a dequantise and a quantise.

In a landmark-guided graph both leave the guidance float: the nodes that see only the
landmarks (heatmaps, the depth field and their 1x1 convolutions; :func:`guidance_nodes`)
are excluded, which keeps the landmark coordinates (crop pixels) off a uint8 grid; only
the sums where the guidance joins the image features are quantised.

Both keep float32 graph inputs and outputs, so any ONNX Runtime backend runs them.
Whether the result is good enough is judged by occupancy IoU against fp32
(:mod:`vrn.bench.validation`), never assumed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_path

INT8_RECIPES = ("int8-dynamic", "int8-static")
RECIPE_VERSION = "2"  # bump when a recipe changes (part of cached file names)
STATIC_OPS = ("Conv", "Relu", "Add", "Mul", "MaxPool", "Resize", "Concat", "Sigmoid")


class _CropReader:
    """Feeds ``(1, 3, S, S)`` float32 calibration crops (and, for a landmark-guided
    graph, their ``(1, 68, 3)`` float32 landmarks) to ONNX Runtime's calibrator."""

    def __init__(self, names: list[str], batch: np.ndarray, landmarks: np.ndarray | None):
        arrays = [batch] if len(names) == 1 else [batch, landmarks]
        self._feeds = [{name: a[i:i + 1] for name, a in zip(names, arrays)}
                       for i in range(len(batch))]
        self._items = iter(self._feeds)

    def get_next(self):
        return next(self._items, None)

    def rewind(self):
        self._items = iter(self._feeds)


def _input_names(path: Path) -> list[str]:
    """The graph's inputs: ``[image]``, or ``[image, landmarks]`` for a guided graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return [v.name for v in graph.input if v.name not in initializers]


def guidance_nodes(path: str | os.PathLike) -> list[str]:
    """Names of the nodes of the ONNX graph at ``path`` that do not depend on its first
    input (the image): in a landmark-guided graph, the guidance computed from the
    landmarks alone (and any constant folding left). Empty for a one-input graph."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if len(_input_names(Path(path))) < 2:
        return []
    seen = {graph.input[0].name}  # tensors that depend on the image (nodes are sorted)
    for node in graph.node:
        if any(name in seen for name in node.input):
            seen.update(node.output)
    return [node.name for node in graph.node if not any(name in seen for name in node.input)]


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, *,
                  recipe: str, calibration: np.ndarray | None = None,
                  calibration_landmarks: np.ndarray | None = None) -> Path:
    """Write the int8 version of the fp32 ONNX graph ``fp32_path`` to ``out_path``.

    Parameters
    ----------
    fp32_path : path
        A self-contained fp32 volume graph (see :func:`vrn.export.onnx_export.export_onnx`).
    out_path : path
        Written atomically.
    recipe : {"int8-dynamic", "int8-static"}
    calibration : (N, 3, S, S) float32 ndarray
        Face crops in [0, 1]; required for ``"int8-static"``.
    calibration_landmarks : (N, 68, 3) float32 ndarray
        The crops' landmarks in crop pixels ``(x, y, z)``; required for ``"int8-static"``
        of a landmark-guided graph (two inputs), ignored otherwise.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if recipe not in INT8_RECIPES:
        raise ValueError(f"recipe must be one of {INT8_RECIPES}, got {recipe!r}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"{fp32_path}: ONNX file not found")
    if recipe == "int8-static":
        calibration = np.asarray(calibration if calibration is not None else [], np.float32)
        if calibration.ndim != 4 or len(calibration) == 0:
            raise ValueError("int8-static needs calibration crops (N, 3, S, S), got shape "
                             f"{calibration.shape}")
        names = _input_names(fp32_path)
        if len(names) == 2:
            calibration_landmarks = _checked_landmarks(calibration_landmarks,
                                                       len(calibration))
    with tempfile.TemporaryDirectory(dir=out_path.parent) as workdir, \
            atomic_path(out_path) as tmp:
        prepared = Path(workdir) / "prepared.onnx"
        # Shape inference and constant folding first, as ONNX Runtime recommends.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        float_nodes = guidance_nodes(prepared)
        if recipe == "int8-dynamic":
            quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8,
                             per_channel=False, nodes_to_exclude=float_nodes)
        else:
            quantize_static(str(prepared), str(tmp),
                            _CropReader(names, calibration, calibration_landmarks),
                            quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OPS), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=float_nodes)
    return out_path


def _checked_landmarks(landmarks, count: int) -> np.ndarray:
    """Calibration landmarks as ``(count, 68, 3)`` float32, or a ValueError."""
    if landmarks is None:
        raise ValueError("int8-static of a landmark-guided graph needs calibration "
                         "landmarks (N, 68, 3) crop pixels")
    landmarks = np.ascontiguousarray(landmarks, np.float32)
    if landmarks.shape != (count, 68, 3):
        raise ValueError(f"calibration landmarks must be ({count}, 68, 3), got "
                         f"{landmarks.shape}")
    return landmarks
