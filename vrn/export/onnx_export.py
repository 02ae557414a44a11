"""PyTorch model -> fp32 ONNX graph with a dynamic batch, checked op by op.

The graph has the input ``image`` ``(N, 3, S, S)`` float32, RGB in [0, 1] (and, for a
landmark-guided model, ``landmarks`` ``(N, 68, 3)`` float32 crop pixels ``(x, y, z)``, whose
heatmaps are rendered inside the graph), and one output ``volume`` ``(N, D, S, S)``
float32 occupancy in [0, 1] (``(D, H, W)`` per image, larger ``d`` nearer the camera),
with ``1 <= N <= max_batch``. VRN-Multitask and VRN-Guided export the same single
output: their heatmaps are intermediate tensors the runtime does not read, so the
landmark head of VRN-Multitask is dropped from the graph.

Batch norm: in ``"running"`` mode each batch norm that follows a convolution is folded
into it, and the pre-activation ones (after an addition or pooling, where there is no
convolution to fold into) become a per-channel ``Mul`` and ``Add``; the graph holds no
``BatchNormalization``. In ``"instance"`` mode each exports as ``InstanceNormalization``.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..atomic import atomic_path
from ..model import GUIDED_ARCHITECTURES, NUM_LANDMARKS, BatchNorm2d, VRNGuided, set_bn_mode
from ..model.checkpoint import model_info

INPUT_NAME = "image"
LANDMARKS_NAME = "landmarks"
OUTPUT_NAME = "volume"
BATCH_DIM = "batch"
DEFAULT_OPSET = 20
# The largest batch an exported graph (and an engine built from it) takes by default:
# the pipeline batches the faces of one frame, rarely more than 4.
DEFAULT_MAX_BATCH = 4
MAX_PROTO_BYTES = 2**31 - 1  # protobuf's limit for one self-contained file

# Every op a VRN graph may hold; anything else (a Cast, a Transpose) is an exporter
# regression that would cost time on the device.
EXPECTED_OPS = frozenset({"Conv", "Relu", "Add", "Mul", "MaxPool", "Resize", "Sigmoid",
                          "InstanceNormalization", "Concat", "Shape"})
# A landmark-guided graph also renders its heatmaps and depth field (Slice, Gather, Sub,
# Pow, Exp, Unsqueeze, Softmax, reductions) and smooths its logits along depth (Pad, a
# 3-D Conv, Squeeze). Its Mul count depends on the exporter's fusions and is not checked.
GUIDED_OPS = frozenset({"Slice", "Gather", "Sub", "Pow", "Exp", "Unsqueeze", "Squeeze", "Pad",
                        "Softmax", "ReduceMax", "ReduceMin", "ReduceSum", "Abs",
                        "Clip", "MatMul", "Div", "Greater", "GridSample", "Min",
                        "ReduceL2", "ReduceMean", "Reshape", "Transpose", "Where"})


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel: a running-mode batch norm with its statistics
    folded in, for the batch norms that no convolution precedes.
    ``(N, C, H, W) -> (N, C, H, W)``."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.scale = nn.Parameter(scale.reshape(1, -1, 1, 1))
        self.shift = nn.Parameter(shift.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: the file, its interface and its op counts."""

    path: Path
    input_name: str
    input_shape: list  # ["batch", C, S, S]
    output_name: str
    output_shape: list  # ["batch", D, S, S]
    max_batch: int
    opset: int
    bn_mode: str
    op_counts: dict = field(default_factory=dict)
    landmarks_name: str | None = None  # the second input of a landmark-guided graph
    folded_batch_norms: int = 0
    affine_batch_norms: int = 0


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The running-mode batch norm as ``x * scale + shift`` (computed in float64)."""
    var = bn.running_var.double()
    scale = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
    shift = bn.bias.detach().double() - bn.running_mean.double() * scale
    return scale, shift


def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale, shift = _bn_scale_shift(bn)
    weight = conv.weight.detach().double() * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    conv.weight = nn.Parameter(weight.to(conv.weight.dtype))
    conv.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype))


def fold_batch_norms(model: nn.Module) -> tuple[nn.Module, int, int]:
    """Fold ``model``'s running-mode batch norms, in place.

    A batch norm directly after a convolution (inside an ``nn.Sequential``, or a
    residual's ``conv1 -> bn2`` and ``conv2 -> bn3``) is folded into that convolution's
    weights and bias and replaced by ``nn.Identity``; every other one becomes a
    :class:`ChannelAffine`. Returns ``(model, folded, affine)`` counts.
    """
    from ..model import Residual

    folded = 0
    for module in list(model.modules()):
        pairs = []
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            pairs = [(a, b) for a, b in zip(names, names[1:])
                     if isinstance(module._modules[a], nn.Conv2d)
                     and isinstance(module._modules[b], nn.BatchNorm2d)]
        elif isinstance(module, Residual):
            pairs = [("conv1", "bn2"), ("conv2", "bn3")]
        for conv_name, bn_name in pairs:
            bn = getattr(module, bn_name)
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            _fold_into_conv(getattr(module, conv_name), bn)
            setattr(module, bn_name, nn.Identity())
            folded += 1
    affine = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                scale, shift = _bn_scale_shift(child)
                setattr(module, name, ChannelAffine(scale.float(), shift.float()))
                affine += 1
    return model, folded, affine


def export_model(model: nn.Module, bn_mode: str | None = None) -> tuple[nn.Module, int, int]:
    """A copy of ``model`` ready to trace: evaluation mode, batch norms in ``bn_mode``
    (default: the model's own), running-mode ones folded. Returns ``(copy, folded,
    affine)``; ``model`` itself is not changed."""
    bn_mode = bn_mode or getattr(model, "bn_mode", None) or model_info(model).bn_mode
    prepared = copy.deepcopy(model).cpu().float().eval()
    set_bn_mode(prepared, bn_mode)
    if bn_mode == "running":
        return fold_batch_norms(prepared)
    return prepared, 0, 0


def is_guided(model: nn.Module) -> bool:
    """Whether ``model`` takes landmarks beside the image."""
    return getattr(model, "architecture", None) in GUIDED_ARCHITECTURES


def example_inputs(model: nn.Module, batch: int = 1, *, device="cpu",
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Random inputs for ``model``: ``(image (N, C, S, S),)`` in [0, 1], plus
    ``landmarks (N, 68, 3)`` crop pixels for a landmark-guided model (a face-sized
    cloud about the crop's centre)."""
    channels, size = input_shape(model)
    image = torch.rand(batch, channels, size, size, generator=generator).to(device)
    if not is_guided(model):
        return (image,)
    spread = torch.rand(batch, NUM_LANDMARKS, 3, generator=generator) - 0.5
    landmarks = (size - 1) / 2 + spread * (90.0 * size / 192)
    return image, landmarks.to(device)


def input_shape(model: nn.Module) -> tuple[int, int]:
    """``(channels, size)`` of the image ``model`` takes (3 for every variant: VRN-Guided
    stacks its heatmaps onto the image inside the graph)."""
    channels = 3 if isinstance(model, VRNGuided) else model.config.in_channels
    return channels, model.config.input_size


def expected_op_counts(prepared: nn.Module) -> dict[str, int]:
    """Op counts the exported volume graph of ``prepared`` (see :func:`export_model`)
    must hold: one ``Conv`` per convolution, one ``InstanceNormalization`` per
    instance-mode batch norm, one ``Mul`` per :class:`ChannelAffine`, no
    ``BatchNormalization``.

    Counts only the modules the volume depends on (VRN-Multitask's landmark head does
    not reach it): the parameters found in the autograd graph of the volume, computed
    on the ``meta`` device (shapes only, no arithmetic, no backward pass).
    """
    params = {name: torch.empty_like(p, device="meta").requires_grad_(True)
              for name, p in prepared.named_parameters()}
    buffers = {name: torch.empty_like(b, device="meta") for name, b in prepared.named_buffers()}
    inputs = tuple(torch.empty_like(x, device="meta") for x in example_inputs(prepared))
    with torch.enable_grad():
        volume = torch.func.functional_call(prepared, {**params, **buffers}, inputs)
    reached = _parameters_reaching(volume)
    used_names = {name for name, tensor in params.items() if id(tensor) in reached}

    def used(kind, attr="weight"):
        return sum(1 for name, m in prepared.named_modules()
                   if isinstance(m, kind) and (f"{name}.{attr}" if name else attr) in used_names)

    counts = {"Conv": used(nn.Conv2d), "InstanceNormalization": used(BatchNorm2d),
              "Mul": used(ChannelAffine, "scale"), "BatchNormalization": 0}
    if is_guided(prepared):
        counts["Conv"] += 2  # the depth and plane smoothing (F.conv3d, fixed kernels)
        del counts["Mul"]
    return counts


def _parameters_reaching(output: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor (parameter) in ``output``'s autograd graph."""
    reached, seen, stack = set(), set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def check_graph(proto: onnx.ModelProto, *, expected: dict[str, int],
                channels: int, size: int, out_depth: int, guided: bool = False
                ) -> dict[str, int]:
    """Run ``onnx.checker`` and strict shape inference, and compare op counts and the
    interface with what the model implies (``guided``: a second input ``landmarks``).
    Returns the op counts; raises ``ValueError`` naming the first difference."""
    onnx.checker.check_model(proto, full_check=False)
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True,
                                                 data_prop=True)
    counts = dict(collections.Counter(node.op_type for node in proto.graph.node))
    unexpected = sorted(set(counts) - EXPECTED_OPS - (GUIDED_OPS if guided else frozenset()))
    if unexpected:
        raise ValueError(f"exported graph holds unexpected ops {unexpected}")
    for op, want in expected.items():
        if counts.get(op, 0) != want:
            raise ValueError(f"exported graph holds {counts.get(op, 0)} {op} nodes, "
                             f"the model implies {want}")
    want_in = [[BATCH_DIM, channels, size, size]]
    if guided:
        want_in.append([BATCH_DIM, NUM_LANDMARKS, 3])
    want_out = [[BATCH_DIM, out_depth, size, size]]
    for values, wants in ((inferred.graph.input, want_in), (inferred.graph.output, want_out)):
        if len(values) != len(wants):
            raise ValueError(f"exported graph has {len(values)} inputs/outputs, expected "
                             f"{len(wants)}")
        for value, want in zip(values, wants):
            if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
                raise ValueError(f"graph {value.name!r} is not float32")
            got = _shape(value)
            if got != want:
                raise ValueError(f"graph {value.name!r} has shape {got}, expected {want}")
    return counts


def _shape(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.dim_param else d.dim_value
            for d in value.type.tensor_type.shape.dim]


def _strip_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata (source paths and stack traces): it makes
    the file depend on where it was exported, and the device has no use for it."""
    for node in proto.graph.node:
        del node.metadata_props[:]
    for value in list(proto.graph.input) + list(proto.graph.output):
        del value.metadata_props[:]
    for init in proto.graph.initializer:
        del init.metadata_props[:]


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress lines and its warnings about optional packages
    (torchvision ops); real errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def trace_to_onnx(prepared: nn.Module, *, max_batch: int, opset: int) -> onnx.ModelProto:
    """Export ``prepared`` (see :func:`export_model`) with the dynamo exporter and return
    the in-memory ``ModelProto`` with a symbolic ``batch`` dimension."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    # An example batch of 2 keeps torch.export from specialising the batch to 1.
    example = example_inputs(prepared, 2)
    names = [INPUT_NAME, LANDMARKS_NAME][:len(example)]
    batch = torch.export.Dim(BATCH_DIM, min=1, max=max(max_batch, 2))
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(prepared, example, dynamo=True, optimize=True,
                                    dynamic_shapes=tuple({0: batch} for _ in example),
                                    opset_version=opset,
                                    input_names=names, output_names=[OUTPUT_NAME],
                                    external_data=False, verbose=False)
    proto = program.model_proto
    _strip_metadata(proto)
    return proto


def export_onnx(model: nn.Module, path: str | os.PathLike, *,
                max_batch: int = DEFAULT_MAX_BATCH,
                opset: int = DEFAULT_OPSET, bn_mode: str | None = None,
                metadata: dict[str, str] | None = None) -> OnnxExport:
    """Export ``model``'s volume graph to ``path`` as one self-contained fp32 ONNX file.

    Parameters
    ----------
    model : VRN, VRNMultitask, VRNGuided or VRNLandmarkGuided
        Any configuration; not modified.
    path : path
        Written atomically; a failed export or check leaves it untouched.
    max_batch : int
        Largest batch the graph is meant for (the batch dimension is symbolic).
    opset : int
        ONNX opset of the default domain (the dynamo exporter needs >= 18).
    bn_mode : {"running", "instance"}, optional
        Batch-norm mode to export; the model's own by default.
    metadata : dict of str, optional
        Extra ``metadata_props`` to store in the file (model description, batch range).
    """
    path = Path(path)
    bn_mode = bn_mode or getattr(model, "bn_mode", None) or model_info(model).bn_mode
    prepared, folded, affine = export_model(model, bn_mode)
    proto = trace_to_onnx(prepared, max_batch=max_batch, opset=opset)
    channels, size = input_shape(model)
    expected = expected_op_counts(prepared)
    counts = check_graph(proto, expected=expected, channels=channels, size=size,
                         out_depth=model.config.out_depth, guided=is_guided(model))
    if metadata:
        props = {p.key: p.value for p in proto.metadata_props}
        props.update({str(k): str(v) for k, v in metadata.items()})
        onnx.helper.set_model_props(proto, props)
    save_onnx(proto, path)
    return OnnxExport(path=path, input_name=INPUT_NAME,
                      input_shape=[BATCH_DIM, channels, size, size], output_name=OUTPUT_NAME,
                      output_shape=[BATCH_DIM, model.config.out_depth, size, size],
                      max_batch=max_batch, opset=opset, bn_mode=bn_mode, op_counts=counts,
                      folded_batch_norms=folded, affine_batch_norms=affine,
                      landmarks_name=LANDMARKS_NAME if is_guided(model) else None)


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``proto`` to ``path`` as one file (no external data), atomically.

    Raises ``ValueError`` when the graph is too large for a single protobuf file (2 GB).
    """
    path = Path(path)
    size = proto.ByteSize()
    if size > MAX_PROTO_BYTES:
        raise ValueError(f"{path}: graph is {size / 2**30:.2f} GiB, over the 2 GiB limit "
                         "of a self-contained ONNX file")
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
    return path


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (``ValueError`` if it is not one)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf decode errors share no base class
        raise ValueError(f"{path}: not a readable ONNX file ({exc})") from None
    return {p.key: p.value for p in proto.metadata_props}


def graph_io(proto: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """``(inputs, outputs)`` of a graph as ``{"name", "shape", "dtype"}`` dicts; symbolic
    dimensions are their names (``"batch"``)."""
    def describe(value):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        return {"name": value.name, "shape": _shape(value), "dtype": np.dtype(dtype).name}

    return ([describe(v) for v in proto.graph.input],
            [describe(v) for v in proto.graph.output])
