"""Stand-ins for TensorRT, for tests on machines without it (and without a GPU).

- :func:`fake_tensorrt`: a ``tensorrt`` module with the logger, runtime and flags that
  the version checks and engine loading touch.
- :class:`FakeBuild`: TensorRT's builder and runtime, following the Python API of 10.x
  and 11.x call for call; its "engines" compute with ONNX Runtime on the graph they
  were built from.
- :class:`HostBuffers`: the TensorRT backend's buffer provider over NumPy arrays, whose
  data pointers play the device addresses the fake engine reads and writes.
"""

from __future__ import annotations

import json
import types

import numpy as np
import onnx
import onnxruntime as ort

from vrn.errors import BackendUnavailableError


def fake_tensorrt(version: str, *, deserialized=None) -> types.ModuleType:
    """A stand-in ``tensorrt`` module with what the code under test touches."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

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
    at the addresses the backend sets."""

    def __init__(self, version="10.3.0", layer_type="Half"):
        self.version, self.layer_type, self.calls = version, layer_type, []
        self.arrays: dict[int, np.ndarray] = {}  # "device" address -> array
        self.executions = 0

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
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", pool, size))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag))

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile", profile.shapes))
                fake.max_batch = max(shapes[2][0] for shapes in profile.shapes.values())

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, min, opt, max):
                self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

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
                return b"ENGINE:" + open(fake.onnx_path, "rb").read()

        class Context:
            def __init__(self, engine):
                self.engine, self.shapes, self.bound = engine, {}, {}

            def set_input_shape(self, name, shape):
                self.shapes[name] = tuple(shape)
                return 1 <= shape[0] <= fake.max_batch

            def get_tensor_shape(self, name):
                batch = next(iter(self.shapes.values()))[0]
                return tuple(batch if d < 0 else d for d in self.engine.shapes[name])

            def set_tensor_address(self, name, address):
                self.bound[name] = fake.arrays[address]

            def execute_async_v3(self, stream_handle):
                assert stream_handle == HostBuffers.stream_handle
                engine = self.engine
                feeds = {name: self.bound[name] for name in engine.inputs}
                for name, array in feeds.items():
                    assert array.shape == self.shapes[name] and array.dtype == np.float32
                out = self.bound[engine.output]
                out[...] = engine.session().run(None, feeds)[0]
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
                self.onnx_bytes = onnx_bytes
                graph = onnx.load_from_string(onnx_bytes).graph
                self.inputs = [v.name for v in graph.input]
                self.output = graph.output[0].name
                self.shapes = {v.name: _dims(v) for v in [*graph.input, *graph.output]}
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
                return Engine(data[len(b"ENGINE:"):]) if data.startswith(b"ENGINE:") else None

        trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
        return trt


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

    def __init__(self, registry: dict):
        self.registry = registry

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

    def synchronize(self):
        pass
