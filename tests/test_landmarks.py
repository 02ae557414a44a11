"""The 68-landmark stage: 3DDFA_V2's MobileNet regressor (vrn.model.landmark_net), its
ONNX export and the runtime stage (vrn.runtime.landmarks)."""

import importlib.util
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from vrn.errors import ImageError, WeightsError
from vrn.model.landmark_net import (NUM_LANDMARKS, MobileNetV1,
                                    default_landmark_weights, expected_tensors,
                                    fuse_batch_norms, landmarks_from_params,
                                    load_landmark_regressor)
from vrn.runtime.detect import FaceBox
from vrn.runtime.landmarks import (LandmarkStage, box_to_crop_box, crop_120, crop_to_photo,
                                   landmarks_to_crop_box, to_network_input)

ROOT = Path(__file__).resolve().parents[1]
ASTRONAUT_FACE = FaceBox(177, 66, 95, 95)  # the face in vrn/assets/astronaut.jpg, by hand


@pytest.fixture(scope="module")
def regressor():
    return load_landmark_regressor()


@pytest.fixture(scope="module")
def torch_stage():
    return LandmarkStage("torch")


@pytest.fixture(scope="module")
def ort_stage(tmp_path_factory):
    return LandmarkStage("onnxruntime", cache_dir=tmp_path_factory.mktemp("cache"))


def nme_2d(pred, gt):
    """3DDFA_V2's NME: mean 2D error / sqrt(area of the ground truth's bounding box)."""
    extent = gt[:, :2].max(axis=0) - gt[:, :2].min(axis=0)
    return np.linalg.norm(pred[:, :2] - gt[:, :2], axis=1).mean() / np.sqrt(extent.prod())


# -- parameters to landmarks -------------------------------------------------------------

def test_identity_pose_and_zero_coefficients_give_the_mean_keypoints(regressor):
    params = torch.zeros(1, 62)
    params[0, :12] = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0.0])
    points = landmarks_from_params(params, regressor.u, regressor.w_shp, regressor.w_exp)
    assert points.shape == (1, NUM_LANDMARKS, 3)
    assert torch.equal(points[0], regressor.u.reshape(NUM_LANDMARKS, 3))


def test_landmarks_from_params_matches_3ddfa_v2_formula():
    """3DDFA_V2: R @ (u + W_shp a + W_exp b).reshape(3, -1, order='F') + t, in float64."""
    rng = np.random.default_rng(0)
    u, w_shp, w_exp = rng.normal(size=204), rng.normal(size=(204, 40)), rng.normal(size=(204, 10))
    params = rng.normal(size=(3, 62))
    got = landmarks_from_params(*(torch.from_numpy(a) for a in (params, u, w_shp, w_exp)))
    for p, points in zip(params, got.numpy(), strict=True):
        pose = p[:12].reshape(3, 4)
        verts = (u + w_shp @ p[12:52] + w_exp @ p[52:62]).reshape(3, -1, order="F")
        np.testing.assert_allclose(points.T, pose[:, :3] @ verts + pose[:, 3:], rtol=1e-10)


def test_zero_network_output_gives_the_whitening_mean(regressor):
    model = load_landmark_regressor()
    with torch.no_grad():
        model.net.fc.weight.zero_()
        model.net.fc.bias.zero_()
        x = torch.randn(2, 3, 120, 120)
        params = model.params(x)
        points = model(x)
    assert torch.equal(params, regressor.param_mean.expand(2, 62))
    want = landmarks_from_params(regressor.param_mean[None], regressor.u, regressor.w_shp,
                                 regressor.w_exp)
    torch.testing.assert_close(points, want.expand(2, -1, -1))


