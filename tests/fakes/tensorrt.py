"""Stand-ins for TensorRT, for tests on machines without it (and without a GPU).

- :func:`fake_tensorrt`: a ``tensorrt`` module with the logger, runtime and flags that
  the version checks and engine loading touch.
- :class:`FakeBuild`: TensorRT's builder and runtime, following the Python API of 10.x
  and 11.x call for call, and as strict as the real one where our code could go wrong:
  an optimization profile with ``min > opt`` raises as the bindings do, a build and a
  timing cache can fail on request, an execution context checks every address and
  shape it is given before it runs, and an engine built from an fp16 graph perturbs its
  output as fp16 arithmetic would (so the fp16 parity gate has something to judge). Its
  "engines" compute with ONNX Runtime on the graph they were built from.
- :class:`HostBuffers`: the TensorRT backend's buffer provider over NumPy arrays, whose
  data pointers play the device addresses the fake engine reads and writes;
  :class:`GraphHostBuffers` adds CUDA-graph capture and replay.
- :meth:`FakeBuild.recording_device`: a stand-in for
  :func:`vrn.export.engine_file.cuda_device` that records which device is current, so
  tests can check that every TensorRT call happens on the engine's device.
- :func:`install_fake_gpu`: all of the above in place of TensorRT, the GPU and the
  buffer provider, for one test.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import json
import sys
import types

import numpy as np
import onnx
import onnxruntime as ort

from vrn.errors import BackendUnavailableError


def fake_tensorrt(version: str, *, deserialized=None) -> types.ModuleType:
    """A stand-in ``tensorrt`` module with what the code under test touches."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    # As an installed module has: importlib.util.find_spec("tensorrt") must not raise
    # (torch.export asks it).
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            self.severity = severity

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            return deserialized

    trt.Logger, trt.Runtime = Logger, Runtime
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    return trt


