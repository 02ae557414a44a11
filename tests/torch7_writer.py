"""A small Torch7 binary serialiser, for tests: writes what ``torch.save`` writes.

The format is ``torch.File:writeObject`` in binary mode as produced on 64-bit Linux:
little-endian 4-byte ints, 8-byte longs and doubles. Each value starts with a type tag
(nil 0, number 1, string 2, table 3, torch object 4, boolean 5). Tables and torch
objects carry a per-file reference index (1, 2, ... in first-write order); an object
written again is only its tag and index, which is how shared storages are stored. A
torch object is its version string (``"V 1"``), its class name, then its contents: a
tensor writes ``nDimension``, sizes, strides, the 1-based storage offset and its storage
object; a storage writes its element count and raw data; an ``nn`` module writes its
fields as a table.

:func:`vrn_t7` builds the module tree of the released ``vrn-unguided.t7`` (for the
default :class:`~vrn.model.VRNConfig`: 1,339 modules, 276 convolutions, 273 batch norms)
with seeded random weights, and returns beside it each tensor under the name it has in
the PyTorch model's ``state_dict``. Those names come from each module's role in the
hourglass (stem, branch A, branch B, ...), not from any module ordering, so a test can
check an importer against them independently.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TYPE_NIL, TYPE_NUMBER, TYPE_STRING, TYPE_TABLE, TYPE_TORCH, TYPE_BOOLEAN = range(6)

_TYPE_PREFIX = {np.dtype(np.float32): "Float", np.dtype(np.float64): "Double",
                np.dtype(np.int64): "Long", np.dtype(np.uint8): "Byte",
                np.dtype(np.int32): "Int"}


@dataclass(eq=False)
class Storage:
    """A ``torch.*Storage``: a flat array (float32 -> ``FloatStorage``, ...)."""

    data: np.ndarray
    cuda: bool = False

    @property
    def typename(self) -> str:
        kind = _TYPE_PREFIX[self.data.dtype]
        if self.cuda:
            return "torch.CudaStorage" if kind == "Float" else f"torch.Cuda{kind}Storage"
        return f"torch.{kind}Storage"


@dataclass(eq=False)
class Tensor:
    """A ``torch.*Tensor``: a strided view into a :class:`Storage` (0-based ``offset``).

    ``storage=None`` is an empty tensor (``torch.Tensor()``: 0 dimensions, no storage).
    """

    storage: Storage | None
    size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    offset: int = 0
    dtype: np.dtype = np.dtype(np.float32)
    cuda: bool = False

    @property
    def typename(self) -> str:
        kind = _TYPE_PREFIX[np.dtype(self.dtype)]
        if self.cuda:
            return "torch.CudaTensor" if kind == "Float" else f"torch.Cuda{kind}Tensor"
        return f"torch.{kind}Tensor"


@dataclass(eq=False)
class TorchObject:
    """An instance of a Lua torch class (an ``nn`` module), written as its field table."""

    typename: str
    fields: dict = field(default_factory=dict)
    version: int = 1
    name: str = ""  # the PyTorch module it stands for (not serialised)


def tensor(array: np.ndarray, *, cuda: bool = False) -> Tensor:
    """A contiguous tensor with its own storage holding ``array``."""
    array = np.ascontiguousarray(array)
    stride = tuple(s // array.itemsize for s in array.strides)
    return Tensor(Storage(array.reshape(-1), cuda=cuda), array.shape, stride, 0,
                  array.dtype, cuda)


def empty_tensor(dtype=np.float32, *, cuda: bool = False) -> Tensor:
    return Tensor(None, dtype=np.dtype(dtype), cuda=cuda)


class T7Writer:
    """Serialise Python values as Torch7 objects: ``None`` nil, ``bool``, ``int`` and
    ``float`` numbers, ``str``/``bytes`` strings, ``list`` (keys 1..n) and ``dict``
    tables, :class:`TorchObject`, :class:`Tensor`, :class:`Storage`."""

    def __init__(self, f):
        self.f = f
        self._index: dict[int, int] = {}
        self._keep: list = []  # keeps written objects alive so their ids stay unique

    def write(self, value) -> None:
        if value is None:
            self._int(TYPE_NIL)
        elif isinstance(value, bool):
            self._int(TYPE_BOOLEAN)
            self._int(1 if value else 0)
        elif isinstance(value, (int, float)):
            self._int(TYPE_NUMBER)
            self.f.write(struct.pack("<d", float(value)))
        elif isinstance(value, (str, bytes)):
            self._int(TYPE_STRING)
            self._bytes(value.encode() if isinstance(value, str) else value)
        elif isinstance(value, (list, dict)):
            self._int(TYPE_TABLE)
            if self._reference(value):
                return
            items = list(enumerate(value, 1)) if isinstance(value, list) else value.items()
            items = list(items)
            self._int(len(items))
            for key, item in items:
                self.write(key)
                self.write(item)
        elif isinstance(value, (TorchObject, Tensor, Storage)):
            self._int(TYPE_TORCH)
            if self._reference(value):
                return
            version = value.version if isinstance(value, TorchObject) else 1
            self._bytes(f"V {version}".encode())
            self._bytes(value.typename.encode())
            if isinstance(value, TorchObject):
                self.write(value.fields)
            elif isinstance(value, Tensor):
                self._tensor(value)
            else:
                self._long(value.data.size)
                self.f.write(value.data.astype(value.data.dtype.newbyteorder("<")).tobytes())
        else:
            raise TypeError(f"cannot serialise a {type(value).__name__}")

    def _reference(self, value) -> bool:
        """Write the object's index; True if it was written before (index only)."""
        if id(value) in self._index:
            self._int(self._index[id(value)])
            return True
        index = len(self._index) + 1
        self._index[id(value)] = index
        self._keep.append(value)
        self._int(index)
        return False

    def _tensor(self, t: Tensor) -> None:
        ndim = 0 if t.storage is None else len(t.size)
        self._int(ndim)
        for n in (t.size if ndim else ()):
            self._long(n)
        for s in (t.stride if ndim else ()):
            self._long(s)
        self._long(t.offset + 1)
        self.write(t.storage)

    def _int(self, value: int) -> None:
        self.f.write(struct.pack("<i", value))

    def _long(self, value: int) -> None:
        self.f.write(struct.pack("<q", value))

    def _bytes(self, data: bytes) -> None:
        self._int(len(data))
        self.f.write(data)


