"""Inference backends: the factory and ``auto`` selection, ONNX Runtime on the CPU
against torch, provider-fallback detection, the ONNX cache, landmark-guided models
(landmarks required, checked, and the same on both backends), and clear errors for what
this machine cannot run."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from vrn.errors import BackendUnavailableError
from vrn.runtime import backends
from vrn.runtime.backends import TorchBackend, choose_backend, create_backend

SMALL = dict(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1, residuals_b=1,
             residuals_b_innermost=1, out_depth=8, input_size=192)


@pytest.fixture(scope="module")
def small_model():
    from vrn.model import VRN, VRNConfig, set_bn_mode

    torch.manual_seed(3)
    return set_bn_mode(VRN(VRNConfig(**SMALL)), "instance").eval()


@pytest.fixture(scope="module")
def weights(small_model, tmp_path_factory):
    from vrn.model import save_checkpoint

    path = tmp_path_factory.mktemp("w") / "small.safetensors"
    save_checkpoint(small_model, path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ort_backend(weights, cache_dir):
    """onnxruntime on the CPU from the checkpoint: exported once into ``cache_dir``."""
    pytest.importorskip("onnxruntime")
    return create_backend("onnxruntime", weights, device="cpu", cache_dir=cache_dir)


@pytest.fixture(scope="module")
def pipeline_crops():
    """Two crops of the sample photo made as the pipeline makes them (the landmark stage
    on two boxes, the landmark crop): ``(2, 3, 192, 192)`` float32 and their landmarks
    ``(2, 68, 3)`` float32 crop pixels."""
    from vrn.runtime.crop import to_network_input
    from vrn.runtime.detect import FaceBox
    from vrn.image_io import load_image, sample_image_path
    from vrn.runtime.landmarks import LandmarkStage
    from vrn.runtime.pipeline import landmark_crops

    image = load_image(sample_image_path())
    boxes = [FaceBox(177, 66, 95, 95), FaceBox(150, 40, 150, 150)]
    _, crops, landmarks = landmark_crops(image, LandmarkStage()(image, boxes))
    return to_network_input(crops), landmarks


@pytest.fixture(scope="module")
def batch(pipeline_crops):
    return pipeline_crops[0]


def test_onnxruntime_cpu_matches_torch(ort_backend, weights, batch, pipeline_crops):
    reference = create_backend("torch", weights, device="cpu")
    assert not reference.guided and not ort_backend.guided
    expected = reference.infer(batch)
    got = ort_backend.infer(batch)
    assert got.shape == expected.shape == (2, 8, 192, 192) and got.dtype == np.float32
    assert np.abs(got - expected).max() < 1e-4
    # An unguided model ignores landmarks, whatever their shape.
    landmarks = pipeline_crops[1]
    assert np.array_equal(reference.infer(batch, landmarks), expected)
    assert np.array_equal(ort_backend.infer(batch, landmarks[:, :, :2]), got)
    # A torch tensor in gives NumPy out on the CPU provider, the same numbers.
    assert np.array_equal(ort_backend.infer(torch.from_numpy(batch)), got)
    assert ort_backend.input_size == 192 and ort_backend.out_depth == 8
    assert ort_backend.model_info.config.out_depth == 8


def test_onnxruntime_cpu_session_is_tuned(ort_backend):
    import onnxruntime as ort

    from vrn.runtime.cpu import physical_cores

    options = ort_backend.session.get_session_options()
    assert options.intra_op_num_threads == physical_cores() >= 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert ort_backend.providers == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in ort_backend.describe()


def test_onnx_export_is_cached(weights, cache_dir, ort_backend, monkeypatch):
    import vrn.export.onnx_export as onnx_export

    files = sorted((cache_dir / "onnx").glob("*.onnx"))
    assert len(files) == 1
    monkeypatch.setattr(onnx_export, "export_onnx",
                        lambda *a, **k: pytest.fail("exported again despite the cache"))
    again = create_backend("onnxruntime", weights, device="cpu", cache_dir=cache_dir)
    assert again.path == files[0]
    assert sorted((cache_dir / "onnx").glob("*")) == files  # no temporary files left


def test_onnx_file_as_weights(ort_backend, batch):
    direct = create_backend("auto", ort_backend.path, device="cpu")
    assert direct.name == "onnxruntime" and "ONNX file" in direct.selection_reason
    assert direct.model_info is not None and direct.model_info.config.out_depth == 8
    assert np.array_equal(direct.infer(batch[:1]), ort_backend.infer(batch[:1]))


def test_int8_graph_is_labelled_int8(ort_backend, batch, tmp_path):
    """A quantised graph says so in its precision and its one-line description."""
    from onnxruntime.quantization import quantize_dynamic

    from vrn.runtime.backends import create_backend

    quantised = tmp_path / "int8.onnx"
    quantize_dynamic(str(ort_backend.path), str(quantised))
    backend = create_backend("onnxruntime", quantised, device="cpu")
    assert ort_backend.precision == "fp32" and backend.precision == "int8"
    assert ", int8," in backend.describe()
    assert backend.infer(batch).shape == ort_backend.infer(batch).shape


def test_silent_provider_fallback_is_an_error(ort_backend, monkeypatch):
    """onnxruntime lists CUDA yet loads only the CPU provider: we must say so."""
    import onnxruntime as ort

    from vrn.runtime.backends import onnxruntime_backend
    from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    real = ort.InferenceSession
    monkeypatch.setattr(onnxruntime_backend, "device_buffers",  # no GPU here
                        lambda device_id=0: _NumpyBuffers({}))

    class FallingBack(real):
        def __init__(self, path, options=None, providers=None, **kw):
            super().__init__(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", FallingBack)
    with pytest.raises(BackendUnavailableError, match="asked for CUDAExecutionProvider but "
                                                       "the session loaded"):
        OnnxRuntimeBackend(ort_backend.path, provider="cuda")


def test_missing_provider_and_bad_files(ort_backend, tmp_path):
    from vrn.errors import VRNError
    from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    with pytest.raises(BackendUnavailableError, match="TensorrtExecutionProvider is not"):
        OnnxRuntimeBackend(ort_backend.path, provider="tensorrt")
    with pytest.raises(VRNError, match="ONNX file not found"):
        OnnxRuntimeBackend(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01junk")
    with pytest.raises(VRNError, match="junk.onnx"):
        OnnxRuntimeBackend(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="provider must be one of"):
        OnnxRuntimeBackend(ort_backend.path, provider="metal")
    with pytest.raises(ValueError, match=r"batch must be \(N, 3, 192, 192\)"):
        ort_backend.infer(np.zeros((1, 3, 96, 96), np.float32))


class _NumpyBuffers:
    """The GPU buffer provider's API over NumPy arrays (addresses: their data pointers,
    recorded in ``registry``), for the GPU code paths on this CPU-only machine."""

    stream_handle = 7

    def __init__(self, registry: dict):
        self.registry = registry
        self.allocations = 0

    def pointer(self, array):
        self.registry[array.ctypes.data] = array
        return array.ctypes.data

    def empty(self, shape, dtype=np.float32):
        self.allocations += 1
        return np.full(tuple(shape), np.nan, dtype)

    def upload(self, array, out=None):
        if isinstance(array, torch.Tensor):  # a "device" array: used in place
            return array.numpy()
        out[...] = array
        return out

    def to_host(self, array):
        return np.array(array)

    def hand_over(self, array):
        return array


class _FakeBinding:
    """``onnxruntime.IOBinding``: what is bound to each name."""

    def __init__(self):
        self.bound, self.calls = {}, 0

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.bound[name] = (device_type, element_type, tuple(shape), buffer_ptr)
        self.calls += 1

    bind_output = bind_input


def test_onnxruntime_gpu_binding_is_reused_per_batch_size(ort_backend, batch, monkeypatch):
    """The IO-binding path of the GPU providers, over NumPy stand-ins for the device
    buffers and the binding: one binding with its input and output buffers per batch
    size, reused; a device result is a new array each call (the caller keeps it)."""
    from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend(ort_backend.path)
    registry: dict = {}
    real = backend.session
    bindings = []

    class Session:
        def io_binding(self):
            bindings.append(_FakeBinding())
            return bindings[-1]

        def run_with_iobinding(self, binding):
            x = registry[binding.bound[backend.input_name][3]]
            y = registry[binding.bound[backend.output_name][3]]
            assert binding.bound[backend.input_name][:3] == ("cuda", np.float32, x.shape)
            y[...] = real.run(None, {backend.input_name: x})[0]

    backend.device, backend.session = "cuda", Session()
    backend._buffers = buffers = _NumpyBuffers(registry)
    expected = ort_backend.infer(batch)
    for _ in range(3):
        assert np.array_equal(backend.infer(batch), expected)
    assert len(bindings) == 1 and bindings[0].calls == 2 and buffers.allocations == 2
    assert np.array_equal(backend.infer(batch[:1]), expected[:1])  # another batch size
    assert len(bindings) == 2 and buffers.allocations == 4
    first = backend.infer(torch.from_numpy(batch))  # a "device" batch: a device result
    second = backend.infer(torch.from_numpy(batch))
    assert first is not second and np.array_equal(first, expected)
    assert len(bindings) == 2 and buffers.allocations == 6


def _machine(monkeypatch, *, torch_cuda=False, gpu=False, tensorrt=False, ort=True):
    monkeypatch.setattr(backends, "torch_cuda_available", lambda: torch_cuda)
    monkeypatch.setattr(backends, "cuda_available", lambda: gpu or torch_cuda)
    monkeypatch.setattr(backends, "onnxruntime_providers",
                        lambda: ["CPUExecutionProvider"] if ort else [])
    real = backends._has_module
    monkeypatch.setattr(backends, "_has_module",
                        lambda name: tensorrt if name == "tensorrt" else real(name))


def test_auto_picks_the_fastest_available(monkeypatch):
    _machine(monkeypatch, torch_cuda=True, tensorrt=True)
    choice = choose_backend(engine="vrn.engine")
    assert choice.name == "tensorrt" and "engine" in choice.reason
    choice = choose_backend()
    assert (choice.name, choice.device, choice.precision) == ("torch", "cuda", "fp16")
    _machine(monkeypatch, gpu=False, ort=True)
    choice = choose_backend()
    assert (choice.name, choice.device, choice.precision) == ("onnxruntime", "cpu", "fp32")
    assert "faster than eager torch" in choice.reason
    _machine(monkeypatch, gpu=False, ort=False)
    assert (choose_backend().name, choose_backend().device) == ("torch", "cpu")
    with pytest.raises(BackendUnavailableError, match="tensorrt package is not installed"):
        choose_backend(engine="vrn.engine")
    _machine(monkeypatch, gpu=False, tensorrt=True)
    with pytest.raises(BackendUnavailableError, match="no CUDA GPU"):
        choose_backend(engine="vrn.engine")


def test_auto_on_this_machine(weights, cache_dir, ort_backend):
    backend = create_backend("auto", weights, cache_dir=cache_dir)
    expected = choose_backend(weights=weights)
    assert (backend.name, backend.device) == (expected.name, expected.device)
    assert backend.selection_reason == expected.reason


def test_factory_rejects_bad_requests(weights, tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        create_backend("openvino", weights)
    with pytest.raises(ValueError, match="either weights or an engine"):
        create_backend("auto", weights, engine=tmp_path / "x.engine")
    with pytest.raises(ValueError, match="runs only on the tensorrt backend"):
        create_backend("torch", engine=tmp_path / "x.engine")
    with pytest.raises(ValueError, match="needs --engine"):
        create_backend("tensorrt", weights)


def test_tensorrt_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BackendUnavailableError, match="TensorRT is not available"):
        create_backend("tensorrt", engine=tmp_path / "vrn.engine")


def test_torch_backend_options(small_model, batch):
    cpu = TorchBackend(small_model, device="cpu")
    volume = cpu.infer(batch[:1])
    assert volume.shape == (1, 8, 192, 192) and volume.dtype == np.float32
    tensor = cpu.infer(torch.from_numpy(batch[:1]))
    assert isinstance(tensor, torch.Tensor) and torch.equal(tensor, torch.from_numpy(volume))
    assert isinstance(cpu.infer(torch.from_numpy(batch[:1]), on_device=False), np.ndarray)
    bf16 = TorchBackend(small_model, device="cpu", precision="bf16").infer(batch[:1])
    assert bf16.dtype == np.float32
    assert np.mean((bf16 > 0.5) == (volume > 0.5)) > 0.95
    with pytest.raises(BackendUnavailableError, match="fp16 needs CUDA"):
        TorchBackend(small_model, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        TorchBackend(small_model, device="cpu", cuda_graphs=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchBackend(small_model, precision="int4")
    with pytest.raises(ValueError, match="batch must be"):
        cpu.infer(np.zeros((3, 192, 192), np.float32))
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA requested"):
            TorchBackend(small_model, device="cuda")


# ------------------------------------------------------------------ landmark-guided

@pytest.fixture(scope="module")
def guided_weights(tmp_path_factory):
    """A small landmark-guided VRN with non-zero guidance (fresh models start with
    zero guidance, which would hide the landmarks' path), saved as a checkpoint."""
    from conftest import guided_model

    from vrn.model import save_checkpoint

    model = guided_model(SMALL)
    path = tmp_path_factory.mktemp("guided") / "guided.safetensors"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def guided_backends(guided_weights, cache_dir):
    pytest.importorskip("onnxruntime")
    return {name: create_backend(name, guided_weights, device="cpu", cache_dir=cache_dir)
            for name in ("torch", "onnxruntime")}


@pytest.fixture(scope="module")
def sample_face():
    """The bundled photo through the pipeline's :func:`~vrn.runtime.pipeline.face_crops`:
    ``(N, 3, 192, 192)`` crops and ``(N, 68, 3)`` crop-pixel landmarks."""
    from vrn.image_io import load_image, sample_image_path
    from vrn.runtime.pipeline import face_crops

    crops, landmarks = face_crops(load_image(sample_image_path()))
    assert len(crops) >= 1
    return crops, landmarks


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_guided_backend_refuses_missing_or_misshapen_landmarks(guided_backends, sample_face,
                                                               name):
    backend = guided_backends[name]
    crops, landmarks = sample_face
    assert backend.guided
    with pytest.raises(ValueError, match="landmark-guided.*needs landmarks"):
        backend.infer(crops)
    n = len(crops)
    for bad in (landmarks[..., :2],                        # (N, 68, 2): no z
                landmarks[:, :5],                          # too few points
                np.concatenate([landmarks, landmarks]),    # not one set per crop
                landmarks[0]):                             # no batch axis
        with pytest.raises(ValueError, match=rf"landmarks must be \({n}, 68, 3\)"):
            backend.infer(crops, bad)
    nan = landmarks.copy()
    nan[0, 7, 2] = np.nan
    with pytest.raises(ValueError, match="finite"):
        backend.infer(crops, nan)


def test_guided_torch_and_onnxruntime_agree_on_the_sample_face(guided_backends, sample_face):
    crops, landmarks = sample_face
    torch_volume = guided_backends["torch"].infer(crops, landmarks)
    ort_volume = guided_backends["onnxruntime"].infer(crops, landmarks)
    assert torch_volume.shape == ort_volume.shape == (len(crops), 8, 192, 192)
    assert np.abs(ort_volume - torch_volume).max() < 1e-4
    # The landmarks matter: moved landmarks give another volume.
    moved = landmarks + np.array([12.0, -8.0, 5.0], np.float32)
    assert np.abs(guided_backends["torch"].infer(crops, moved) - torch_volume).max() > 1e-3
    # A torch tensor of landmarks is taken as well.
    again = guided_backends["torch"].infer(crops, torch.from_numpy(landmarks))
    assert np.array_equal(again, torch_volume)


# ------------------------------------------------------------------------- GPU readiness

def test_tensorrt_provider_profile_maximum_comes_from_the_graph(ort_backend, tmp_path,
                                                               monkeypatch):
    """Finding 9: the ONNX Runtime TensorRT provider's profile runs from batch 1 (also
    its optimum) to the batch the graph was exported for, not a fixed 4."""
    import onnx

    from vrn.runtime.backends import onnxruntime_backend
    from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, _GraphFacts

    proto = onnx.load(str(ort_backend.path))
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        "max_batch": "3"})
    path = tmp_path / "max3.onnx"
    onnx.save(proto, str(path))
    monkeypatch.setattr(onnxruntime_backend, "device_buffers",
                        lambda device_id=0: _NumpyBuffers({}))
    backend = OnnxRuntimeBackend.__new__(OnnxRuntimeBackend)
    providers = backend._provider_list("tensorrt", 1, tmp_path, True, _GraphFacts(path))
    name, options = providers[0]
    assert name == "TensorrtExecutionProvider" and options["device_id"] == "1"
    assert options["trt_profile_min_shapes"] == "image:1x3x192x192"
    assert options["trt_profile_opt_shapes"] == "image:1x3x192x192"
    assert options["trt_profile_max_shapes"] == "image:3x3x192x192"
    assert providers[1][1]["device_id"] == "1"  # the CUDA provider on the same device
    assert _GraphFacts(ort_backend.path).max_batch == 4  # no metadata: the export default