def test_first_layer_matches_numpy(regressor):
    """conv1 (3x3, stride 2, padding 1) -> batch norm -> ReLU, written out in numpy."""
    x = np.random.default_rng(1).normal(size=(1, 3, 120, 120)).astype(np.float32)
    net = regressor.net
    w = net.conv1.weight.detach().double().numpy()  # (16, 3, 3, 3)
    padded = np.pad(x[0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    patches = np.stack([padded[:, i:i + 120:2, j:j + 120:2]
                        for i in range(3) for j in range(3)], axis=1)  # (3, 9, 60, 60)
    conv = np.einsum("ckhw,ock->ohw", patches, w.reshape(16, 3, 9))
    bn = net.bn1
    scale = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.double().numpy() + bn.eps)
    shift = bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * scale
    want = np.maximum(conv * scale[:, None, None] + shift[:, None, None], 0)
    with torch.no_grad():
        got = torch.relu(net.bn1(net.conv1(torch.from_numpy(x))))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_architecture_shapes_and_fused_batch_norms(regressor):
    net = MobileNetV1()
    assert net(torch.zeros(2, 3, 120, 120)).shape == (2, 62)
    assert expected_tensors()["net.fc.weight"] == (62, 512)
    x = torch.randn(3, 3, 120, 120)
    with torch.no_grad():
        torch.testing.assert_close(fuse_batch_norms(regressor)(x), regressor(x), atol=2e-3,
                                   rtol=0)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in regressor.modules())


# -- weights file --------------------------------------------------------------------------

def _save(path, tensors, metadata):
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def shipped():
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = default_landmark_weights()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def test_shipped_weights_metadata(shipped):
    _, meta = shipped
    assert meta["format"] == "vrn-edge-landmarks/1"
    assert "1b6c6760" in meta["source"] and meta["license"].startswith("MIT")
    assert "academic" in meta["bfm_note"] and "300W-LP" in meta["training_data"]
    folder = default_landmark_weights().parent
    assert (folder / "LICENSE.3ddfa_v2").is_file()
    assert "## 3DDFA_V2 landmark regressor" in (folder / "NOTICE.md").read_text()


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "format", "shape",
                                  "absent", "extra", "nan"])
def test_bad_weights_file_gives_a_clear_error(tmp_path, shipped, case):
    tensors, meta = dict(shipped[0]), dict(shipped[1])
    path = tmp_path / "bad.safetensors"
    if case == "garbage":
        path.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    elif case == "truncated":
        data = default_landmark_weights().read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif case != "missing":
        if case == "format":
            meta["format"] = "vrn-edge-checkpoint/1"
        elif case == "shape":
            tensors["net.fc.weight"] = torch.zeros(10, 512)
        elif case == "absent":
            del tensors["u"]
        elif case == "extra":
            tensors["payload"] = torch.zeros(3)
        elif case == "nan":
            tensors["param_std"] = torch.full((62,), float("nan"))
        _save(path, tensors, meta)
    message = {"missing": "not found", "garbage": "not a readable",
               "truncated": "not a readable|truncated", "format": "not a vrn-edge landmark",
               "shape": "'net.fc.weight' has shape",
               "absent": "missing tensor 'u'", "extra": "unexpected tensor 'payload'",
               "nan": "NaN"}[case]
    with pytest.raises(WeightsError, match=message) as info:
        load_landmark_regressor(path)
    assert str(path) in str(info.value)
    with pytest.raises(WeightsError):
        LandmarkStage("torch", weights=path)


def _convert_tool():
    spec = importlib.util.spec_from_file_location("convert_3ddfa_v2",
                                                  ROOT / "tools" / "convert_3ddfa_v2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whitening_reader_refuses_code(tmp_path):
    tool = _convert_tool()
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"mean": np.arange(62, dtype=np.float32),
                                   "std": np.ones(62, np.float32)}, protocol=3))
    mean, std = tool.read_whitening(good)
    assert mean.dtype == np.float32 and mean[5] == 5 and (std == 1).all()
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'echo hacked'\ntR.")  # os.system('echo hacked')
    from vrn.errors import UnsafePickleError

    with pytest.raises(UnsafePickleError, match="refusing to load global os.system"):
        tool.read_whitening(evil)


def test_shipped_weights_match_the_source(shared_data, regressor):
    source = shared_data / "models" / "3ddfa_v2"
    tool = _convert_tool()
    mean, std = tool.read_whitening(source / tool.WHITENING)
    np.testing.assert_array_equal(regressor.param_mean.numpy(), mean)
    np.testing.assert_array_equal(regressor.param_std.numpy(), std)
    network = tool.read_network(source / tool.CHECKPOINT)
    state = regressor.state_dict()
    for name, tensor in network.items():  # fp16 storage: relative error ~5e-4
        torch.testing.assert_close(state[name], tensor, rtol=1e-3, atol=1e-6)