def save_t7(path: str | Path, value) -> Path:
    """Write ``value`` to ``path`` as ``torch.save(path, value)`` would."""
    path = Path(path)
    with open(path, "wb") as f:
        T7Writer(f).write(value)
    return path


# -- nn modules, with the fields Torch7 stores ---------------------------------------

def module(typename: str, version: int = 1, **fields) -> TorchObject:
    base = {"output": empty_tensor(), "gradInput": empty_tensor(), "train": True,
            "_type": "torch.FloatTensor"}
    base.update(fields)
    return TorchObject(typename, base, version)


def sequential(*children) -> TorchObject:
    return module("nn.Sequential", modules=list(children))


def concat_table(*children) -> TorchObject:
    return module("nn.ConcatTable", modules=list(children), output={}, gradInput={})


def cadd_table() -> TorchObject:
    return module("nn.CAddTable", inplace=False, gradInput={})


def identity() -> TorchObject:
    return module("nn.Identity")


def relu() -> TorchObject:
    return module("nn.ReLU", threshold=0, val=0, inplace=True)


def sigmoid() -> TorchObject:
    return module("nn.Sigmoid")


def max_pool(size: int = 2) -> TorchObject:
    return module("nn.SpatialMaxPooling", kW=size, kH=size, dW=size, dH=size, padW=0,
                  padH=0, ceil_mode=False, indices=empty_tensor(np.int64))


def upsample_nearest(scale: int = 2) -> TorchObject:
    return module("nn.SpatialUpSamplingNearest", scale_factor=scale,
                  inputSize=Storage(np.zeros(4, np.int64)),
                  outputSize=Storage(np.zeros(4, np.int64)))


