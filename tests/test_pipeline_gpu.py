"""The GPU path of the pipeline (skipped without CUDA): torch CUDA fp16 against CPU fp32,
the GPU pipeline against the CPU pipeline, no device-to-host copy of the volume, one batch
for several faces, CUDA graphs, and the TensorRT and onnxruntime-GPU backends where
installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = dict(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1, residuals_b=1,
             residuals_b_innermost=1, out_depth=16, input_size=192)
BOXES = [(177, 66, 95, 95), (150, 40, 150, 150)]


def _model(plane: bool = False):
    from vrn.model import VRN, VRNConfig, set_bn_mode

    torch.manual_seed(5)
    model = set_bn_mode(VRN(VRNConfig(**SMALL)), "instance").eval()
    if plane:  # a flat wall at one depth: the same volume on every device
        with torch.no_grad():
            model.head[-1].weight.zero_()
            model.head[-1].bias.copy_(torch.linspace(4.0, -4.0, SMALL["out_depth"]))
    return model


@pytest.fixture(scope="module")
def photo():
    from vrn.runtime.image_io import load_image, sample_image_path

    return load_image(sample_image_path())


@pytest.fixture(scope="module")
def boxes():
    from vrn.runtime.detect import FaceBox

    return [FaceBox(*b) for b in BOXES]


@pytest.fixture(scope="module")
def crops(photo, boxes):
    from vrn.runtime.crop import box_crop_matrix, to_network_input, warp_crop

    return to_network_input(np.stack([warp_crop(photo, box_crop_matrix(b)) for b in boxes]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_cuda_fp16_matches_cpu_fp32(crops):
    from vrn.runtime.backends import TorchBackend

    reference = TorchBackend(_model(), device="cpu").infer(crops)
    for graphs in (False, True):
        gpu = TorchBackend(_model(), device="cuda", precision="fp16", cuda_graphs=graphs)
        volume = gpu.infer(crops)
        assert volume.dtype == np.float32 and volume.shape == reference.shape
        assert _iou(volume, reference) > 0.97
        again = gpu.infer(crops[:1])  # another batch size: a second graph
        assert _iou(again, reference[:1]) > 0.97


def test_gpu_pipeline_matches_cpu_pipeline(photo, boxes):
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.pipeline import Reconstructor

    cpu = Reconstructor(backend=TorchBackend(_model(plane=True), device="cpu"),
                        all_faces=True)(photo, boxes=boxes)
    gpu = Reconstructor(backend=TorchBackend(_model(plane=True), device="cuda",
                                             precision="fp32"),
                        all_faces=True)(photo, boxes=boxes)
    assert len(gpu.faces) == len(cpu.faces) == 2
    for g, c in zip(gpu.faces, cpu.faces):
        assert isinstance(g.mesh.vertices, np.ndarray)
        assert g.mesh.vertices.dtype == np.float32 and g.mesh.faces.dtype == np.int32
        assert np.array_equal(g.mesh.faces, c.mesh.faces)
        assert np.allclose(g.mesh.vertices, c.mesh.vertices, atol=1e-3)
        assert np.abs(g.mesh.colors.astype(int) - c.mesh.colors).max() <= 1
    assert set(gpu.timings_ms) == {"detect", "crop", "infer", "isosurface", "colour"}


def test_volume_never_leaves_the_gpu(photo, boxes, monkeypatch):
    """Count every device-to-host copy during a frame: none may be volume-sized."""
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.pipeline import Reconstructor

    rec = Reconstructor(backend=TorchBackend(_model(), device="cuda", precision="fp16",
                                             cuda_graphs=True), all_faces=True)
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

    def watched(batch, **kwargs):
        volume = infer(batch, **kwargs)
        seen_volumes.append(volume)
        return volume

    monkeypatch.setattr(rec.backend, "infer", watched)
    result = rec(photo, boxes=boxes)
    assert len(result.faces) == 2 and all(len(f.mesh.faces) for f in result.faces)
    assert len(seen_volumes) == 1 and isinstance(seen_volumes[0], torch.Tensor)
    assert seen_volumes[0].is_cuda and seen_volumes[0].shape[0] == 2  # one batch
    assert copies, "the mesh must come back to the host somehow"
    assert max(copies) < volume_elements, copies


def test_tensorrt_backend_when_installed(tmp_path, crops):
    trt = pytest.importorskip("tensorrt")
    build = pytest.importorskip("vrn.export.tensorrt_build")
    from vrn.export.onnx_export import export_onnx
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.backends.tensorrt_backend import TensorRTBackend

    model = _model()
    onnx_path = export_onnx(model, tmp_path / "small.onnx", max_batch=2).path
    engine_path = build.build_engine(onnx_path, tmp_path / "small.engine", max_batch=2,
                                     precision="fp32").engine_path
    reference = TorchBackend(_model(), device="cpu").infer(crops)
    for graphs in (False, True):
        backend = TensorRTBackend(engine_path, cuda_graphs=graphs)
        assert trt.__version__ in backend.describe()
        volume = backend.infer(crops)
        assert _iou(volume, reference) > 0.97
        on_device = backend.infer(torch.from_numpy(crops).cuda())
        assert on_device.is_cuda and _iou(on_device.cpu().numpy(), reference) > 0.97


def test_onnxruntime_gpu_when_installed(tmp_path, crops):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    from vrn.export.onnx_export import export_onnx
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    path = export_onnx(_model(), tmp_path / "small.onnx", max_batch=2).path
    backend = OnnxRuntimeBackend(path, provider="cuda")
    assert backend.providers[0] == "CUDAExecutionProvider"
    reference = TorchBackend(_model(), device="cpu").infer(crops)
    device_volume = backend.infer(torch.from_numpy(crops).cuda())
    assert device_volume.is_cuda
    assert np.abs(device_volume.cpu().numpy() - reference).max() < 1e-3
    assert np.abs(backend.infer(crops) - reference).max() < 1e-3
