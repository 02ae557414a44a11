"""ONNX Runtime backend: the exported graph on the TensorRT, CUDA or CPU execution
provider.

onnxruntime falls back to the CPU without an error when a GPU provider cannot load
(onnxruntime-gpu missing, CUDA or TensorRT libraries not found), so after creating the
session we read ``session.get_providers()`` and raise
:class:`~vrn.errors.BackendUnavailableError` when the provider asked for is not the one
that loaded. :meth:`OnnxRuntimeBackend.describe` names the provider actually in use.

On the GPU, inputs and outputs are bound to CUDA memory (IO binding) so the volume stays
on the device. The buffers come from the one provider the TensorRT backend uses too
(:func:`~.cuda_arrays.device_buffers`: torch CUDA tensors, else numba-cuda device
arrays), whose stream ONNX Runtime computes on; the binding, the input buffer and the
output buffer of host results are made once per batch size and reused. On the CPU the
session takes the process's thread budget (:mod:`vrn.runtime.threads`: an intra-op
thread per physical core, none spinning when idle) and every graph optimisation.

A backend is made from an ``.onnx`` file, or from weights with :meth:`from_weights`,
which exports the model once into a cache folder (keyed by a hash of the weights) with
:func:`vrn.export.onnx_export.export_onnx`. Cached files are checked against their
SHA-256 before use, and a corrupt one is exported again (:mod:`.onnx_cache`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ...errors import BackendUnavailableError, UnreadableOnnxError, VRNError
from ..cpu import physical_cores
from .base import checked_landmarks, info_from_metadata
from .cuda_arrays import device_buffers
from .onnx_cache import cached_file, open_cached

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}
CACHE_ENV = "VRN_CACHE_DIR"
# The nodes of ONNX Runtime's int8 quantisations (static QDQ, dynamic, QOperator).
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                           "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})
EXPORT_VERSION = 3  # part of the cache key: bump when the exported graph's interface changes


def _graph_source_digest() -> str:
    """SHA-256 of the sources that define the exported graph (:mod:`vrn.model` and the
    exporter), so that a changed computation never reuses a cached graph."""
    from ... import export, model

    digest = hashlib.sha256()
    for package in (model, export):
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$VRN_CACHE_DIR``, else ``$XDG_CACHE_HOME/vrn-edge``, else ``~/.cache/vrn-edge``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vrn-edge"


class OnnxRuntimeBackend:
    """An ``onnxruntime.InferenceSession`` over a VRN graph (input ``(N, 3, S, S)``, and
    ``(N, 68, 3)`` landmarks for a landmark-guided model; one output ``(N, D, S, S)``; as
    :mod:`vrn.export.onnx_export` writes them).

    Parameters
    ----------
    onnx_path : path
        The graph (fp32, or fp16 inside with fp32 inputs and outputs).
    provider : {"cpu", "cuda", "tensorrt"}
        Execution provider to run on; CPU is registered after it for ops the GPU
        provider lacks. The session fails with :class:`BackendUnavailableError` when
        onnxruntime loads another provider instead.
    device_id : int
        CUDA device for the GPU providers.
    threads : int, optional
        CPU intra-op threads; default: physical cores.
    model_info : ModelInfo, optional
        What the graph's weights are; read from the file's metadata when absent.
    cache_dir : path, optional
        Where the TensorRT provider caches its engines (default: under
        :func:`default_cache_dir`).
    fp16 : bool
        Let the TensorRT provider build fp16 kernels (``trt_fp16_enable``).
    """

    name = "onnxruntime"

    def __init__(self, onnx_path: str | os.PathLike, *, provider: str = "cpu",
                 device_id: int = 0, threads: int | None = None, model_info=None,
                 cache_dir: str | os.PathLike | None = None, fp16: bool = False):
        ort = _import_onnxruntime()
        path = Path(onnx_path)
        if not path.is_file():
            raise VRNError(f"{path}: ONNX file not found")
        self.path = path
        self.provider = provider
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.device_id = device_id
        self._ort = ort
        wanted = check_provider(provider)
        options = session_options(ort, provider, threads)
        self.threads = options.intra_op_num_threads if provider == "cpu" else (
            threads or physical_cores())
        self.spinning = provider == "cpu" and options.get_session_config_entry(
            "session.intra_op.allow_spinning") == "1"
        self._buffers = None  # GPU providers: device_buffers(device_id)
        self._bound: dict[int, _Bound] = {}  # per batch size
        graph = _GraphFacts(path)
        providers = self._provider_list(provider, device_id, cache_dir, fp16, graph)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            message = f"{path}: onnxruntime cannot load this graph ({exc})"
            if provider == "cpu":  # on a GPU provider, the provider itself may be at fault
                raise UnreadableOnnxError(message) from None
            raise VRNError(message) from None
        self.providers = self.session.get_providers()
        if self.providers[0] != wanted:
            raise BackendUnavailableError(
                f"onnxruntime backend: asked for {wanted} but the session loaded "
                f"{self.providers} (onnxruntime falls back silently; check the CUDA/"
                "TensorRT libraries)")
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) not in (1, 2) or len(outputs) != 1:
            raise VRNError(f"{path}: expected a graph with one input (two for a landmark-"
                           f"guided model) and one output, got {len(inputs)} and "
                           f"{len(outputs)}")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.guided = len(inputs) == 2
        self.landmarks_name = inputs[1].name if self.guided else None
        if self.guided and (len(inputs[1].shape) != 3 or tuple(inputs[1].shape[1:]) != (68, 3)):
            raise VRNError(f"{path}: graph input {self.landmarks_name!r} has shape "
                           f"{inputs[1].shape}, expected (N, 68, 3)")
        in_shape, out_shape = inputs[0].shape, outputs[0].shape
        if len(in_shape) != 4 or in_shape[1] != 3 or not isinstance(in_shape[2], int):
            raise VRNError(f"{path}: graph input {self.input_name!r} has shape {in_shape}, "
                           "expected (N, 3, S, S)")
        if len(out_shape) != 4 or not isinstance(out_shape[1], int):
            raise VRNError(f"{path}: graph output {self.output_name!r} has shape "
                           f"{out_shape}, expected (N, D, S, S)")
        self.input_size = int(in_shape[2])
        self.out_depth = int(out_shape[1])
        self.static_batch = in_shape[0] if isinstance(in_shape[0], int) else None
        self.precision = "fp16" if fp16 or graph.fp16 else "int8" if graph.int8 else "fp32"
        self.model_info = model_info if model_info is not None else graph.model_info()

    def _provider_list(self, provider, device_id, cache_dir, fp16, graph) -> list:
        if provider == "cpu":
            return ["CPUExecutionProvider"]
        # ORT treats stream 0 as "none": it computes on the buffer provider's stream, so
        # the bound buffers are ordered with it.
        self._buffers = device_buffers(device_id)
        stream = {"has_user_compute_stream": "1",
                  "user_compute_stream": str(self._buffers.stream_handle)}
        cuda = {"device_id": str(device_id), "cudnn_conv_algo_search": "EXHAUSTIVE", **stream}
        providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        if provider == "tensorrt":
            cache = (Path(cache_dir) if cache_dir else default_cache_dir()) / "ort-tensorrt"
            cache.mkdir(parents=True, exist_ok=True)
            trt = {"device_id": str(device_id), "trt_fp16_enable": "1" if fp16 else "0",
                   "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(cache),
                   "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(cache)}
            if graph.dynamic_batch:  # batch 1 to the largest the graph was exported for
                shape = f"x3x{graph.input_size}x{graph.input_size}"
                profiles = {}
                for batch, key in ((1, "min"), (1, "opt"), (graph.max_batch, "max")):
                    dims = [f"{graph.input_name}:{batch}{shape}"]
                    if graph.landmarks_name:
                        dims.append(f"{graph.landmarks_name}:{batch}x68x3")
                    profiles[f"trt_profile_{key}_shapes"] = ",".join(dims)
                trt.update(profiles)
            trt.update(stream)
            providers.insert(0, ("TensorrtExecutionProvider", trt))
        return providers

    def infer(self, batch, landmarks=None, *, on_device: bool | None = None):
        """Occupancy volumes of a batch of crops.

        Parameters
        ----------
        batch : (N, 3, S, S) float32 ndarray, or a CUDA array on a GPU provider
            RGB in [0, 1].
        landmarks : (N, 68, 3) float32 array, optional
            Crop pixels ``(x, y, z)``; required by a landmark-guided graph, else ignored.
        on_device : bool, optional
            GPU providers: return a CUDA array (a torch tensor when torch has CUDA, else
            a numba device array) or a NumPy array. Default: the same kind as ``batch``.
            Ignored on the CPU.

        Returns
        -------
        (N, D, S, S) float32 ndarray or torch CUDA tensor, ``(D, H, W)`` per image.
        """
        as_numpy = isinstance(batch, np.ndarray)
        shape = tuple(batch.shape)
        if len(shape) != 4 or shape[1:] != (3, self.input_size, self.input_size):
            raise ValueError(f"batch must be (N, 3, {self.input_size}, {self.input_size}), "
                             f"got {shape}")
        landmarks = checked_landmarks(landmarks, shape[0]) if self.guided else None
        if self.device == "cpu":
            if not as_numpy:
                batch = batch.detach().cpu().numpy()
            feeds = {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}
            if self.guided:
                feeds[self.landmarks_name] = landmarks
            return self.session.run([self.output_name], feeds)[0]
        if on_device is None:
            on_device = not as_numpy
        return self._infer_bound(batch, landmarks, on_device)

    def _infer_bound(self, batch, landmarks, on_device: bool):
        """GPU providers: IO binding on CUDA memory from the buffer provider. A host
        batch is copied into the batch size's input buffer, a CUDA batch is bound where
        it is; a host result comes from the batch size's output buffer, a device result
        is a new array (the caller keeps it past the next call)."""
        buffers = self._buffers
        n = int(batch.shape[0])
        bound = self._bound.get(n)
        if bound is None:
            bound = self._bound[n] = self._new_binding(n)
        if landmarks is not None:
            # Host memory: ORT copies these 544 bytes per image itself.
            bound.binding.bind_cpu_input(self.landmarks_name, landmarks)
        x = buffers.upload(batch, out=bound.input)
        y = buffers.empty(bound.output.shape) if on_device else bound.output
        bound.bind(self.input_name, x, buffers.pointer(x), self.device_id, output=False)
        bound.bind(self.output_name, y, buffers.pointer(y), self.device_id, output=True)
        self.session.run_with_iobinding(bound.binding)  # returns once the stream is done
        return buffers.hand_over(y) if on_device else buffers.to_host(y)

    def _new_binding(self, n: int) -> _Bound:
        s = self.input_size
        return _Bound(self.session.io_binding(), self._buffers.empty((n, 3, s, s)),
                      self._buffers.empty((n, self.out_depth, s, s)))

    def synchronize(self) -> None:
        """Run blocks until its outputs are ready; nothing is left to wait for."""

    def describe(self) -> str:
        extra = (f", {self.threads} threads{'' if self.spinning else ', no spinning'}"
                 if self.device == "cpu" else ", IO binding")
        return (f"onnxruntime {self._ort.__version__} ({self.providers[0]}, "
                f"{self.precision}{extra}; {self.path.name})")

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | None = None, *,
                     precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                     **kwargs) -> OnnxRuntimeBackend:
        """Export ``weights`` (see :func:`vrn.model.load_model`) to ONNX once, into
        ``cache_dir/onnx/``, and open that; later calls with the same weights reuse the
        file. ``precision="fp16"`` uses the fp16 graph (:mod:`vrn.export.fp16`; GPU
        providers only)."""
        from ...model import load_model

        if precision not in ("fp32", "fp16"):
            raise ValueError(f"onnxruntime precision must be fp32 or fp16, got {precision!r}")
        if precision == "fp16" and kwargs.get("provider", "cpu") == "cpu":
            raise BackendUnavailableError("onnxruntime backend: fp16 runs on the GPU "
                                          "providers; use fp32 on the CPU")
        check_provider(kwargs.get("provider", "cpu"))  # before a minute of exporting
        model = load_model(weights)
        return open_cached(lambda: cached_onnx(model, cache_dir, fp16=precision == "fp16"),
                           lambda path: cls(path, model_info=model.info, cache_dir=cache_dir,
                                            **kwargs))


def session_options(ort, provider: str, threads: int | None = None):
    """The session's options: every graph optimisation, errors-only logging (provider
    fallbacks are checked after loading) and, on the CPU provider, the process's thread
    budget (:func:`vrn.runtime.threads.ort_session_options`: ``threads`` intra-op
    threads, default the budget's; one inter-op thread; idle threads that do not spin)."""
    from ..threads import ort_session_options

    if provider == "cpu":
        options = ort_session_options(ort, threads=threads)
    else:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("onnxruntime backend: ONNX Runtime is not installed "
                                      "(pip install 'vrn-edge[cpu]', or 'vrn-edge[gpu]' "
                                      "for the GPU providers)") from None
    return onnxruntime


def check_provider(provider: str) -> str:
    """The execution provider's full name, once it is known to be in this onnxruntime
    build; :class:`BackendUnavailableError` otherwise. (Being listed does not mean it
    will load: the session checks that.)"""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
    ort = _import_onnxruntime()
    available = ort.get_available_providers()
    wanted = PROVIDERS[provider]
    if wanted not in available:
        raise BackendUnavailableError(
            f"onnxruntime backend: {wanted} is not in this onnxruntime build "
            f"({ort.__version__}: {', '.join(available)})"
            + ("; install onnxruntime-gpu" if provider != "cpu" else ""))
    return wanted


def cached_onnx(model, cache_dir: str | os.PathLike | None = None, *,
                max_batch: int | None = None, fp16: bool = False) -> Path:
    """The ONNX export of ``model`` in the cache, exported now if missing or corrupt
    (atomically, so concurrent or interrupted exports never leave a partial file; see
    :func:`.onnx_cache.cached_file`). The file name is a hash of the weights, the model
    description, the export settings and the graph's source (:func:`_graph_source_digest`);
    ``fp16`` gives the fp16 conversion of that
    file. ``max_batch`` defaults to the export's (4)."""
    from ...export.onnx_export import DEFAULT_MAX_BATCH, DEFAULT_OPSET, export_onnx
    from ...model import model_info

    max_batch = max_batch or DEFAULT_MAX_BATCH
    info = model_info(model)
    key = hashlib.sha256()
    meta = info.to_metadata()
    key.update(json.dumps({"meta": meta, "max_batch": max_batch, "opset": DEFAULT_OPSET,
                           "export": EXPORT_VERSION, "source": _graph_source_digest()},
                          sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        key.update(name.encode())
        key.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / "onnx"
    path = cached_file(folder / f"vrn-{key.hexdigest()[:20]}.onnx",
                       lambda tmp: export_onnx(model, tmp, max_batch=max_batch, metadata=meta))
    if not fp16:
        return path
    from ...export.fp16 import export_fp16

    return cached_file(path.with_name(f"{path.stem}-fp16.onnx"),
                       lambda tmp: export_fp16(path, tmp))


class _Bound:
    """One batch size's IO binding and its reused buffers: ``input`` ``(N, 3, S, S)`` and
    ``output`` ``(N, D, S, S)`` float32 device arrays."""

    def __init__(self, binding, input_buffer, output_buffer):
        self.binding = binding
        self.input = input_buffer
        self.output = output_buffer
        self._addresses: dict[str, int] = {}  # what each name is bound to now

    def bind(self, name: str, array, address: int, device_id: int, *, output: bool) -> None:
        """Bind ``name`` to the float32 device array ``array`` at ``address`` (a no-op
        when it is bound there already)."""
        if self._addresses.get(name) == address:
            return
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, "cuda", device_id, np.float32, tuple(int(d) for d in array.shape), address)
        self._addresses[name] = address


class _GraphFacts:
    """What the session set-up needs from the file, read once without the weights'
    external data: input name and size, whether the batch is dynamic and its largest
    value (the ``max_batch`` the exporter stores in the metadata), whether the graph
    computes in fp16 or is quantised to int8, and its metadata."""

    def __init__(self, path: Path):
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf decode errors have no common base class
            raise UnreadableOnnxError(f"{path}: not a readable ONNX file ({exc})",
                                      reason="onnx cannot parse it") from None
        if len(proto.graph.input) < 1:
            raise VRNError(f"{path}: the graph has no input")
        value = proto.graph.input[0]
        dims = value.type.tensor_type.shape.dim
        self.input_name = value.name
        self.landmarks_name = proto.graph.input[1].name if len(proto.graph.input) > 1 else None
        self.input_size = dims[2].dim_value if len(dims) == 4 else 0
        self.dynamic_batch = len(dims) == 4 and bool(dims[0].dim_param)
        self.fp16 = any(t.data_type == onnx.TensorProto.FLOAT16
                        for t in proto.graph.initializer)
        self.int8 = any(node.op_type in QUANTIZED_OPS for node in proto.graph.node)
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        from ...export.onnx_export import DEFAULT_MAX_BATCH

        try:
            self.max_batch = max(1, int(self.metadata.get("max_batch", DEFAULT_MAX_BATCH)))
        except ValueError:
            self.max_batch = DEFAULT_MAX_BATCH

    def model_info(self):
        """The :class:`~vrn.model.ModelInfo` stored in the metadata, if any."""
        return info_from_metadata(self.metadata)