def upsample_bilinear(scale: int) -> TorchObject:
    return module("nn.SpatialUpSamplingBilinear", scale_factor=scale,
                  inputSize=Storage(np.zeros(4, np.int64)),
                  outputSize=Storage(np.zeros(4, np.int64)))


def convolution(weight: Tensor, bias: Tensor | None, *, stride: int = 1, pad: int = 0,
                typename: str = "nn.SpatialConvolution") -> TorchObject:
    out_planes, in_planes, kh, kw = weight.size
    fields = dict(nInputPlane=in_planes, nOutputPlane=out_planes, kW=kw, kH=kh, dW=stride,
                  dH=stride, padW=pad, padH=pad, weight=weight, gradWeight=empty_tensor(),
                  gradBias=empty_tensor(), finput=empty_tensor(), fgradInput=empty_tensor())
    if bias is not None:
        fields["bias"] = bias
    return module(typename, **fields)


def batch_norm(weight: Tensor, bias: Tensor, running_mean: Tensor, running_var: Tensor, *,
               eps: float = 1e-5, typename: str = "nn.SpatialBatchNormalization"
               ) -> TorchObject:
    return module(typename, version=2, weight=weight, bias=bias, running_mean=running_mean,
                  running_var=running_var, gradWeight=empty_tensor(), gradBias=empty_tensor(),
                  eps=eps, momentum=0.1, affine=True)


# -- the VRN module tree --------------------------------------------------------------

class _Weights:
    """Seeded random tensors, each recorded under its PyTorch ``state_dict`` name.

    ``flat=True`` puts every conv and BN weight and bias in one shared storage, as Torch7's
    ``getParameters()`` leaves them (each tensor a view at its own offset); running
    statistics keep their own storages either way.
    """

    def __init__(self, seed: int, dtype, flat: bool, cuda: bool):
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.flat = flat
        self.cuda = cuda
        self.named: dict[str, np.ndarray] = {}
        self._views: list[tuple[Tensor, np.ndarray]] = []

    def _tensor(self, name: str, array: np.ndarray, parameter: bool) -> Tensor:
        array = array.astype(self.dtype)
        self.named[name] = array
        if not (self.flat and parameter):
            return tensor(array, cuda=self.cuda)
        stride = tuple(int(np.prod(array.shape[i + 1:])) for i in range(array.ndim))
        view = Tensor(None, array.shape, stride, 0, self.dtype, self.cuda)
        self._views.append((view, array))
        return view

    def conv(self, name: str, cin: int, cout: int, k: int, *, stride: int = 1,
             pad: int = 0) -> TorchObject:
        bound = 1.0 / np.sqrt(cin * k * k)  # nn.SpatialConvolution's reset()
        weight = self._tensor(f"{name}.weight",
                              self.rng.uniform(-bound, bound, (cout, cin, k, k)), True)
        bias = self._tensor(f"{name}.bias", self.rng.uniform(-bound, bound, cout), True)
        conv = convolution(weight, bias, stride=stride, pad=pad)
        conv.name = name
        return conv

    def bn(self, name: str, channels: int) -> TorchObject:
        weight = self._tensor(f"{name}.weight", self.rng.uniform(0.5, 1.5, channels), True)
        bias = self._tensor(f"{name}.bias", self.rng.normal(0, 0.1, channels), True)
        mean = self._tensor(f"{name}.running_mean", self.rng.normal(0, 0.5, channels), False)
        var = self._tensor(f"{name}.running_var", self.rng.uniform(0.5, 2.0, channels), False)
        bn = batch_norm(weight, bias, mean, var)
        bn.name = name
        return bn

    def finish(self) -> None:
        """Point the flat views into one storage (the order of creation)."""
        if not self._views:
            return
        total = sum(a.size for _, a in self._views)
        storage = Storage(np.empty(total, self.dtype), cuda=self.cuda)
        offset = 0
        for view, array in self._views:
            storage.data[offset:offset + array.size] = array.reshape(-1)
            view.storage, view.offset = storage, offset
            offset += array.size