class FakeBuild:
    """A stand-in for TensorRT's builder and runtime, following the Python API of 10.x and
    11.x call for call (names, arguments, return values), so the build, inspection,
    engine-file and backend plumbing runs here; the "engine" computes with ONNX Runtime
    on the graph it was built from, reading and writing the :class:`HostBuffers` arrays
    at the addresses the backend sets.

    Faults on request: ``fail_build`` (``build_serialized_network`` returns ``None``),
    ``timing_cache_fault`` (``"corrupt"``: a stored cache does not deserialize;
    ``"mismatch"``: it is refused by ``set_timing_cache``), ``fail_execute``
    (``execute_async_v3`` returns ``False``). ``fp16_noise``: the standard deviation of
    the perturbation an fp16 engine adds to its output before rounding it to float16.

    Records: ``calls`` (builder calls), ``contexts`` (every execution context made),
    ``events`` (``(what, current device)`` of deserialisations, context creations,
    builds and executions; the device is :attr:`current_device`).
    """

    def __init__(self, version="10.3.0", layer_type="Half"):
        self.version, self.layer_type, self.calls = version, layer_type, []
        self.arrays: dict[int, np.ndarray] = {}  # "device" address -> array
        self.executions = 0
        self.fail_build = False
        self.timing_cache_fault: str | None = None
        self.fail_execute = False
        self.fp16_noise = 5e-4
        self.contexts: list = []
        self.events: list[tuple[str, int]] = []
        self.current_device = 0
        self._rng = np.random.default_rng(0)

    def module(self) -> types.ModuleType:
        fake, trt = self, fake_tensorrt(self.version)
        trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        trt.ProfilingVerbosity = types.SimpleNamespace(DETAILED="detailed")
        trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")
        trt.LayerInformationFormat = types.SimpleNamespace(JSON="json")
        trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
        trt.DataType = types.SimpleNamespace(FLOAT="float32", HALF="float16")
        trt.float32 = trt.DataType.FLOAT
        trt.nptype = lambda dtype: np.dtype(dtype).type

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))
                self.inputs = []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                proto = onnx.load(path)
                fake.onnx_path = path
                for value in proto.graph.input:
                    self.network.inputs.append(Tensor(value.name, _dims(value)))
                return True

        class Cache:
            def __init__(self, data):
                self.data = bytes(data) or b"fresh"

            def serialize(self):
                return self.data + b"+"

        class Config:
            def __init__(self):
                self.profiles = []

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", pool, size))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag))

            def create_timing_cache(self, data):
                if bytes(data) and fake.timing_cache_fault == "corrupt":
                    fake.calls.append(("timing_cache", "corrupt"))
                    return None  # TensorRT cannot deserialize it
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache.data != b"fresh" and fake.timing_cache_fault == "mismatch" \
                        and not ignore_mismatch:
                    fake.calls.append(("timing_cache", "mismatch"))
                    return False  # from another device or TensorRT version
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                if not profile.shapes:
                    return -1  # as TensorRT: an invalid (empty) profile
                fake.calls.append(("profile", profile.shapes))
                fake.max_batch = max(shapes[2][0] for shapes in profile.shapes.values())
                self.profiles.append(profile)
                return len(self.profiles) - 1

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, min, opt, max):
                shapes = [tuple(int(d) for d in s) for s in (min, opt, max)]
                for which, shape in zip(("min", "opt", "max"), shapes):
                    # As the bindings (IOptimizationProfile::setDimensions returns false).
                    if len(shape) != len(shapes[0]) or any(d < 1 for d in shape):
                        raise RuntimeError(f"Shape provided for {which} is inconsistent "
                                           "with other shapes.")
                if not all(a <= b <= c for a, b, c in zip(*shapes)):
                    raise RuntimeError("Shape provided for opt is inconsistent with other "
                                       "shapes.")
                self.shapes[name] = tuple(shapes)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("verbosity", config.profiling_verbosity))
                fake.events.append(("build", fake.current_device))
                assert config.profiles, "no optimization profile"
                if fake.fail_build:
                    return None  # TensorRT logs its reasons and returns None
                return b"ENGINE:" + open(fake.onnx_path, "rb").read()

        class Context:
            def __init__(self, engine):
                self.engine, self.shapes, self.addresses = engine, {}, {}
                fake.contexts.append(self)
                fake.events.append(("create_execution_context", fake.current_device))

            def set_input_shape(self, name, shape):
                assert name in self.engine.inputs, name
                shape = tuple(int(d) for d in shape)
                fixed = self.engine.shapes[name][1:]
                if len(shape) != len(fixed) + 1 or shape[1:] != tuple(fixed) \
                        or not 1 <= shape[0] <= fake.max_batch:
                    return False
                self.shapes[name] = shape
                return True

            def get_tensor_shape(self, name):
                batch = next(iter(self.shapes.values()))[0]
                return tuple(batch if d < 0 else d for d in self.engine.shapes[name])

            def set_tensor_address(self, name, address):
                assert name in self.engine.shapes, name
                assert isinstance(address, int) and address in fake.arrays, address
                self.addresses[name] = int(address)
                return True

            def execute_async_v3(self, stream_handle):
                """Check the addresses, shapes and stream as TensorRT would need them,
                then compute."""
                engine = self.engine
                assert stream_handle == HostBuffers.stream_handle, stream_handle
                assert fake.current_device == engine.device, \
                    (fake.current_device, engine.device)
                fake.events.append(("execute", fake.current_device))
                if fake.fail_execute:
                    return False
                feeds = {}
                for name in engine.inputs:
                    assert name in self.shapes, f"no shape set for {name}"
                    array = fake.arrays[self.addresses[name]]
                    assert array.shape == self.shapes[name], (array.shape, self.shapes[name])
                    assert array.dtype == np.float32 and array.flags.c_contiguous
                    feeds[name] = array
                out = fake.arrays[self.addresses[engine.output]]
                assert out.shape == self.get_tensor_shape(engine.output), out.shape
                assert out.dtype == engine.out_dtype and out.flags.c_contiguous
                result = engine.session().run(None, feeds)[0]
                if engine.fp16:  # fp16 arithmetic: small errors, float16 rounding
                    result = result + fake._rng.normal(0, fake.fp16_noise, result.shape)
                    result = result.astype(np.float16).astype(np.float32)
                out[...] = result
                fake.executions += 1
                return True

        class Inspector:
            execution_context = None

            def get_engine_information(self, fmt):
                assert self.execution_context.shapes  # concrete shapes set
                kind = fake.layer_type
                return json.dumps({"Layers": [
                    {"Name": "conv", "Inputs": [{"Format/Datatype": kind}],
                     "Outputs": [{"Format/Datatype": kind}]},
                    {"Name": "norm", "Inputs": [{"Format/Datatype": "Float"}],
                     "Outputs": [{"Format/Datatype": "Float"}]}]})

        class Engine:
            def __init__(self, onnx_bytes):
                from vrn.export.fp16 import graph_precision

                self.onnx_bytes = onnx_bytes
                proto = onnx.load_from_string(onnx_bytes)
                graph = proto.graph
                self.inputs = [v.name for v in graph.input]
                self.output = graph.output[0].name
                self.shapes = {v.name: _dims(v) for v in [*graph.input, *graph.output]}
                self.fp16 = graph_precision(proto) == "fp16"
                self.out_dtype = np.dtype(np.float32)
                self.device = fake.current_device
                self._session = None

            @property
            def num_io_tensors(self):
                return len(self.shapes)

            def get_tensor_name(self, i):
                return [*self.inputs, self.output][i]

            def get_tensor_mode(self, name):
                return "input" if name in self.inputs else "output"

            def get_tensor_dtype(self, name):
                return "float32"

            def get_tensor_shape(self, name):
                return self.shapes[name]

            def get_tensor_profile_shape(self, name, profile_index):
                assert profile_index == 0
                shape = self.shapes[name][1:]
                return [(1, *shape), (fake.max_batch, *shape), (fake.max_batch, *shape)]

            def create_execution_context(self):
                return Context(self)

            def create_engine_inspector(self):
                return Inspector()

            def session(self):
                if self._session is None:
                    self._session = ort.InferenceSession(
                        self.onnx_bytes, providers=["CPUExecutionProvider"])
                return self._session

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                data = bytes(data)
                fake.events.append(("deserialize", fake.current_device))
                return Engine(data[len(b"ENGINE:"):]) if data.startswith(b"ENGINE:") else None

        trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
        return trt

    def recording_device(self):
        """A stand-in for :func:`vrn.export.engine_file.cuda_device`: makes its device
        :attr:`current_device` for the block."""
        @contextlib.contextmanager
        def cuda_device(device_id=0):
            before, self.current_device = self.current_device, int(device_id)
            try:
                yield
            finally:
                self.current_device = before
        return cuda_device


