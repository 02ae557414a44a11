"""The landmark-guided VRN: in-graph guidance against its NumPy twins, export parity,
the landmark crop, training with guidance."""

from __future__ import annotations

import csv

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import guided_model
from train_samples import disk_samples

from vrn.model import (VRN, VRNConfig, VRNLandmarkGuided, build_model, load_checkpoint,
                       save_checkpoint)
from vrn.model.heatmaps import (DepthSmoothing, LandmarkDepth, LandmarkHeatmaps,
                                PlaneSmoothing, render_heatmaps, render_landmark_depth)

SMALL = dict(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1, residuals_b=1,
             residuals_b_innermost=1, out_depth=16, input_size=64)


def _landmarks(n=2, size=192, seed=0):
    from vrn.deploy.parity import random_landmarks

    return random_landmarks(n, size, seed=seed)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_graph_heatmaps_equal_numpy_heatmaps():
    lm = _landmarks(3)
    graph = LandmarkHeatmaps(96, step=2.0, sigma=3.0)(torch.from_numpy(lm[..., :2])).numpy()
    reference = render_heatmaps(lm, size=96, step=2.0, sigma=3.0)
    assert graph.shape == (3, 68, 96, 96)
    np.testing.assert_allclose(graph, reference, atol=1e-6)
    # The peak of each heatmap sits on its landmark's nearest grid point.
    n, k = 1, 30
    i, j = np.unravel_index(reference[n, k].argmax(), (96, 96))
    assert abs(2 * j - lm[n, k, 0]) <= 1 and abs(2 * i - lm[n, k, 1]) <= 1


def test_graph_depth_field_equals_numpy_and_interpolates():
    lm = _landmarks(2)
    rng = np.random.default_rng(2)
    points = rng.dirichlet(np.ones(68), size=64)  # affine combinations: rows sum to 1
    points = 1.5 * points - 0.5 / 68              # some outside the landmarks' hull
    kwargs = dict(size=48, step=191 / 47, sigma=4.0, nearness=0.1, cover_sigma=5.0,
                  anchor=186.5)
    module = LandmarkDepth(num_points=64, **kwargs)
    with torch.no_grad():
        module.points.copy_(torch.from_numpy(points).float())
    graph = module(torch.from_numpy(lm)).numpy()
    reference = render_landmark_depth(lm, points, **kwargs)
    assert graph.shape == (2, 2, 48, 48)
    np.testing.assert_allclose(graph, reference, rtol=1e-5, atol=2e-3)
    # A flat face gives a flat field at the anchor, covered on its points only.
    flat = lm.copy()
    flat[..., 2] = 7.0
    field = render_landmark_depth(flat, points, **kwargs)
    np.testing.assert_allclose(field[:, 0], 186.5, atol=1e-3)
    assert field[:, 1].max() > 0.9 and field[:, 1].min() < 0.01
    # Nearer points (larger z) raise the field where they are, at 2 voxels a pixel.
    tilted = flat.copy()
    tilted[..., 2] = flat[..., 0]  # z grows to the right
    field = render_landmark_depth(tilted, points, **kwargs)[0, 0]
    assert field[24, 36] > field[24, 12] + 20
    assert field.max() <= 186.5 + 1e-3
    # The surface points follow a rotation of the landmarks exactly.
    turn = np.array([[0.8, 0.0, 0.6], [0.0, 1.0, 0.0], [-0.6, 0.0, 0.8]])
    with torch.no_grad():
        moved = torch.matmul(module.points, torch.from_numpy(lm[0] @ turn.T).float())
        expected = torch.matmul(module.points, torch.from_numpy(lm[0]).float()) @ \
            torch.from_numpy(turn.T).float()
    np.testing.assert_allclose(moved.numpy(), expected.numpy(), atol=1e-3)


def test_depth_smoothing_is_normalised_and_keeps_a_ramp():
    smooth = DepthSmoothing(2.0)
    ramp = torch.arange(40, dtype=torch.float32).view(1, 40, 1, 1).expand(1, 40, 3, 3)
    out = smooth(ramp)
    # A linear ramp is unchanged away from the ends (symmetric, normalised kernel).
    np.testing.assert_allclose(out[0, 10:30, 1, 1].numpy(), np.arange(10, 30), atol=1e-4)
    step = torch.zeros(1, 40, 1, 1)
    step[:, 20:] = 10.0
    blurred = smooth(step)[0, :, 0, 0].numpy()
    assert 0 < blurred[19] < 5 < blurred[20] < 10
    assert blurred[0] == 0 and abs(blurred[-1] - 10) < 1e-5
    assert torch.equal(DepthSmoothing(0.0)(step), step)