def _residual(w: _Weights, name: str, cin: int, cout: int) -> TorchObject:
    mid = cout // 2
    body = sequential(
        w.bn(f"{name}.bn1", cin), relu(), w.conv(f"{name}.conv1", cin, mid, 1),
        w.bn(f"{name}.bn2", mid), relu(), w.conv(f"{name}.conv2", mid, mid, 3, pad=1),
        w.bn(f"{name}.bn3", mid), relu(), w.conv(f"{name}.conv3", mid, cout, 1))
    skip = sequential(w.conv(f"{name}.skip", cin, cout, 1)) if cin != cout else identity()
    return sequential(concat_table(body, skip), cadd_table())


def _level_parts(w: _Weights, name: str, n: int, config) -> list[TorchObject]:
    """Level ``n`` as ``[ConcatTable(A, B), CAddTable, R]`` (A holds Level ``n - 1``)."""
    f = config.features
    branch_a = [_residual(w, f"{name}.branch_a.{i}", f, f) for i in range(config.residuals_a)]
    if n > 1:
        branch_a.append(sequential(*_level_parts(w, f"{name}.inner", n - 1, config)))
    count_b = config.residuals_b_innermost if n == 1 else config.residuals_b
    branch_b = [max_pool(2)]
    branch_b += [_residual(w, f"{name}.branch_b.{i}", f, f) for i in range(count_b)]
    branch_b.append(upsample_nearest(2))
    return [concat_table(sequential(*branch_a), sequential(*branch_b)), cadd_table(),
            _residual(w, f"{name}.out", f, f)]


def _conv_bn_relu(w: _Weights, name: str, cin: int, cout: int) -> TorchObject:
    return sequential(w.conv(f"{name}.0", cin, cout, 1), w.bn(f"{name}.1", cout), relu())


def vrn_t7(config=None, *, seed: int = 0, dtype=np.float32, flat: bool = False,
           cuda: bool = False, conv_type: str = "nn.SpatialConvolution"
           ) -> tuple[TorchObject, dict[str, np.ndarray]]:
    """The ``vrn-unguided.t7`` module tree for ``config`` with seeded random weights.

    Returns ``(root, tensors)``: ``root`` an ``nn.Sequential`` for :func:`save_t7`, and
    ``tensors`` every weight, bias and running statistic under its PyTorch ``state_dict``
    name (the file's dtype). ``dtype`` float32 or float64 picks ``FloatTensor`` or
    ``DoubleTensor``; ``cuda`` the ``torch.Cuda*`` classes; ``flat`` one shared parameter
    storage; ``conv_type`` the convolution class name.
    """
    from vrn.model import VRNConfig

    config = config or VRNConfig()
    w = _Weights(seed, dtype, flat, cuda)
    f = config.features
    modules = [w.conv("stem.0", config.in_channels, f // 4, 7, stride=2, pad=3),
               w.bn("stem.1", f // 4), relu(),
               _residual(w, "stem.3", f // 4, f // 2), max_pool(2),
               _residual(w, "stem.5", f // 2, f // 2), _residual(w, "stem.6", f // 2, f)]
    for s in range(config.num_stacks):
        body = sequential(*_level_parts(w, f"stacks.{s}.0", config.hourglass_depth, config),
                          _conv_bn_relu(w, f"stacks.{s}.1", f, f),
                          _conv_bn_relu(w, f"stacks.{s}.2", f, f))
        modules += [concat_table(identity(), body), cadd_table()]
    head = sequential(_conv_bn_relu(w, "head.0", f, f), w.conv("head.1", f, config.out_depth, 1),
                      upsample_bilinear(4), sigmoid())
    modules.append(concat_table(head))
    if conv_type != "nn.SpatialConvolution":
        for m in iter_modules(sequential(*modules)):
            if m.typename == "nn.SpatialConvolution":
                m.typename = conv_type
    w.finish()
    return sequential(*modules), w.named


def iter_modules(root: TorchObject) -> list[TorchObject]:
    """The modules below ``root``, depth-first (the reference list's numbering)."""
    found = []
    for child in root.fields.get("modules", []):
        found.append(child)
        found.extend(iter_modules(child))
    return found
