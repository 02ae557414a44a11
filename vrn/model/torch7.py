"""Import the authors' Torch7 weights (``vrn-unguided.t7``) into :class:`~vrn.model.VRN`.

The ``.t7`` file is a Torch7 binary serialisation of an ``nn.Sequential``. It is parsed
with :mod:`torchfile`, which only decodes Torch7's own object format (numbers, strings,
tables, tensors, storages, and the fields of ``nn`` modules) and never executes or
unpickles anything. On top of torchfile this module adds bounds checks, so a truncated
or corrupt file raises :class:`~vrn.errors.WeightsError` instead of reading past the end
of a storage, and reads longs as 8 bytes on every platform (torchfile 0.1.0 uses the C
``long``, 4 bytes on Windows, and its 8-byte fallback calls Python 2's ``xrange``).

Mapping: the convolutions and batch norms of the ``.t7`` module tree, in depth-first
order, are the ``Conv2d`` and ``BatchNorm2d`` modules of the PyTorch model in
registration order (``docs/reference.md``, "Module order": the released file has
1,339 modules; their numbering, a depth-first index over every module below the
top-level container, containers included, is the one error messages use).
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchfile
from torch import nn

from ..errors import WeightsError
from .blocks import BN_MODES
from .checkpoint import ModelInfo
from .vrn import VRN, VRNConfig, set_bn_mode

CONV_TYPES = ("nn.SpatialConvolution", "nn.SpatialConvolutionMM", "cudnn.SpatialConvolution")
BN_TYPES = ("nn.SpatialBatchNormalization", "cudnn.SpatialBatchNormalization")

# Torch7 tensor and storage classes -> numpy dtypes. CUDA classes are saved in the same
# layout; torchfile has no float16 reader, so the Half classes are decoded here too.
_DTYPES = {"Byte": np.uint8, "Char": np.int8, "Short": np.int16, "Int": np.int32,
           "Long": np.int64, "Float": np.float32, "Double": np.float64, "Half": np.float16}
_STORAGE_DTYPES = {}
_TENSOR_DTYPES = {}
for _kind, _dtype in _DTYPES.items():
    _cuda_kind = "" if _kind == "Float" else _kind  # torch.CudaTensor holds floats
    for _name in (f"torch.{_kind}", f"torch.Cuda{_cuda_kind}"):
        _STORAGE_DTYPES[f"{_name}Storage".encode()] = np.dtype(_dtype)
        _TENSOR_DTYPES[f"{_name}Tensor".encode()] = np.dtype(_dtype)
_MAX_DIMS = 64


@dataclass(frozen=True)
class T7Module:
    """One module of a ``.t7`` model tree.

    ``index`` is its depth-first position among all modules below the top-level
    container (containers included), ``depth`` its nesting level (0 for the top-level
    container's children), ``typename`` its Torch7 class (``"nn.SpatialConvolution"``)
    and ``fields`` its attributes (``str`` keys; tensors as numpy arrays).
    """

    index: int
    depth: int
    typename: str
    fields: dict

    def shape(self) -> tuple[int, ...] | None:
        """Shape of the ``weight`` tensor, or ``None`` for modules without one."""
        weight = self.fields.get("weight")
        return tuple(weight.shape) if isinstance(weight, np.ndarray) else None

    def describe(self) -> str:
        shape = self.shape()
        return (f"module {self.index} ({self.typename}"
                + (f", weight {shape}" if shape is not None else "") + ")")


class _CheckedReader(torchfile.T7Reader):
    """torchfile's reader with explicit little-endian sizes and bounds checks.

    Torch7 files from 64-bit Linux (every released model) hold little-endian 4-byte
    ints, 8-byte longs and 8-byte doubles. Tensors and storages are decoded here,
    checked against the bytes left in the file and the storage they index into;
    everything else (tables, ``nn`` objects) goes through torchfile unchanged.
    """

    def __init__(self, fileobj, size: int):
        super().__init__(fileobj, use_list_heuristic=True, use_int_heuristic=True)
        self._size = size

    def _need(self, nbytes: int, what: str) -> None:
        left = self._size - self.f.tell()
        if nbytes < 0 or nbytes > left:
            raise torchfile.T7ReaderException(
                f"{what} needs {nbytes} bytes at offset {self.f.tell()}, "
                f"the file has {left} left")

    def _read(self, fmt):
        fmt = "<" + fmt.replace("l", "q")
        size = struct.calcsize(fmt)
        self._need(size, "a number")
        return struct.unpack(fmt, self.f.read(size))

    def read_long(self):
        return self._read("q")[0]

    def read_long_array(self, n):
        self._need(8 * n, f"an array of {n} longs")
        return list(struct.unpack(f"<{n}q", self.f.read(8 * n)))

    def read_string(self, disable_utf8=False):
        size = self.read_int()
        self._need(size, "a string")
        data = self.f.read(size)
        return data if disable_utf8 or not self.utf8_decode_strings else data.decode("utf8")

    def read_obj(self):
        start = self.f.tell()
        if self.read_int() == torchfile.TYPE_TORCH:
            index = self.read_int()
            if index in self.objects:
                return self.objects[index]
            version = self.read_string(disable_utf8=True)
            class_name = (self.read_string(disable_utf8=True) if version.startswith(b"V ")
                          else version)
            if class_name in _STORAGE_DTYPES:
                obj = self._read_storage(_STORAGE_DTYPES[class_name])
                self.objects[index] = obj
                return obj
            if class_name in _TENSOR_DTYPES:
                obj = self._read_tensor(_TENSOR_DTYPES[class_name])
                self.objects[index] = obj
                return obj
        self.f.seek(start)
        return super().read_obj()

    def _read_storage(self, dtype: np.dtype) -> np.ndarray:
        count = self.read_long()
        self._need(count * dtype.itemsize, f"a storage of {count} {dtype} values")
        return np.frombuffer(self.f.read(count * dtype.itemsize), dtype=dtype)

    def _read_tensor(self, dtype: np.dtype) -> np.ndarray:
        ndim = self.read_int()
        if not 0 <= ndim <= _MAX_DIMS:
            raise torchfile.T7ReaderException(f"tensor with {ndim} dimensions")
        size = self.read_long_array(ndim)
        stride = self.read_long_array(ndim)
        offset = self.read_long() - 1  # Torch7 stores 1-based offsets
        storage = self.read_obj()
        if storage is None or ndim == 0:
            return np.empty(0, dtype=dtype)
        if not isinstance(storage, np.ndarray) or storage.dtype != dtype:
            raise torchfile.T7ReaderException(f"a {dtype} tensor whose storage is "
                                              f"{type(storage).__name__}")
        if offset < 0 or min(size) < 0 or min(stride) < 0:
            raise torchfile.T7ReaderException(
                f"tensor with negative size, stride or offset ({size}, {stride}, {offset})")
        if min(size) == 0:
            return np.empty(size, dtype=dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise torchfile.T7ReaderException(
                f"tensor of size {tuple(size)} reaches element {last} of a storage of "
                f"{storage.size}")
        return np.lib.stride_tricks.as_strided(
            storage[offset:], shape=size, strides=[s * dtype.itemsize for s in stride],
            writeable=False)


def read_t7(path: str | os.PathLike) -> Any:
    """Parse a Torch7 binary file and return its top-level object (torchfile types).

    Raises :class:`WeightsError` naming the file if it is missing, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            reader = _CheckedReader(f, size)
            obj = reader.read_obj()
            trailing = size - f.tell()
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # torchfile raises struct, value, type, recursion... errors
        raise WeightsError(f"{path}: not a readable Torch7 file, truncated or corrupt "
                           f"({type(exc).__name__}: {exc})") from None
    if trailing:
        raise WeightsError(f"{path}: not a Torch7 model file ({trailing} bytes follow "
                           "the serialised object)")
    return obj


def t7_modules(root: Any, *, source: str | os.PathLike = "<t7>") -> list[T7Module]:
    """The modules below a ``.t7`` model's top-level container, depth-first.

    ``root`` is what :func:`read_t7` returns; ``source`` names it in error messages.
    """
    if not isinstance(root, torchfile.TorchObject):
        raise WeightsError(f"{source}: not a Torch7 nn model (the file holds a "
                           f"{type(root).__name__}, not an nn module)")
    found: list[T7Module] = []
    on_path: set[int] = set()

    def visit(module: torchfile.TorchObject, depth: int) -> None:
        if id(module) in on_path:
            raise WeightsError(f"{source}: the module tree contains itself "
                               f"(at module {len(found) - 1})")
        on_path.add(id(module))
        for child in _children(module, source):
            found.append(T7Module(len(found), depth, _typename(child), _fields(child, source)))
            visit(child, depth + 1)
        on_path.discard(id(module))

    visit(root, 0)
    return found


def list_modules(path: str | os.PathLike) -> list[str]:
    """A ``.t7`` model's modules as lines ``index<TAB>indent+type<TAB>weight shape``.

    Four spaces of indent per nesting level, an empty shape column for modules without
    a weight (the format of the released file's module list, ``docs/reference.md``),
    so two files can be compared line by line.
    """
    lines = []
    for module in t7_modules(read_t7(path), source=path):
        shape = module.shape()
        lines.append(f"{module.index}\t{'    ' * module.depth}{module.typename}\t"
                     f"{shape if shape is not None else ''}")
    return lines


def load_torch7(path: str | os.PathLike, bn_mode: str = "instance", *,
                config: VRNConfig | None = None) -> VRN:
    """Build a :class:`VRN` with the weights of a Torch7 ``.t7`` file.

    Parameters
    ----------
    path : path-like
        The ``.t7`` file (``vrn-unguided.t7``: 276 convolutions, 273 batch norms).
    bn_mode : {"instance", "running"}
        Batch-norm mode of the returned model. ``"instance"`` (per-image statistics) is
        how the released model was run; ``"running"`` uses the stored running statistics.
    config : VRNConfig, optional
        Architecture the file holds (default: the released ``vrn-unguided``).

    Returns
    -------
    VRN
        In evaluation mode, float32, with ``model.info`` (:class:`ModelInfo`) recording the
        file name and its SHA-256.

    Raises
    ------
    WeightsError
        The file is missing, truncated or corrupt, or does not fit the architecture (the
        message names the first ``.t7`` module that does not fit, by its depth-first
        index, and the PyTorch module it should map to).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"batch-norm mode must be one of {BN_MODES}, got {bn_mode!r}")
    path = Path(path)
    config = config or VRNConfig()
    modules = t7_modules(read_t7(path), source=path)
    model = VRN(config)
    copy_t7_weights(modules, model, source=path)
    set_bn_mode(model, bn_mode)
    model.info = ModelInfo(architecture=model.architecture, config=config, bn_mode=bn_mode,
                           trained=True,
                           provenance=f"Torch7 import of {path.name} (sha256 {_sha256(path)})")
    return model.eval()


def copy_t7_weights(modules: list[T7Module], model: nn.Module, *,
                    source: str | os.PathLike = "<t7>") -> None:
    """Copy the convolution and batch-norm tensors of ``modules`` into ``model``.

    The t7 layers (in depth-first order) are paired with ``model``'s ``Conv2d`` and
    ``BatchNorm2d`` modules in registration order. Every pair's shapes, kernel, stride
    and padding are checked (the first that does not fit raises), then the layer counts,
    all before anything is copied, so a file that does not fit leaves ``model``
    untouched. Tensors are converted to float32; batch norms take the file's
    ``eps``.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    layers, updates = [], []
    for module in modules:
        if module.typename in CONV_TYPES or module.typename in BN_TYPES:
            layers.append(module)
            if len(layers) > len(targets):
                continue  # counted below
            name, target = targets[len(layers) - 1]
            check = _conv_tensors if isinstance(target, nn.Conv2d) else _bn_tensors
            updates.append((target, check(module, name, target, source)))
        elif _has_tensor(module.fields, "weight") or _has_tensor(module.fields, "bias"):
            raise WeightsError(f"{source}: {module.describe()} has weights, but this "
                               "architecture has only convolutions and batch norms")
    if len(layers) > len(targets):
        extra = layers[len(targets)]
        raise WeightsError(f"{source}: {len(layers)} convolution and batch-norm layers, the "
                           f"architecture has {len(targets)}; the first extra one is "
                           f"{extra.describe()}")
    if len(layers) < len(targets):
        name, target = targets[len(layers)]
        after = f"after {layers[-1].describe()}" if layers else "at all"
        raise WeightsError(f"{source}: {len(layers)} convolution and batch-norm layers, the "
                           f"architecture has {len(targets)}; none {after} for {name} "
                           f"({_describe_target(target)})")
    with torch.no_grad():
        for target, tensors in updates:
            eps = tensors.pop("eps", None)
            for key, value in tensors.items():
                getattr(target, key).copy_(value)
            if eps is not None:
                target.eps = eps


def _conv_tensors(module: T7Module, name: str, target: nn.Conv2d, source) -> dict:
    def mismatch(problem: str) -> WeightsError:
        return WeightsError(f"{source}: {module.describe()} does not fit {name} "
                            f"({_describe_target(target)}): {problem}")

    if module.typename not in CONV_TYPES:
        raise mismatch("expected a convolution")
    f = module.fields
    if not _has_tensor(f, "weight"):
        raise mismatch("the convolution has no weight")
    weight = _float_array(module, "weight", source)
    if weight.ndim == 2 and all(isinstance(f.get(k), int) for k in ("nInputPlane", "kH", "kW")):
        # SpatialConvolutionMM from old nn versions stores (out, in * kH * kW).
        if weight.shape[1] == f["nInputPlane"] * f["kH"] * f["kW"]:
            weight = weight.reshape(weight.shape[0], f["nInputPlane"], f["kH"], f["kW"])
    if weight.shape != tuple(target.weight.shape):
        raise mismatch(f"weight shape {weight.shape}, expected {tuple(target.weight.shape)}")
    if not _has_tensor(f, "bias"):
        raise mismatch("the convolution has no bias (noBias); this architecture's have one")
    bias = _float_array(module, "bias", source)
    if bias.shape != tuple(target.bias.shape):
        raise mismatch(f"bias shape {bias.shape}, expected {tuple(target.bias.shape)}")
    pad = f.get("padding", 0)  # nn versions before padW/padH stored one "padding"
    geometry = {"stride": (f.get("dH", 1), f.get("dW", 1)),
                "padding": (f.get("padH", pad), f.get("padW", pad)),
                "kernel": (f.get("kH", weight.shape[2]), f.get("kW", weight.shape[3]))}
    expected = {"stride": tuple(target.stride), "padding": tuple(target.padding),
                "kernel": tuple(target.kernel_size)}
    for key, value in geometry.items():
        if value != expected[key]:
            raise mismatch(f"{key} {value}, expected {expected[key]}")
    if f.get("groups", 1) != 1:
        raise mismatch(f"groups {f['groups']}, expected 1")
    return {"weight": torch.from_numpy(weight), "bias": torch.from_numpy(bias)}


def _bn_tensors(module: T7Module, name: str, target: nn.BatchNorm2d, source) -> dict:
    def mismatch(problem: str) -> WeightsError:
        return WeightsError(f"{source}: {module.describe()} does not fit {name} "
                            f"({_describe_target(target)}): {problem}")

    if module.typename not in BN_TYPES:
        raise mismatch("expected a batch norm")
    f = module.fields
    if not (_has_tensor(f, "weight") and _has_tensor(f, "bias")):
        raise mismatch("the batch norm has no affine weight and bias (affine=false)")
    eps = f.get("eps", target.eps)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise mismatch(f"eps {eps!r} is not a positive number")
    tensors = {"weight": _float_array(module, "weight", source),
               "bias": _float_array(module, "bias", source)}
    if _has_tensor(f, "running_var"):
        tensors["running_var"] = _float_array(module, "running_var", source)
    elif _has_tensor(f, "running_std"):
        # nn.BatchNormalization version 1 stored 1 / sqrt(var + eps).
        inv_std = _float_array(module, "running_std", source).astype(np.float64)
        tensors["running_var"] = (inv_std ** -2 - eps).astype(np.float32)
    else:
        raise mismatch("the batch norm has no running_var")
    if not _has_tensor(f, "running_mean"):
        raise mismatch("the batch norm has no running_mean")
    tensors["running_mean"] = _float_array(module, "running_mean", source)
    expected = (target.num_features,)
    for key, value in tensors.items():
        if value.shape != expected:
            raise mismatch(f"{key} shape {value.shape}, expected {expected}")
    out = {key: torch.from_numpy(value) for key, value in tensors.items()}
    out["eps"] = float(eps)
    return out


def _float_array(module: T7Module, key: str, source) -> np.ndarray:
    value = module.fields.get(key)
    if not isinstance(value, np.ndarray):
        raise WeightsError(f"{source}: {module.describe()}: {key} is a "
                           f"{type(value).__name__}, expected a tensor")
    if value.dtype.kind != "f":
        raise WeightsError(f"{source}: {module.describe()}: {key} is a {value.dtype} tensor, "
                           "expected floating point")
    array = np.array(value, dtype=np.float32)  # a contiguous, writable float32 copy
    if not np.isfinite(array).all():
        raise WeightsError(f"{source}: {module.describe()}: {key} holds NaN or infinite "
                           "values")
    return array


def _children(module: torchfile.TorchObject, source) -> list:
    modules = _fields(module, source).get("modules")
    if modules is None:
        return []
    if isinstance(modules, dict):  # a Lua table torchfile did not turn into a list
        keys = sorted(modules, key=lambda k: (not isinstance(k, int), str(k)))
        if not all(isinstance(k, int) for k in keys):
            raise WeightsError(f"{source}: {_typename(module)} has a malformed modules table")
        modules = [modules[k] for k in keys]
    if not isinstance(modules, list):
        raise WeightsError(f"{source}: {_typename(module)}.modules is a "
                           f"{type(modules).__name__}, not a table of modules")
    for child in modules:
        if not isinstance(child, torchfile.TorchObject):
            raise WeightsError(f"{source}: {_typename(module)} holds a "
                               f"{type(child).__name__} where a module belongs")
    return modules


def _fields(module: torchfile.TorchObject, source) -> dict:
    raw = module._obj
    if not isinstance(raw, dict):
        raise WeightsError(f"{source}: {_typename(module)} has no field table")
    return {_text(k): v for k, v in raw.items()}


def _typename(obj: torchfile.TorchObject) -> str:
    return _text(obj.torch_typename())


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _has_tensor(fields: dict, key: str) -> bool:
    value = fields.get(key)
    return isinstance(value, np.ndarray) and value.size > 0


def _describe_target(module: nn.Module) -> str:
    return f"{type(module).__name__}, weight {tuple(module.weight.shape)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
