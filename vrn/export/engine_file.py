"""TensorRT engine files and their sidecar metadata.

An engine only runs on the GPU architecture and the TensorRT version it was built with.
Beside every ``<name>.engine`` we write ``<name>.engine.json``: the TensorRT version,
the GPU name and compute capability, the SHA-256 of the ONNX file it was built from,
the engine's own size and SHA-256, its inputs and outputs and its batch range.
:func:`check_engine` compares that with this machine before a byte reaches TensorRT, so
a mismatch gets a message that says how to rebuild, and a truncated or corrupt file gets
an :class:`~vrn.errors.EngineError` instead of a crash inside TensorRT. Every field of
the sidecar is checked (type and range) when it is read; a bad one is an
:class:`~vrn.errors.EngineError` that names the file and the field.

:func:`load_engine` is the one way to load an engine: check, then deserialize.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..atomic import write_bytes_atomic, write_text_atomic
from ..cuda_driver import libcuda
from ..errors import BackendUnavailableError, EngineError

FORMAT = "vrn-engine/1"
SIDECAR_SUFFIX = ".json"
MAX_SIDECAR_BYTES = 1 << 20  # a sidecar is a few KiB
MAX_ENGINE_BYTES = 1 << 40
MAX_BATCH = 1 << 16
MAX_DIM = (1 << 31) - 1
MAX_RANK = 8
REBUILD_HINT = "rebuild the engine with `vrn-export --from-onnx <model.onnx>`"


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA device: its name and compute capability (``"8.7"``)."""

    name: str
    compute_capability: str


