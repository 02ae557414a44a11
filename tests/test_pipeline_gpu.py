"""The GPU path of the pipeline (skipped without CUDA): torch CUDA fp16 against CPU fp32,
the GPU pipeline against the CPU pipeline, no device-to-host copy of the volume, one batch
for several faces, CUDA graphs, and the TensorRT and onnxruntime-GPU backends where
installed; each for an unguided and a landmark-guided model (crops and landmarks made as
the pipeline makes them). A few checks run anywhere, on stand-ins: the uploads and the
stage timing's synchronisation go to the backend's own device."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = dict(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1, residuals_b=1,
             residuals_b_innermost=1, out_depth=16, input_size=192)
BOXES = [(177, 66, 95, 95), (150, 40, 150, 150)]


def _model(plane: bool = False, guided: bool = False):
    """A seeded small VRN, or a landmark-guided one (non-zero guidance unless
    ``plane``). ``plane``: a flat wall at one depth, the same volume on every device."""
    from vrn.model import build_model

    torch.manual_seed(5)
    model = build_model("VRNLandmarkGuided" if guided else "VRN", SMALL, bn_mode="instance")
    model = model.eval()
    head = model.vrn.head[-1] if guided else model.head[-1]
    with torch.no_grad():
        if plane:
            head.weight.zero_()
            head.bias.copy_(torch.linspace(4.0, -4.0, SMALL["out_depth"]))
        elif guided:
            gen = torch.Generator().manual_seed(6)
            for name, param in model.named_parameters():  # the guidance starts at zero
                if not name.startswith("vrn.") and not param.any():
                    param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def photo():
    from vrn.image_io import load_image, sample_image_path

    return load_image(sample_image_path())


@pytest.fixture(scope="module")
def boxes():
    from vrn.runtime.detect import FaceBox

    return [FaceBox(*b) for b in BOXES]


@pytest.fixture(scope="module")
def crops_and_landmarks(photo, boxes):
    """The pipeline's crops of ``boxes`` (landmark stage, landmark crop): ``(2, 3, S, S)``
    float32 and their ``(2, 68, 3)`` float32 landmarks in crop pixels."""
    from vrn.runtime.crop import to_network_input
    from vrn.runtime.landmarks import LandmarkStage
    from vrn.runtime.pipeline import landmark_crops

    _, crops, landmarks = landmark_crops(photo, LandmarkStage()(photo, boxes))
    return to_network_input(crops), landmarks


@pytest.fixture(scope="module")
def crops(crops_and_landmarks):
    return crops_and_landmarks[0]


@pytest.fixture(scope="module")
def landmarks(crops_and_landmarks):
    return crops_and_landmarks[1]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / max((a | b).sum(), 1))


@needs_cuda
@pytest.mark.parametrize("guided", [False, True])
def test_cuda_fp16_matches_cpu_fp32(crops, landmarks, guided):
    from vrn.runtime.backends import TorchBackend

    reference = TorchBackend(_model(guided=guided), device="cpu").infer(crops, landmarks)
    for graphs in (False, True):
        gpu = TorchBackend(_model(guided=guided), device="cuda", precision="fp16",
                           cuda_graphs=graphs)
        assert gpu.guided == guided
        volume = gpu.infer(crops, landmarks)
        assert volume.dtype == np.float32 and volume.shape == reference.shape
        assert _iou(volume, reference) > 0.97
        again = gpu.infer(crops[:1], landmarks[:1])  # another batch size: a second graph
        assert _iou(again, reference[:1]) > 0.97
        if guided:
            with pytest.raises(ValueError, match="needs landmarks"):
                gpu.infer(crops)


@needs_cuda
@pytest.mark.parametrize("guided", [False, True])
def test_gpu_pipeline_matches_cpu_pipeline(photo, boxes, guided):
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.pipeline import Reconstructor

    model = _model(plane=True, guided=guided)
    cpu = Reconstructor(backend=TorchBackend(model, device="cpu"),
                        all_faces=True)(photo, boxes=boxes)
    gpu = Reconstructor(backend=TorchBackend(_model(plane=True, guided=guided),
                                             device="cuda", precision="fp32"),
                        all_faces=True)(photo, boxes=boxes)
    assert len(gpu.faces) == len(cpu.faces) == 2
    for g, c in zip(gpu.faces, cpu.faces):
        assert isinstance(g.mesh.vertices, np.ndarray)
        assert g.mesh.vertices.dtype == np.float32 and g.mesh.faces.dtype == np.int32
        assert np.array_equal(g.mesh.faces, c.mesh.faces)
        assert np.allclose(g.mesh.vertices, c.mesh.vertices, atol=1e-3)
        assert np.abs(g.mesh.colors.astype(int) - c.mesh.colors).max() <= 1
    assert set(gpu.timings_ms) == {"detect", "landmarks", "crop", "infer", "isosurface",
                                   "colour"}


@needs_cuda
@pytest.mark.parametrize("guided", [False, True])
def test_volume_never_leaves_the_gpu(photo, boxes, monkeypatch, guided):
    """Count every device-to-host copy during a frame: none may be volume-sized."""
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.pipeline import Reconstructor

    rec = Reconstructor(backend=TorchBackend(_model(guided=guided), device="cuda",
                                             precision="fp16", cuda_graphs=True),
                        all_faces=True)
    rec(photo, boxes=boxes)  # warm up (graph capture) before counting
    volume_elements = SMALL["out_depth"] * SMALL["input_size"] ** 2
    copies: list[int] = []
    seen_volumes: list[object] = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if self.is_cuda and (name in ("cpu", "numpy", "tolist") or
                                 (isinstance(out, torch.Tensor) and not out.is_cuda)):
                copies.append(self.numel())
            return out
        return wrapper

    for name in ("cpu", "numpy", "to", "tolist", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    try:
        from numba.cuda.cudadrv.devicearray import DeviceNDArray

        original_copy = DeviceNDArray.copy_to_host

        def copy_to_host(self, *args, **kwargs):
            copies.append(self.size)
            return original_copy(self, *args, **kwargs)

        monkeypatch.setattr(DeviceNDArray, "copy_to_host", copy_to_host)
    except ImportError:
        pass
    infer = rec.backend.infer

    def watched(batch, *args, **kwargs):
        volume = infer(batch, *args, **kwargs)
        seen_volumes.append(volume)
        return volume

    monkeypatch.setattr(rec.backend, "infer", watched)
    result = rec(photo, boxes=boxes)
    assert len(result.faces) == 2 and all(len(f.mesh.faces) for f in result.faces)
    assert len(seen_volumes) == 1 and isinstance(seen_volumes[0], torch.Tensor)
    assert seen_volumes[0].is_cuda and seen_volumes[0].shape[0] == 2  # one batch
    assert copies, "the mesh must come back to the host somehow"
    assert max(copies) < volume_elements, copies


@needs_cuda
@pytest.mark.parametrize("guided", [False, True])
def test_tensorrt_backend_when_installed(tmp_path, crops, landmarks, guided):
    trt = pytest.importorskip("tensorrt")
    build = pytest.importorskip("vrn.export.tensorrt_build")
    from vrn.export.onnx_export import export_onnx
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.backends.tensorrt_backend import TensorRTBackend

    model = _model(guided=guided)
    onnx_path = export_onnx(model, tmp_path / "small.onnx", max_batch=2).path
    engine_path = build.build_engine(onnx_path, tmp_path / "small.engine", max_batch=2,
                                     precision="fp32").engine_path
    reference = TorchBackend(_model(guided=guided), device="cpu").infer(crops, landmarks)
    for graphs in (False, True):
        backend = TensorRTBackend(engine_path, cuda_graphs=graphs)
        assert trt.__version__ in backend.describe() and backend.guided == guided
        volume = backend.infer(crops, landmarks)
        assert _iou(volume, reference) > 0.97
        on_device = backend.infer(torch.from_numpy(crops).cuda(), landmarks)
        assert on_device.is_cuda and _iou(on_device.cpu().numpy(), reference) > 0.97


@needs_cuda
@pytest.mark.parametrize("guided", [False, True])
def test_onnxruntime_gpu_when_installed(tmp_path, crops, landmarks, guided):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    from vrn.export.onnx_export import export_onnx
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    path = export_onnx(_model(guided=guided), tmp_path / "small.onnx", max_batch=2).path
    backend = OnnxRuntimeBackend(path, provider="cuda")
    assert backend.providers[0] == "CUDAExecutionProvider" and backend.guided == guided
    reference = TorchBackend(_model(guided=guided), device="cpu").infer(crops, landmarks)
    device_volume = backend.infer(torch.from_numpy(crops).cuda(), landmarks)
    assert device_volume.is_cuda
    assert np.abs(device_volume.cpu().numpy() - reference).max() < 1e-3
    assert np.abs(backend.infer(crops, landmarks) - reference).max() < 1e-3


@needs_cuda
def test_crops_go_up_through_one_reused_pinned_buffer():
    """The pipeline's upload keeps one page-locked buffer, grown only when a frame needs
    more, and waits for the last copy out of it before writing it again."""
    from vrn.runtime.pipeline import _Uploader

    upload = _Uploader(0)
    crops = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    first = upload(crops)
    buffer = upload._host
    assert buffer.is_pinned() and buffer.numel() == crops.size
    smaller = upload(crops[:1])
    assert upload._host is buffer  # reused
    larger = upload(np.concatenate([crops, crops]))
    assert upload._host is not buffer and upload._host.numel() == 2 * crops.size
    torch.cuda.synchronize()
    assert first.is_cuda and np.array_equal(first.cpu().numpy(), crops)
    assert np.array_equal(smaller.cpu().numpy(), crops[:1])
    assert np.array_equal(larger.cpu().numpy(), np.concatenate([crops, crops]))


class _DeviceBackend:
    """A GPU backend on CUDA device 1, as the pipeline sees one."""

    name, device, device_id, input_size, guided, model_info = "stub", "cuda", 1, 32, False, None


def test_uploads_go_to_the_backends_device(monkeypatch):
    """Finding 5: the crops go up to the backend's device (numba-cuda path, with
    stand-ins recording the device made current), not device 0."""
    from numba import cuda

    from vrn.kernels import _cuda
    from vrn.runtime import pipeline
    from vrn.runtime.pipeline import Reconstructor

    current, uploaded = [0], []

    @contextlib.contextmanager
    def on_device(device_id):
        current.append(device_id)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(_cuda, "on_device", on_device)
    monkeypatch.setattr(cuda, "to_device", lambda array: uploaded.append(current[-1]) or array)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rec = Reconstructor(backend=_DeviceBackend(), detector=lambda image: [],
                        landmark_stage=object())
    assert rec.device_id == 1 and rec._upload.device_id == 1
    batch = np.zeros((1, 3, 32, 32), np.float32)
    assert rec._upload(batch) is batch and uploaded == [1]
    synced = []
    monkeypatch.setattr(cuda, "synchronize", lambda: synced.append(current[-1]))
    pipeline._synchronize_device(rec.device_id)
    assert synced == [1]