def _dims(value) -> list[int]:
    """An ONNX value's shape, ``-1`` for a symbolic dimension."""
    return [d.dim_value or -1 for d in value.type.tensor_type.shape.dim]


class HostBuffers:
    """The TensorRT backend's buffer provider with NumPy arrays as the "device" arrays
    and their data pointers as addresses (recorded in ``registry`` for the fake
    engine). Method for method the API of
    :class:`~vrn.runtime.backends.cuda_arrays.TorchBuffers`."""

    kind = "host"
    graphs = False
    stream = None
    stream_handle = 7

    def __init__(self, registry: dict, device_id: int = 0):
        self.registry = registry
        self.device_id = device_id

    def activate(self):
        return contextlib.nullcontext()

    def is_device_array(self, array):
        return isinstance(array, np.ndarray)

    def pointer(self, array):
        self.registry[array.ctypes.data] = array
        return array.ctypes.data

    def empty(self, shape, dtype=np.float32):
        return np.full(tuple(shape), np.nan, dtype)

    def upload(self, array, out=None):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if out is None:
            return array.copy()
        out[...] = array
        return out

    def copy_into(self, dst, src):
        dst[...] = src

    def fill(self, array, value):
        array.fill(value)

    def clone(self, array):
        return array.copy()

    def as_float32(self, array):
        return array.astype(np.float32, copy=False)

    def concat(self, chunks):
        return np.concatenate(chunks)

    def to_host(self, array):
        return np.array(array)

    def hand_over(self, array):
        return array

    def capture(self, launch):
        raise BackendUnavailableError("CUDA graphs need a CUDA build of torch")

    def replay(self, graph):
        raise BackendUnavailableError("CUDA graphs need a CUDA build of torch")

    def synchronize(self):
        pass


class GraphHostBuffers(HostBuffers):
    """:class:`HostBuffers` that capture CUDA graphs: a "graph" is the launch function,
    called once at capture (as ``torch.cuda.graph`` runs it under capture) and again at
    each replay. ``fail_capture``: the capture raises as torch does when a stream
    capture is invalidated. ``captures`` counts the captures."""

    graphs = True

    def __init__(self, registry: dict, device_id: int = 0, *, fail_capture: bool = False):
        super().__init__(registry, device_id)
        self.fail_capture, self.captures, self.replays = fail_capture, 0, 0

    def capture(self, launch):
        self.captures += 1
        launch()
        if self.fail_capture:
            raise RuntimeError("CUDA error: operation failed due to a previous error "
                               "during capture")
        return launch

    def replay(self, graph):
        self.replays += 1
        graph()


def install_fake_gpu(monkeypatch, build: FakeBuild, gpu, *, buffers=None) -> FakeBuild:
    """Put ``build``'s stand-in TensorRT in place of ``tensorrt``, report ``gpu`` (a
    :class:`~vrn.export.engine_file.GpuInfo`) as every CUDA device (``gpu_calls`` on
    ``build`` records the devices asked for), make :attr:`FakeBuild.current_device` the
    current device, and give the TensorRT backend ``buffers(device_id)`` (default:
    :class:`HostBuffers` over ``build.arrays``). Call
    :func:`clear_tensorrt_caches` after the test."""
    from vrn.deploy import exporter
    from vrn.export import engine_file, tensorrt_build
    from vrn.runtime.backends import cuda_arrays

    monkeypatch.setitem(sys.modules, "tensorrt", build.module())
    clear_tensorrt_caches()
    build.gpu_calls = []

    def current_gpu(device=0):
        build.gpu_calls.append(device)
        return gpu

    for module in (engine_file, tensorrt_build, exporter):
        monkeypatch.setattr(module, "current_gpu", current_gpu)
    for module in (engine_file, tensorrt_build):
        monkeypatch.setattr(module, "cuda_device", build.recording_device())
    buffers = buffers or (lambda device_id=0: HostBuffers(build.arrays, device_id))
    monkeypatch.setattr(cuda_arrays, "device_buffers", buffers)
    return build


def clear_tensorrt_caches() -> None:
    """Forget the process's TensorRT runtime and logger (made from the module in use)."""
    from vrn.export import engine_file, tensorrt_lib

    engine_file.tensorrt_runtime.cache_clear()
    tensorrt_lib.tensorrt_logger.cache_clear()