@dataclass
class EngineMetadata:
    """The sidecar of an engine file (all JSON-serialisable)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_file: str  # name of the ONNX file, relative to the engine's folder
    onnx_sha256: str
    engine_sha256: str
    engine_bytes: int
    precision: str  # "fp16" or "fp32"
    inputs: list = field(default_factory=list)  # [{"name", "shape", "dtype"}]
    outputs: list = field(default_factory=list)
    batch: dict = field(default_factory=dict)  # {"min", "opt", "max"}
    layer_precisions: dict = field(default_factory=dict)  # {"fp16": n, "fp32": m, ...}
    model_info: dict = field(default_factory=dict)  # the ONNX file's metadata_props
    build_seconds: float | None = None
    built_at: str = ""
    format: str = FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike = "engine metadata"
                  ) -> EngineMetadata:
        """Parse and validate a sidecar's text; :class:`EngineError` (naming ``source``
        and the field at fault) if it is not valid JSON or not a valid sidecar."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, huge int literals
            raise _bad(source, f"not valid JSON ({_one_line(exc)})") from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data, source: str | os.PathLike = "engine metadata"
                  ) -> EngineMetadata:
        """Validate a parsed sidecar: every field's type and range."""
        if not isinstance(data, dict):
            raise _bad(source, f"not a {FORMAT} sidecar (a JSON object expected, got "
                               f"{_show(data)})")
        if data.get("format") != FORMAT:
            raise _bad(source, f"not a {FORMAT} sidecar (field 'format' is "
                               f"{_show(data.get('format'))})")
        known = {f.name: f for f in fields(cls)}
        for name in data:
            if name not in known:
                raise _bad(source, f"unknown field {_show(name)}")
        for name in known:  # write_engine writes every field
            if name not in data:
                raise _bad(source, f"field {name!r} is missing")
            problem = _VALIDATORS[name](data[name])
            if problem is not None:
                where, expected, got = problem
                raise _bad(source, f"field '{name}{where}' must be {expected}, got "
                                   f"{_show(got)}")
        return cls(**data)


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """``<engine>.json`` beside ``engine_path``."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + SIDECAR_SUFFIX)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def write_engine(engine_path: str | os.PathLike, engine: bytes,
                 metadata: EngineMetadata) -> Path:
    """Write the serialized engine and its sidecar, each atomically (engine first).

    ``metadata.engine_sha256`` and ``engine_bytes`` are filled in from ``engine``.
    """
    engine_path = Path(engine_path)
    metadata.engine_sha256 = hashlib.sha256(engine).hexdigest()
    metadata.engine_bytes = len(engine)
    write_bytes_atomic(engine_path, engine)
    write_text_atomic(sidecar_path(engine_path), metadata.to_json())
    return engine_path


def read_metadata(engine_path: str | os.PathLike) -> EngineMetadata:
    """The sidecar of ``engine_path``; :class:`EngineError` if it is missing or invalid."""
    engine_path = Path(engine_path)
    sidecar = sidecar_path(engine_path)
    if not sidecar.is_file():
        raise EngineError(f"{engine_path}: no metadata file {sidecar.name} beside it, so its "
                          "GPU and TensorRT version are unknown; rebuild it with "
                          "`vrn-export --from-onnx <model.onnx>`")
    try:
        size = sidecar.stat().st_size
        if size > MAX_SIDECAR_BYTES:
            raise _bad(sidecar, f"{size} bytes, over the {MAX_SIDECAR_BYTES}-byte limit "
                                "of a sidecar")
        raw = sidecar.read_bytes()
    except OSError as exc:
        raise _bad(sidecar, f"cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(sidecar, f"not UTF-8 text (byte {exc.start})") from None
    return EngineMetadata.from_json(text, source=sidecar)


# --- sidecar validation: each validator returns None, or (where, expected, got) -------

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CAPABILITY = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")


def _is_int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # a bool is not an int here


def _text(value, *, empty: bool = True, limit: int = 4096) -> bool:
    return isinstance(value, str) and (empty or value.strip() != "") \
        and len(value) <= limit and "\x00" not in value


def _field(ok: bool, expected: str):
    """A validator of a whole field from a predicate."""
    return lambda value: None if ok(value) else ("", expected, value)


def _tensors(value):
    if not isinstance(value, list):
        return "", "a list of {name, shape, dtype} objects", value
    for i, item in enumerate(value):
        where = f"[{i}]"
        if not isinstance(item, dict) or set(item) != {"name", "shape", "dtype"}:
            return where, "an object with exactly the keys name, shape and dtype", item
        if not _text(item["name"], empty=False, limit=256):
            return f"{where}.name", "a non-empty string", item["name"]
        shape = item["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_RANK \
                or not all(_is_int(d, -1, MAX_DIM) for d in shape):
            return (f"{where}.shape", f"a list of at most {MAX_RANK} integers in "
                    f"[-1, {MAX_DIM}]", shape)
        if not _text(item["dtype"], empty=False, limit=32):
            return f"{where}.dtype", "a NumPy dtype name", item["dtype"]
    return None


def _batch(value):
    if not isinstance(value, dict) or set(value) != {"min", "opt", "max"}:
        return "", f"an object {{min, opt, max}} of integers in [1, {MAX_BATCH}]", value
    for key in ("min", "opt", "max"):
        if not _is_int(value[key], 1, MAX_BATCH):
            return f".{key}", f"an integer in [1, {MAX_BATCH}]", value[key]
    if not value["min"] <= value["opt"] <= value["max"]:
        return "", "ordered: min <= opt <= max", value
    return None


def _mapping(valid_item, expected: str):
    """A validator of an object whose keys are names and whose values pass
    ``valid_item``."""
    def validate(value):
        if not isinstance(value, dict):
            return "", expected, value
        for key, item in value.items():
            if not _text(key, empty=False, limit=256) or not valid_item(item):
                return f"[{_show(key)}]", expected, item
        return None
    return validate


def _seconds(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value) and 0 <= value <= 1e9)


def _sha256(value) -> bool:
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


_VALIDATORS = {
    "format": _field(lambda v: v == FORMAT, json.dumps(FORMAT)),
    "tensorrt_version": _field(lambda v: _text(v, empty=False, limit=64),
                               "a TensorRT version string"),
    "gpu_name": _field(lambda v: _text(v, empty=False, limit=256), "a GPU name"),
    "compute_capability": _field(
        lambda v: isinstance(v, str) and _CAPABILITY.fullmatch(v) is not None,
        'a compute capability such as "8.7"'),
    "onnx_file": _field(lambda v: _text(v, empty=False) and not os.path.isabs(v),
                        "a file name relative to the engine's folder"),
    "onnx_sha256": _field(_sha256, "a SHA-256 (64 lowercase hex digits)"),
    "engine_sha256": _field(_sha256, "a SHA-256 (64 lowercase hex digits)"),
    "engine_bytes": _field(lambda v: _is_int(v, 1, MAX_ENGINE_BYTES),
                           f"an integer in [1, {MAX_ENGINE_BYTES}]"),
    "precision": _field(lambda v: isinstance(v, str) and v in ("fp16", "fp32"),
                        '"fp16" or "fp32"'),
    "inputs": _tensors,
    "outputs": _tensors,
    "batch": _batch,
    "layer_precisions": _mapping(lambda n: _is_int(n, 0, 1 << 31),
                                 "an object of layer counts (integers >= 0)"),
    "model_info": _mapping(lambda t: _text(t, limit=1 << 16), "an object of strings"),
    "build_seconds": _field(_seconds, "null or a number of seconds >= 0"),
    "built_at": _field(lambda v: _text(v, limit=64), "a date string"),
}


def _show(value, limit: int = 40) -> str:
    """``value`` as short one-line JSON, for a message."""
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bad(source, detail: str) -> EngineError:
    """The error for a bad sidecar: one line naming the file and what is wrong."""
    return EngineError(f"{source}: unreadable engine metadata: {detail}; {REBUILD_HINT}")


def _one_line(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def rebuild_command(engine_path: str | os.PathLike, metadata: EngineMetadata) -> str:
    """The command that rebuilds ``engine_path`` from its ONNX file on this machine."""
    engine_path = Path(engine_path)
    onnx_path = engine_path.parent / metadata.onnx_file
    return f"vrn-export --from-onnx {onnx_path} --max-batch {metadata.batch.get('max', 1)}"


def check_engine(engine_path: str | os.PathLike, *, onnx: str | os.PathLike | None = None,
                 tensorrt_version: str | None = None, gpu: GpuInfo | None = None,
                 device_id: int = 0) -> EngineMetadata:
    """Check that ``engine_path`` is intact and was built for this machine.

    Parameters
    ----------
    engine_path : path
        A ``.engine`` file with its ``.engine.json`` sidecar.
    onnx : path, optional
        The ONNX file the engine should come from; its SHA-256 must match.
    tensorrt_version : str, optional
        The TensorRT version to compare with (default: the installed one).
    gpu : GpuInfo, optional
        The GPU to compare with (default: CUDA device ``device_id`` of this machine).
    device_id : int
        The CUDA device the engine is for.

    Returns the metadata. Raises :class:`EngineError` for a missing, truncated or
    corrupt engine and for a mismatch (with the command that rebuilds it), and
    :class:`BackendUnavailableError` when TensorRT or a GPU is missing here.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise EngineError(f"{engine_path}: engine file not found; build one with "
                          "`vrn-export --from-onnx <model.onnx>`")
    meta = read_metadata(engine_path)
    rebuild = rebuild_command(engine_path, meta)
    size = engine_path.stat().st_size
    if size != meta.engine_bytes or sha256_file(engine_path) != meta.engine_sha256:
        raise EngineError(f"{engine_path}: engine file is truncated or corrupt ({size} bytes, "
                          f"its metadata says {meta.engine_bytes}, or the checksum differs); "
                          f"rebuild it with `{rebuild}`")
    if tensorrt_version is None:
        tensorrt_version = installed_tensorrt_version()
        if tensorrt_version is None:
            raise BackendUnavailableError(f"{engine_path}: TensorRT is not installed here "
                                          "(`import tensorrt` failed)")
    if tensorrt_version != meta.tensorrt_version:
        raise EngineError(f"{engine_path}: built with TensorRT {meta.tensorrt_version}, this "
                          f"machine has TensorRT {tensorrt_version}; engines are not portable "
                          f"between versions: rebuild it here with `{rebuild}`")
    if gpu is None:
        gpu = current_gpu(device_id)
        if gpu is None:
            raise BackendUnavailableError(f"{engine_path}: no CUDA GPU {device_id} found on "
                                          "this machine")
    if gpu.compute_capability != meta.compute_capability:
        raise EngineError(f"{engine_path}: built for {meta.gpu_name} (compute capability "
                          f"{meta.compute_capability}), this machine has {gpu.name} (compute "
                          f"capability {gpu.compute_capability}); rebuild it here with "
                          f"`{rebuild}`")
    if onnx is not None:
        onnx_sha = sha256_file(onnx)
        if onnx_sha != meta.onnx_sha256:
            raise EngineError(f"{engine_path}: built from a different ONNX file than {onnx} "
                              f"(SHA-256 {meta.onnx_sha256[:12]}... vs {onnx_sha[:12]}...); "
                              f"rebuild it with `vrn-export --from-onnx {onnx}`")
    return meta