# -- geometry ------------------------------------------------------------------------------

def test_crop_boxes():
    box = FaceBox(100, 50, 80, 120)
    x0, y0, x1, y1 = box_to_crop_box(box, shift=0.14, scale=1.58)
    assert x1 - x0 == y1 - y0 == int(1.58 * 100)
    assert (x0 + x1) / 2 == 140 and (y0 + y1) / 2 == 110 + 14
    points = np.array([[10.0, 20, 5], [50, 40, -3], [30, 100, 0]])
    x0, y0, x1, y1 = landmarks_to_crop_box(points)
    assert (x0 + x1) / 2 == 30 and (y0 + y1) / 2 == 60
    assert np.isclose(x1 - x0, 80 * np.sqrt(2)) and np.isclose(y1 - y0, 80 * np.sqrt(2))


def test_crop_120_is_exact_at_unit_scale_and_zero_outside():
    image = np.random.default_rng(2).integers(0, 256, (200, 150, 3), dtype=np.uint8)
    np.testing.assert_array_equal(crop_120(image, (10, 20, 130, 140)), image[20:140, 10:130])
    crop = crop_120(image, (-60, -60, 60, 60))
    assert (crop[:59, :] == 0).all() and (crop[:, :59] == 0).all()
    np.testing.assert_array_equal(crop[61:, 61:], image[1:60, 1:60])
    big = crop_120(image, (0, 0, 240, 240))  # 2x: the mean of each 2x2 block
    expect = image[:120, :120].reshape(60, 2, 60, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(big[:60, :60].astype(float) - expect).max() <= 1.0


def test_network_input_and_crop_to_photo():
    crops = np.zeros((1, 120, 120, 3), np.uint8)
    crops[..., 0] = 255  # red
    x = to_network_input(crops)
    assert x.shape == (1, 3, 120, 120) and x.dtype == np.float32
    assert np.allclose(x[0, 2], 127.5 / 128) and np.allclose(x[0, :2], -127.5 / 128)  # BGR
    # Crop frame: 1-based x, y up. Crop (1, 120) is the top-left pixel centre.
    points = np.array([[[1.0, 120.0, 1.0], [121.0, 0.0, 11.0]]])
    photo = crop_to_photo(points, np.array([[10.0, 20.0, 250.0, 260.0]]))
    np.testing.assert_allclose(photo[0], [[10, 20, 0], [250, 260, 20]])


# -- the stage -----------------------------------------------------------------------------

def test_astronaut_landmarks_lie_on_the_face(torch_stage, sample_image):
    points = torch_stage(sample_image, [ASTRONAUT_FACE])
    assert points.shape == (1, 68, 3) and points.dtype == np.float32
    p = points[0]
    b = ASTRONAUT_FACE
    margin = 0.15 * b.w
    assert (p[:, 0] > b.x - margin).all() and (p[:, 0] < b.x + b.w + margin).all()
    assert (p[:, 1] > b.y - margin).all() and (p[:, 1] < b.y + b.h + 2 * margin).all()
    right_eye, left_eye = p[36:42].mean(axis=0), p[42:48].mean(axis=0)
    nose, mouth, chin = p[30], p[48:68].mean(axis=0), p[8]
    assert right_eye[0] < nose[0] < left_eye[0]  # the subject's right eye is on the left
    assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1] < chin[1]
    assert nose[2] > p[0, 2] and nose[2] > p[16, 2]  # z toward the camera
    refined = LandmarkStage("torch", refine=True)(sample_image, [ASTRONAUT_FACE])
    assert np.abs(refined - points)[..., :2].max() < 0.1 * b.w


def test_stage_inputs(torch_stage, sample_image):
    assert torch_stage(sample_image, []).shape == (0, 68, 3)
    with pytest.raises(ImageError):
        torch_stage(sample_image[..., 0], [ASTRONAUT_FACE])
    with pytest.raises(ImageError):
        torch_stage(sample_image.astype(np.float32), [ASTRONAUT_FACE])
    with pytest.raises(ValueError, match="unknown landmark backend"):
        LandmarkStage("tensorflow")


def test_faces_are_batched_and_independent(torch_stage, sample_image):
    other = FaceBox(20, 300, 120, 120)
    both = torch_stage(sample_image, [ASTRONAUT_FACE, other])
    one = torch_stage(sample_image, [ASTRONAUT_FACE])
    np.testing.assert_allclose(both[:1], one, atol=1e-3)


