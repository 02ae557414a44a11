"""fp32 ONNX -> fp16 ONNX: fp16 compute inside the graph, fp32 graph inputs and outputs.

TensorRT 11 is always strongly typed (and 10.x is, with ``STRONGLY_TYPED``): the engine
runs each layer in the type the ONNX graph gives it, so an fp16 engine needs an fp16
graph. The conversion here works per tensor, not per op pattern:

- float32 initializers and ``Constant`` values feeding fp16 compute become float16;
- a ``Cast`` is inserted wherever a tensor crosses between fp32 and fp16 nodes;
- every float graph output gets a final ``Cast`` back to float32 whatever node produces
  it. onnxconverter-common's ``keep_io_types`` (also behind polygraphy's
  ``--fp-to-fp16``) misses this when the last node is a ``Resize`` and leaves an fp16
  graph output; :func:`check_io_float32` guards against that trap.

Inputs that ONNX requires to stay float32 (``Resize``'s ``roi`` and ``scales``) stay
float32. Ops outside :data:`FP16_OPS`, those named in ``keep_fp32``, the nodes that
read a graph input, and a guided model's guidance geometry (the nodes computed from the
landmarks alone) run in fp32.

The nodes reading the graph input (VRN's first convolution) stay fp32 so that the
8-bit image reaches the network exactly (fp16 rounds ``k / 255`` by up to 1/16 of a
grey level); it costs 0.4% of the released network's compute and removes the casts at
the input. With the default weights it lifts the fp16 graph's occupancy IoU against
PyTorch on the face crop from 0.9925 to 0.9954 (ONNX Runtime).

Checking an fp16 graph on a CPU (:func:`emulate_fp16`): ONNX Runtime's CPU provider
runs most fp16 ops by casting to fp32 and back, and removes the casts it can, so it does
not compute the graph in fp16. The emulation makes the rounding explicit instead: every
node computes in fp32 and every tensor the graph holds in fp16 is rounded to fp16 (to
``inf`` past 65504) by a ``Cast`` pair ONNX Runtime keeps. That is fp16 storage with
fp32 accumulation, TensorRT's best case, and it shows fp16's rounding and overflow on
any machine.

``InstanceNormalization`` stays fp32 by default: its per-channel sums overflow fp16.
On the released architecture with the default weights (face crop input), the inputs of
the 273 normalisations reach ``|x| = 68`` and a per-channel mean square of 200, so one
channel's sum of squares over 48x48 pixels is about 4.6e5, seven times the fp16 maximum
(65504). Whether an fp16 kernel accumulates in fp32 is the runtime's choice, which we
cannot see from here; fp32 there is safe everywhere at the cost of reading and writing
those tensors in fp32. The convolutions, which hold almost all the compute, run in fp16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_export import save_onnx

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# Ops whose float inputs and outputs may all be float16 (ONNX type constraints allow
# it and TensorRT has fp16 kernels), except the input positions in FP32_INPUTS.
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Add", "Sub", "Mul",
    "Div", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Concat", "Reshape",
    "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Pad", "Shape",
    "Gather", "Split", "Clip", "MatMul", "Gemm", "Softmax", "BatchNormalization",
    "InstanceNormalization", "Constant", "Cast",
})
FP32_INPUTS = {"Resize": {1, 2}}  # roi, scales
DEFAULT_KEEP_FP32 = ("InstanceNormalization",)


def _geometry_nodes(graph: onnx.GraphProto) -> frozenset:
    """First output names of the nodes computed from the landmarks input alone (a guided model's
    guidance geometry: cheap, and it needs fp32's precision for crop coordinates)."""
    from .onnx_export import INPUT_NAME, LANDMARKS_NAME

    image, landmark = {INPUT_NAME}, {LANDMARKS_NAME}
    names = set()
    for node in graph.node:
        if any(name in image for name in node.input):
            image.update(node.output)
        elif any(name in landmark for name in node.input):
            landmark.update(node.output)
            names.add(node.output[0])
    return frozenset(names)


@dataclass
class Fp16Conversion:
    """What :func:`convert_to_fp16` did to a graph."""

    fp16_nodes: int
    fp32_nodes: int
    casts_added: int
    fp32_ops: dict = field(default_factory=dict)  # op type -> count kept in fp32
    initializers_converted: int = 0


def convert_to_fp16(proto: onnx.ModelProto, *, keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32,
                    keep_fp32_nodes: tuple[str, ...] = ()
                    ) -> tuple[onnx.ModelProto, Fp16Conversion]:
    """Return an fp16 copy of the fp32 graph ``proto`` and a summary.

    Parameters
    ----------
    proto : onnx.ModelProto
        fp32 graph (nodes in topological order, no subgraphs, no external data).
    keep_fp32 : tuple of str
        Op types to keep in fp32 even though they could run in fp16.
    keep_fp32_nodes : tuple of str
        Names of further nodes to keep in fp32.

    Graph inputs and outputs keep their names and stay float32. Raises ``ValueError``
    for graphs with subgraphs or with float weights that do not fit in float16.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for node in graph.node for a in node.attribute):
        raise ValueError("graphs with subgraphs (If, Loop, Scan) are not supported")
    converter = _Converter(model, frozenset(keep_fp32), frozenset(keep_fp32_nodes))
    converted = converter.convert_initializers()
    fp16_nodes, fp32_nodes, fp32_ops = converter.rewrite_nodes()
    converter.cast_outputs()
    del graph.node[:]
    graph.node.extend(converter.nodes)
    del graph.value_info[:]
    summary = Fp16Conversion(fp16_nodes=fp16_nodes, fp32_nodes=fp32_nodes,
                             casts_added=len(converter.casts), fp32_ops=fp32_ops,
                             initializers_converted=converted)
    check_io_float32(model)
    return model, summary


class _Converter:
    """The state of one fp32 -> fp16 conversion: each tensor's element type (from shape
    inference), its type at this point of the rewrite (``current``), the casts made
    (``(name, type) -> cast output``) and the rewritten node list."""

    def __init__(self, model: onnx.ModelProto, keep: frozenset, keep_nodes: frozenset):
        graph = model.graph
        inferred = onnx.shape_inference.infer_shapes(model)
        self.elem_type = {v.name: v.type.tensor_type.elem_type
                          for v in [*inferred.graph.value_info, *inferred.graph.input,
                                    *inferred.graph.output]}
        self.initializers = {init.name: init for init in graph.initializer}
        for name, init in self.initializers.items():
            self.elem_type[name] = init.data_type
        self.is_float = {name for name, t in self.elem_type.items() if t == FLOAT}
        self.graph = graph
        self.keep, self.keep_nodes = keep, keep_nodes
        self.geometry = _geometry_nodes(graph)
        self.graph_inputs = {value.name for value in graph.input}
        self.current = {name: FLOAT for name in self.is_float}
        self.nodes: list[onnx.NodeProto] = []
        self.casts: dict[tuple[str, int], str] = {}

    def runs_fp16(self, node) -> bool:
        return (node.op_type in FP16_OPS and node.op_type not in self.keep
                and node.name not in self.keep_nodes and node.output[0] not in self.geometry
                and not any(name in self.graph_inputs for name in node.input))

    def wanted_type(self, node, index: int) -> int:
        if self.runs_fp16(node) and index not in FP32_INPUTS.get(node.op_type, ()):
            return FLOAT16
        return FLOAT

    def convert_initializers(self) -> int:
        """Make an fp32 initializer fp16 when every use wants fp16 (otherwise it stays
        and fp16 uses get a Cast); the number converted."""
        uses: dict[str, set[int]] = {}
        for node in self.graph.node:
            for i, name in enumerate(node.input):
                if name in self.initializers and name in self.is_float:
                    uses.setdefault(name, set()).add(self.wanted_type(node, i))
        converted = 0
        for name, wanted in uses.items():
            if wanted == {FLOAT16}:
                init = self.initializers[name]
                values = numpy_helper.to_array(init)
                if np.abs(values).max(initial=0.0) > FP16_MAX:
                    raise ValueError(f"initializer {name!r} holds values beyond the float16 "
                                     f"range (max |w| = {np.abs(values).max():.3g})")
                init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), name))
                self.current[name] = FLOAT16
                converted += 1
        return converted

    def as_type(self, name: str, to: int) -> str:
        """``name``, or the output of a Cast of it to ``to`` (made once, appended to
        :attr:`nodes`)."""
        if self.current.get(name) == to:
            return name
        key = (name, to)
        if key not in self.casts:
            suffix = "fp16" if to == FLOAT16 else "fp32"
            out = _unique(f"{name}_{suffix}", self.elem_type)
            self.nodes.append(helper.make_node("Cast", [name], [out], to=to,
                                               name=f"cast_{out}"))
            self.elem_type[out] = to
            self.current[out] = to
            self.casts[key] = out
        return self.casts[key]

    def rewrite_nodes(self) -> tuple[int, int, dict]:
        """Each node in order, its float inputs cast to the type it wants and, when it
        runs in fp16, its own float attributes lowered; ``(fp16 nodes, fp32 nodes, op
        type -> count kept in fp32)``."""
        fp16_nodes = fp32_nodes = 0
        fp32_ops: dict[str, int] = {}
        for node in self.graph.node:
            low = self.runs_fp16(node)
            for i, name in enumerate(node.input):
                if name in self.is_float:
                    node.input[i] = self.as_type(name, self.wanted_type(node, i))
            if low:
                _lower_node_attributes(node)
            for name in node.output:
                if name in self.is_float:
                    self.current[name] = FLOAT16 if low else FLOAT
            self.nodes.append(node)
            if low:
                fp16_nodes += 1
            elif any(name in self.is_float for name in node.output):
                fp32_nodes += 1
                fp32_ops[node.op_type] = fp32_ops.get(node.op_type, 0) + 1
        return fp16_nodes, fp32_nodes, fp32_ops

    def cast_outputs(self) -> None:
        """Give every graph output left in fp16 a final Cast back to float32 under its
        own name (whatever node produces it: the Resize trap)."""
        for output in self.graph.output:
            if self.current.get(output.name) == FLOAT16:
                internal = _unique(f"{output.name}_fp16", self.elem_type)
                self.elem_type[internal] = FLOAT16
                for node in self.nodes:
                    node.input[:] = [internal if n == output.name else n for n in node.input]
                    node.output[:] = [internal if n == output.name else n
                                      for n in node.output]
                self.nodes.append(helper.make_node("Cast", [internal], [output.name],
                                                   to=FLOAT, name=f"cast_{output.name}"))
                self.casts[(internal, FLOAT)] = output.name


def _lower_node_attributes(node: onnx.NodeProto) -> None:
    """Make an fp16 node's own float types fp16: a ``Constant``'s value, a ``Cast``'s
    target."""
    for attr in node.attribute:
        if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
        elif node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = FLOAT16


def _unique(name: str, taken: dict) -> str:
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def check_io_float32(proto: onnx.ModelProto) -> None:
    """Raise ``ValueError`` unless every graph input and output is declared float32 and
    strict type inference agrees with the declarations (this catches an fp16 tensor
    reaching a graph output, e.g. from a final ``Resize``)."""
    for value in [*proto.graph.input, *proto.graph.output]:
        declared = value.type.tensor_type.elem_type
        if declared != FLOAT:
            raise ValueError(f"graph input/output {value.name!r} is "
                             f"{TensorProto.DataType.Name(declared)}, expected FLOAT")
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        raise ValueError(f"graph types are inconsistent: {exc}") from None


def emulate_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 graph that computes what the fp16 graph ``proto`` computes with fp16
    storage and fp32 arithmetic: float16 initializers and constants become float32
    (exactly), every node runs in float32, and each tensor that ``proto`` holds in
    float16 is rounded to float16 and back (``Cast`` to FLOAT16, ``Cast`` to FLOAT) right
    where it is made. Graph inputs and outputs keep their names and types."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    elem_type = {v.name: v.type.tensor_type.elem_type
                 for v in [*inferred.graph.value_info, *inferred.graph.input,
                           *inferred.graph.output]}
    for init in graph.initializer:
        elem_type[init.name] = init.data_type
        if init.data_type == FLOAT16:
            init.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(init).astype(np.float32), init.name))
    taken = dict(elem_type)
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT16:
                attr.i = FLOAT
        rounded = []
        for i, name in enumerate(node.output):
            if elem_type.get(name) == FLOAT16:
                raw = _unique(f"{name}_fp32", taken)
                taken[raw] = FLOAT
                node.output[i] = raw
                rounded.append((raw, name))
        nodes.append(node)
        for raw, name in rounded:
            half = _unique(f"{name}_fp16", taken)
            taken[half] = FLOAT16
            nodes.append(helper.make_node("Cast", [raw], [half], to=FLOAT16,
                                          name=f"round_{half}"))
            nodes.append(helper.make_node("Cast", [half], [name], to=FLOAT,
                                          name=f"widen_{half}"))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return model


def graph_precision(proto: onnx.ModelProto) -> str:
    """``"fp16"`` when the graph computes in float16 (float16 weights or casts to float16),
    else ``"fp32"``."""
    if any(init.data_type == FLOAT16 for init in proto.graph.initializer):
        return "fp16"
    for node in proto.graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == FLOAT16
                                          for a in node.attribute):
            return "fp16"
    return "fp32"


def export_fp16(src: str | os.PathLike, dst: str | os.PathLike, *,
                keep_fp32: tuple[str, ...] = DEFAULT_KEEP_FP32) -> Fp16Conversion:
    """Convert the fp32 ONNX file ``src`` to fp16 and write it to ``dst`` atomically."""
    proto = onnx.load(str(src))
    fp16, summary = convert_to_fp16(proto, keep_fp32=keep_fp32)
    props = {p.key: p.value for p in fp16.metadata_props}
    if props:
        props["precision"] = "fp16"
        onnx.helper.set_model_props(fp16, props)
    onnx.checker.check_model(fp16)
    save_onnx(fp16, Path(dst))
    return summary