def load_engine(engine_path: str | os.PathLike, *, onnx: str | os.PathLike | None = None,
                device_id: int = 0):
    """Check ``engine_path`` against CUDA device ``device_id`` (:func:`check_engine`) and
    deserialize it there (TensorRT puts an engine on the current device).

    Returns ``(engine, metadata)``: a ``tensorrt.ICudaEngine`` and its
    :class:`EngineMetadata`. Raises :class:`EngineError` when TensorRT rejects the file.
    """
    meta = check_engine(engine_path, onnx=onnx, device_id=device_id)
    data = Path(engine_path).read_bytes()
    with cuda_device(device_id):
        engine = tensorrt_runtime().deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"{engine_path}: TensorRT could not deserialize the engine (see its "
                          f"messages above); rebuild it with "
                          f"`{rebuild_command(engine_path, meta)}`")
    return engine, meta


@functools.lru_cache(maxsize=1)
def tensorrt_runtime():
    """One ``tensorrt.Runtime`` per process; it outlives every engine it deserializes."""
    from .tensorrt_lib import import_tensorrt, tensorrt_logger

    trt = import_tensorrt()
    return trt.Runtime(tensorrt_logger())


def installed_tensorrt_version() -> str | None:
    """``tensorrt.__version__``, or ``None`` when TensorRT does not import."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


@functools.cache
def _primary_context(device_id: int) -> int | None:
    """Device ``device_id``'s primary context (retained once, for the process's life:
    the one context TensorRT, torch and numba-cuda all use), or ``None``."""
    lib = libcuda()
    device, context = ctypes.c_int(), ctypes.c_void_p()
    if lib is None or lib.cuInit(0) != 0 \
            or lib.cuDeviceGet(ctypes.byref(device), int(device_id)) != 0 \
            or lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) != 0:
        return None
    return context.value


@contextlib.contextmanager
def cuda_device(device_id: int = 0):
    """Make CUDA device ``device_id`` current on this thread for the block, as
    ``cudaSetDevice`` would, through the driver (so this needs neither torch nor
    numba-cuda): its primary context is pushed, then popped. TensorRT builds,
    deserializes and runs engines on the current device. Nothing happens where the
    device is current already, or without a driver (the caller's next CUDA call then
    fails with its own message)."""
    lib = libcuda()
    context = _primary_context(int(device_id)) if lib is not None else None
    if context is None:
        if lib is not None and current_gpu(device_id) is None:
            raise BackendUnavailableError(f"no CUDA device {device_id} on this machine")
        yield
        return
    current = ctypes.c_void_p()
    if lib.cuCtxGetCurrent(ctypes.byref(current)) == 0 and current.value == context:
        yield
        return
    if lib.cuCtxPushCurrent_v2(ctypes.c_void_p(context)) != 0:
        raise BackendUnavailableError(f"cannot make CUDA device {device_id} current")
    try:
        yield
    finally:
        lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))


def current_gpu(device: int = 0) -> GpuInfo | None:
    """Name and compute capability of CUDA device ``device``, from the CUDA driver
    (``libcuda``, present wherever an NVIDIA driver is, Jetson included); ``None``
    without a driver or device."""
    lib = libcuda()
    if lib is None:
        return None
    handle, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    gpu_name = ctypes.create_string_buffer(256)
    if (lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(handle), device) != 0
            or lib.cuDeviceGetName(gpu_name, len(gpu_name), handle) != 0
            or lib.cuDeviceGetAttribute(ctypes.byref(major),
                                        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, handle) != 0
            or lib.cuDeviceGetAttribute(ctypes.byref(minor),
                                        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, handle) != 0):
        return None
    return GpuInfo(gpu_name.value.decode(errors="replace"), f"{major.value}.{minor.value}")