def test_plane_smoothing_keeps_planes_and_rounds_kinks():
    smooth = PlaneSmoothing(4)
    y, x = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    plane = (3 * x - 2 * y + 5).expand(1, 4, 12, 12)
    # A plane is unchanged away from the edges (symmetric, normalised kernel).
    np.testing.assert_allclose(smooth(plane)[..., 1:-1, 1:-1].numpy(),
                               plane[..., 1:-1, 1:-1].numpy(), atol=1e-5)
    kink = torch.abs(x - 6).expand(1, 4, 12, 12)
    out = smooth(kink)[0, 0]
    assert abs(float(out[5, 6]) - 0.5) < 1e-6 and float(out[5, 3]) == 3.0
    # Each depth plane is blurred alone, with its edge values repeated.
    spike = torch.zeros(1, 4, 12, 12)
    spike[0, 2, 0, 5] = 16.0
    out = smooth(spike)
    assert out[0, [0, 1, 3]].abs().max() == 0 and float(out[0, 2].sum()) == 16.0
    assert float(out[0, 2, 0, 5]) == 6.0 and float(out[0, 2, 1, 5]) == 2.0


def test_guided_model_starts_as_its_unguided_vrn():
    torch.manual_seed(0)
    model = build_model("VRNLandmarkGuided", SMALL, bn_mode="instance").eval()
    plain = VRN(VRNConfig(**SMALL))
    plain.load_state_dict(model.vrn.state_dict())
    from vrn.model import set_bn_mode

    set_bn_mode(plain, "instance").eval()
    image = torch.rand(2, 3, 64, 64)
    lm = torch.from_numpy(_landmarks(2, 64))
    with torch.no_grad():
        guided = model.trunk_logits(image, lm)
        unguided = plain.head(plain.features(image)) + model.prior(lm, model.depth.points)
    # Guidance convolutions at zero: the plain VRN's head plus the fixed slab prior.
    np.testing.assert_allclose(guided.numpy(), model.smooth(unguided).numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="3 channels"):
        VRNLandmarkGuided(VRNConfig(**{**SMALL, "in_channels": 71}))


def test_guided_export_parity_with_onnxruntime(tmp_path):
    from vrn.deploy.parity import check_parity, parity_inputs
    from vrn.export.onnx_export import LANDMARKS_NAME, export_onnx
    from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from vrn.runtime.backends.torch_backend import TorchBackend

    model = guided_model(SMALL, guidance_scale=0.05)
    path = tmp_path / "guided.onnx"
    graph = export_onnx(model, path, max_batch=3)
    assert graph.landmarks_name == LANDMARKS_NAME
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "landmarks"]
    assert session.get_inputs()[1].shape == ["batch", 68, 3]
    inputs = parity_inputs(3, 64, random_count=3, guided=True)
    report = check_parity(TorchBackend(model), OnnxRuntimeBackend(path), inputs,
                          name="guided", precision="fp32", max_batch=3)
    assert report.passed, report.rows


def test_guided_fp16_graph_keeps_fp32_landmarks(tmp_path):
    import onnx

    from vrn.export.fp16 import export_fp16
    from vrn.export.onnx_export import export_onnx

    model = guided_model(SMALL, guidance_scale=0.05)
    export_onnx(model, tmp_path / "g.onnx", max_batch=2)
    export_fp16(tmp_path / "g.onnx", tmp_path / "g16.onnx")
    proto = onnx.load(str(tmp_path / "g16.onnx"))
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [1, 1]
    session = ort.InferenceSession(str(tmp_path / "g16.onnx"),
                                   providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    lm = _landmarks(2, 64)
    out = session.run(None, {"image": image, "landmarks": lm})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(image), torch.from_numpy(lm)).numpy()
    assert out.dtype == np.float32 and np.abs(out - ref).max() < 0.02


def test_backends_need_landmarks_for_a_guided_model(tmp_path):
    from vrn.runtime.backends import create_backend

    model = guided_model(SMALL, guidance_scale=0.05)
    path = tmp_path / "g.safetensors"
    save_checkpoint(model, path)
    image = np.random.default_rng(0).random((2, 3, 64, 64), dtype=np.float32)
    lm = _landmarks(2, 64)
    volumes = {}
    for name in ("torch", "onnxruntime"):
        backend = create_backend(name, path, cache_dir=tmp_path / "cache")
        assert backend.guided
        with pytest.raises(ValueError, match="landmarks"):
            backend.infer(image)
        with pytest.raises(ValueError, match=r"\(2, 68, 3\)"):
            backend.infer(image, lm[:, :, :2])
        bad = lm.copy()
        bad[0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="finite"):
            backend.infer(image, bad)
        volumes[name] = backend.infer(image, lm)
    assert np.abs(volumes["torch"] - volumes["onnxruntime"]).max() < 1e-4
    # Unguided backends ignore landmarks.
    from conftest import SMALL_CONFIG

    plain = create_backend("torch", _unguided_checkpoint(tmp_path, SMALL_CONFIG))
    assert not plain.guided
    batch = np.random.default_rng(0).random((2, 3, 192, 192), dtype=np.float32)
    assert np.array_equal(plain.infer(batch, _landmarks(2)), plain.infer(batch))


def _unguided_checkpoint(tmp_path, config):
    torch.manual_seed(1)
    path = tmp_path / "plain.safetensors"
    save_checkpoint(set_instance(VRN(VRNConfig(**config))), path)
    return path