def test_torch_and_onnxruntime_agree(torch_stage, ort_stage, regressor, sample_image):
    boxes = [ASTRONAUT_FACE, FaceBox(150, 40, 150, 150), FaceBox(-30, -30, 100, 100)]
    a, b = torch_stage(sample_image, boxes), ort_stage(sample_image, boxes)
    assert np.abs(a - b).max() < 0.05  # photo pixels
    # The graph alone, at several batch sizes, against the unfused PyTorch model.
    x = np.random.default_rng(3).normal(size=(5, 3, 120, 120)).astype(np.float32)
    with torch.no_grad():
        want = regressor(torch.from_numpy(x)).numpy()
    for n in (1, 5):
        got = ort_stage._run(x[:n])
        assert got.shape == (n, 68, 3)
        assert np.abs(got - want[:n]).max() < 0.02  # crop pixels


def test_onnx_export_is_cached(ort_stage, tmp_path):
    path = ort_stage._run.path
    assert path.is_file() and path.name.startswith("landmarks-")
    stamp = path.stat().st_mtime_ns
    again = LandmarkStage("onnxruntime", cache_dir=path.parent.parent)
    assert again._run.path == path and path.stat().st_mtime_ns == stamp
    import onnx

    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert len(props["vrn_landmarks_weights_sha256"]) == 64


def test_concurrent_calls(ort_stage, torch_stage, sample_image):
    want = ort_stage(sample_image, [ASTRONAUT_FACE])
    results, errors = [], []

    def work(stage):
        try:
            for _ in range(5):
                results.append(stage(sample_image, [ASTRONAUT_FACE]))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,))
               for s in (ort_stage, ort_stage, torch_stage, torch_stage)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 20
    assert all(np.abs(r - want).max() < 0.05 for r in results)


def test_aflw_sample_nme(shared_data, torch_stage):
    """2D NME on the AFLW2000-3D sample with crops from the ground-truth landmarks (the
    reference: 3.40% over 16 images)."""
    from scipy.io import loadmat

    from vrn.runtime import load_image

    errors = []
    for mat in sorted((shared_data / "aflw2000-sample").glob("*.mat")):
        gt = loadmat(str(mat))["pt3d_68"].T.astype(np.float64)
        image = load_image(mat.with_suffix(".jpg"))
        pred = torch_stage.from_crop_boxes(image, landmarks_to_crop_box(gt)[None])[0]
        errors.append(nme_2d(pred, gt))
    assert len(errors) == 8
    assert np.mean(errors) < 0.05 and max(errors) < 0.08


def test_ground_truth_aflw_parameters_give_the_annotated_landmarks(shared_data, regressor):
    """AFLW2000-3D's own BFM fit (pose, first 40 shape and 10 expression parameters) as
    3DDFA_V2-style parameters: the parameter-to-landmark step lands on ``pt3d_68``."""
    from scipy.io import loadmat

    from vrn.data.bfm import rotation_matrix
    from vrn.runtime import load_image

    errors = []
    for mat in sorted((shared_data / "aflw2000-sample").glob("*.mat")):
        fit = loadmat(str(mat))
        pose = fit["Pose_Para"].ravel().astype(np.float64)
        s_r = pose[6] * rotation_matrix(*pose[:3])
        params = np.concatenate([np.hstack([s_r, pose[3:6, None]]).ravel(),
                                 fit["Shape_Para"].ravel()[:40], fit["Exp_Para"].ravel()[:10]])
        points = landmarks_from_params(torch.from_numpy(params[None]).float(), regressor.u,
                                       regressor.w_shp, regressor.w_exp)[0].numpy()
        gt = fit["pt3d_68"][:2].T                     # 1-based image pixels, y down
        height = load_image(mat.with_suffix(".jpg")).shape[0]
        predicted = np.stack([points[:, 0], height + 1 - points[:, 1]], axis=1)  # y up -> down
        errors.append(np.linalg.norm(predicted - gt, axis=1).mean())
    assert len(errors) == 8
    assert np.mean(errors) < 2.0 and max(errors) < 3.0, errors  # measured: 1.1 px, 1.5 px