def test_torch_cuda_volume_is_contiguous_in_the_network_dtype(small_model, batch):
    """Finding 9: on the CUDA path the volume for the device is C-contiguous (D, H, W)
    in the network's dtype (no float32 copy); the host gets float32. The CUDA path's
    code runs here on the CPU, whose fp16 convolutions torch also has."""
    import copy

    backend = TorchBackend(copy.deepcopy(small_model), device="cpu")
    reference = backend.infer(batch[:1])
    backend.device, backend.dtype = "cuda", torch.float16  # the CUDA code path, on the CPU
    backend.model = backend.model.to(dtype=torch.float16, memory_format=torch.channels_last)
    volume = backend.infer(torch.from_numpy(batch[:1]), on_device=True)
    assert volume.dtype == torch.float16 and volume.is_contiguous()
    assert tuple(volume.shape) == (1, 8, 192, 192)
    host = backend.infer(batch[:1])
    assert host.dtype == np.float32 and host.flags.c_contiguous
    assert np.mean((host > 0.5) == (reference > 0.5)) > 0.95
    assert backend.device_id is None  # a CPU backend has no CUDA device


def test_channels_last_convolutions_on_the_guided_default():
    """``Module.to(memory_format=channels_last)`` refuses the landmark-guided model's 5-D
    buffers; the backend converts the convolutions alone (the CUDA and bf16 paths)."""
    from vrn.model import load_model
    from vrn.runtime.backends.torch_backend import _convolutions_channels_last

    model = load_model()
    with pytest.raises(RuntimeError, match="rank 4"):
        model.to(memory_format=torch.channels_last)
    _convolutions_channels_last(model.to(dtype=torch.float16))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last)
                         and m.weight.dtype == torch.float16 for m in convs)