def test_landmark_crops_follow_the_original_rule(sample_image):
    from vrn.runtime.crop import LANDMARK_EXTENT
    from vrn.runtime.pipeline import landmark_crops

    rng = np.random.default_rng(1)
    lm = np.zeros((1, 68, 3))
    lm[0, :, 0] = rng.uniform(200, 260, 68)
    lm[0, :, 1] = rng.uniform(100, 190, 68)
    lm[0, :, 2] = rng.uniform(-20, 20, 68)
    matrices, crops, in_crop = landmark_crops(sample_image, lm, 192)
    assert crops.shape == (1, 192, 192, 3) and crops.dtype == np.uint8
    pts = in_crop[0]
    np.testing.assert_allclose(pts[:, :2].mean(0), [95.5, 95.5], atol=1e-4)
    extent = np.sqrt(np.prod(pts[:, :2].max(0) - pts[:, :2].min(0)))
    assert abs(extent - LANDMARK_EXTENT) < 1e-3
    scale = matrices[0][0, 0]
    np.testing.assert_allclose(pts[:, 2], lm[0, :, 2] * scale, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 68, 3\)"):
        landmark_crops(sample_image, lm[..., :2], 192)
    lm[0, 3, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        landmark_crops(sample_image, lm, 192)


def test_pipeline_crops_the_bundled_photo_from_its_landmarks(sample_image, tmp_path):
    from vrn.runtime import Reconstructor

    torch.manual_seed(0)
    model = build_model("VRNLandmarkGuided", {**SMALL, "input_size": 192}, bn_mode="instance")
    path = tmp_path / "g.safetensors"
    save_checkpoint(model.eval(), path)
    result = Reconstructor(path, backend="torch")(sample_image)
    face = result.faces[0]
    assert face.landmarks.shape == (68, 3)
    # The astronaut's face: landmarks inside the detection box, the crop centred on them.
    box = face.box
    inside = ((face.landmarks[:, 0] > box.x - 0.1 * box.w)
              & (face.landmarks[:, 0] < box.x + 1.1 * box.w)
              & (face.landmarks[:, 1] > box.y) & (face.landmarks[:, 1] < box.y + 1.2 * box.h))
    assert inside.mean() > 0.95
    centre = face.photo_to_crop @ np.append(face.landmarks[:, :2].mean(0), 1.0)
    np.testing.assert_allclose(centre, [95.5, 95.5], atol=1e-3)
    assert "landmarks" in result.timings_ms


def test_guided_training_from_unguided_weights(tmp_path):
    from vrn.train.loop import Guidance, TrainConfig, train

    tiny = VRNConfig(features=16, num_stacks=1, hourglass_depth=1, residuals_a=1,
                     residuals_b=1, residuals_b_innermost=1, out_depth=8, input_size=32)
    torch.manual_seed(0)
    save_checkpoint(set_instance(VRN(tiny)), tmp_path / "plain.safetensors")
    config = TrainConfig(architecture="VRNLandmarkGuided", model=tiny, epochs=3, batch_size=2,
                         lr=1e-3, save_every=1000, guidance=Guidance(stage=0.0),
                         init_weights=str(tmp_path / "plain.safetensors"))
    losses = []
    result = train(disk_samples(), config, tmp_path / "run", progress=False,
                   log=lambda step, loss: losses.append(loss))
    assert result["steps"] == 6 and all(np.isfinite(losses))
    model = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert model.architecture == "VRNLandmarkGuided"
    assert float(model.guide.weight.detach().abs().sum()) > 0  # the guidance learned something
    with open(tmp_path / "run" / "log.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    # The slab prior's fitted buffers come from the package's default model.
    from vrn.model.weights import load_model

    default = load_model()
    if default.info.architecture == "VRNLandmarkGuided":
        for name in ("depth.points", "prior.reference_pinv", "prior.neighbours"):
            np.testing.assert_allclose(model.state_dict()[name].numpy(),
                                       default.state_dict()[name].numpy())


def set_instance(model):
    from vrn.model import set_bn_mode

    return set_bn_mode(model, "instance").eval()


def test_guidance_noise_and_augmented_depth():
    from vrn.train.loop import Augmentation, Guidance, augment_sample

    rng = np.random.default_rng(0)
    lm = np.stack([np.linspace(60, 130, 68), np.linspace(70, 140, 68),
                   np.linspace(-10, 10, 68)], 1).astype(np.float32)
    noisy = Guidance(stage=0.0).noisy(lm, rng)
    err = np.linalg.norm(noisy[:, :2] - lm[:, :2], axis=1).mean()
    assert noisy.shape == (68, 3) and 1.0 < err < 8.0
    with pytest.raises(ValueError):
        Guidance(stage=1.5)
    image = np.zeros((192, 192, 3), np.uint8)
    runs = np.zeros((1, 2, 192, 192), np.uint8)
    aug = Augmentation(rotation=0, translation=0, scale=(1.2, 1.2), flip=0.0,
                       color=(1.0, 1.0))
    _, _, moved = augment_sample(image, runs, lm, aug, rng, depth=200)
    np.testing.assert_allclose(moved[:, 2], 1.2 * lm[:, 2], rtol=1e-5)
