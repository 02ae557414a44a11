"""ONNX Runtime int8 post-training quantisation of an fp32 volume graph, for the CPU.

Two recipes (:data:`INT8_RECIPES`):

- ``"int8-dynamic"``: :func:`onnxruntime.quantization.quantize_dynamic`, int8 weights,
  activation ranges computed per run (``ConvInteger`` / ``DynamicQuantizeLinear``).
- ``"int8-static"``: :func:`onnxruntime.quantization.quantize_static`, QDQ format with
  uint8 activations and per-channel int8 weights calibrated (min/max) on face crops;
  ONNX Runtime fuses the pairs into ``QLinearConv``. Activations are uint8 because the
  x86 AVX2/AVX512 int8 kernels take u8 x s8 products. Every op but
  ``InstanceNormalization`` (:data:`STATIC_OPS`) is quantised; the normalisations stay
  float, between a dequantise and a quantise.

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
STATIC_OPS = ("Conv", "Relu", "Add", "Mul", "MaxPool", "Resize", "Concat", "Sigmoid")


class _CropReader:
    """Feeds ``(1, 3, S, S)`` float32 calibration crops to ONNX Runtime's calibrator."""

    def __init__(self, input_name: str, batch: np.ndarray):
        self._feeds = [{input_name: batch[i:i + 1]} for i in range(len(batch))]
        self._items = iter(self._feeds)

    def get_next(self):
        return next(self._items, None)

    def rewind(self):
        self._items = iter(self._feeds)


def _input_name(path: Path) -> str:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}
    return next(v.name for v in graph.input if v.name not in initializers)


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike, *,
                  recipe: str, calibration: np.ndarray | None = None) -> Path:
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
    with tempfile.TemporaryDirectory(dir=out_path.parent) as workdir, \
            atomic_path(out_path) as tmp:
        prepared = Path(workdir) / "prepared.onnx"
        # Shape inference and constant folding first, as ONNX Runtime recommends.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        if recipe == "int8-dynamic":
            quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8,
                             per_channel=False)
        else:
            quantize_static(str(prepared), str(tmp),
                            _CropReader(_input_name(prepared), calibration),
                            quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(STATIC_OPS), per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    return out_path
