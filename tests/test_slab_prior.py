"""The face slab prior: in-graph against its NumPy twin, the pose it reads from the
landmarks, and (with ../shared) how close its isosurface alone comes to a real face."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vrn.model.slab_prior import SlabPrior, landmark_rotation, render_slab_prior


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def default_model():
    from vrn.model.weights import load_model

    model = load_model()
    if model.info.architecture != "VRNLandmarkGuided":
        pytest.skip("the default model is not landmark-guided")
    return model


@pytest.fixture(scope="module")
def sample_landmarks(sample_image, default_model):
    """The pipeline's landmarks ``(1, 68, 3)`` for the bundled photo, in crop pixels."""
    from vrn.runtime.pipeline import face_crops

    _, landmarks = face_crops(sample_image, max_faces=1)
    assert landmarks.shape == (1, 68, 3)
    return landmarks


def _rotation(pitch, yaw, roll):
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", [pitch, yaw, roll], degrees=True).as_matrix()


def test_landmark_rotation_recovers_a_known_pose():
    rng = np.random.default_rng(0)
    layout = rng.standard_normal((68, 3)) * [30.0, 35.0, 15.0]
    pinv = torch.from_numpy(np.linalg.pinv(layout - layout.mean(0))).float()
    for angles in [(0, 0, 0), (10, -60, 5), (-20, 75, -15)]:
        rot = _rotation(*angles)
        lm = 1.3 * layout @ rot.T + [96.0, 100.0, 20.0]
        got = landmark_rotation(torch.from_numpy(lm[None]).float(), pinv)[0].numpy()
        np.testing.assert_allclose(got, rot, atol=1e-4)


def test_graph_prior_equals_numpy_prior(default_model, sample_landmarks):
    prior = default_model.prior
    points = default_model.depth.points
    with torch.no_grad():
        graph = prior(torch.from_numpy(sample_landmarks), points).numpy()
    reference = render_slab_prior(sample_landmarks, points.numpy(),
                                  prior.reference_pinv.numpy(), prior.neighbours.numpy(),
                                  size=48)
    assert graph.shape == reference.shape == (1, 200, 48, 48)
    close = np.abs(graph - reference) < 0.05
    # Only voxels whose coverage sits at the 0.5 cut may flip between the twins.
    assert close.mean() > 0.999
    inside = reference > 0
    assert 0.01 < inside.mean() < 0.2  # a face-sized slab, not empty, not everything


def test_prior_moves_with_the_landmarks(default_model, sample_landmarks):
    """Shifting the landmarks by two trunk pixels in x shifts the prior's front surface
    with them (to within a voxel: the frontal map's grid stays put)."""
    prior, points = default_model.prior, default_model.depth.points
    lm = torch.from_numpy(sample_landmarks)
    step = 191 / 47  # one trunk pixel in crop pixels
    with torch.no_grad():
        base = prior(lm, points)[0].numpy()
        moved = prior(lm + torch.tensor([2 * step, 0.0, 0.0]), points)[0].numpy()

    def front(logits):  # (D, H, W) -> (H, W) index of the nearest inside voxel, -1 if none
        inside = logits > 0
        return np.where(inside.any(0), logits.shape[0] - 1 - inside[::-1].argmax(0), -1)

    a, b = front(base)[:, :-2], front(moved)[:, 2:]
    from scipy.ndimage import binary_erosion

    both = binary_erosion((a >= 0) & (b >= 0), iterations=2)  # away from the face's edge
    assert both.sum() > 200
    assert (np.abs(a - b)[both] <= 1).mean() > 0.95


def test_prior_is_finite_for_degenerate_landmarks():
    prior = SlabPrior(12, depth=20, crop=48, front=15)
    points = torch.full((256, 68), 1 / 68.0)
    for lm in (torch.zeros(1, 68, 3), torch.full((1, 68, 3), 1e4)):
        assert torch.isfinite(prior(lm, points)).all()


def test_prior_alone_reconstructs_a_real_face(shared_data, default_model):
    """With the ground-truth landmarks of a near-frontal AFLW2000-3D face, the prior's
    isosurface alone lies within a few percent of the interocular distance of the
    true face (the BFM mean face placed with the true pose scores about 0.011)."""
    from vrn.data.aflw import AFLWFolder
    from vrn.data.bfm import BFMNotFoundError, load_bfm
    from vrn.eval.nme import reconstruction_nme
    from vrn.kernels import marching_cubes, transform_vertices
    from vrn.runtime.crop import invert_affine
    from vrn.runtime.pipeline import landmark_crops

    try:
        bfm = load_bfm(None, shared_data / "bfm")
    except BFMNotFoundError as exc:
        pytest.skip(str(exc))
    rec = AFLWFolder(shared_data / "aflw2000-sample", bfm).record(0)
    matrices, _, in_crop = landmark_crops(rec.image, rec.landmarks[None])
    prior = default_model.prior
    logits = render_slab_prior(in_crop, default_model.depth.points.numpy(),
                               prior.reference_pinv.numpy(), prior.neighbours.numpy(),
                               size=192)[0]
    vertices, faces = marching_cubes(1 / (1 + np.exp(-logits)), level=0.5)
    vertices = transform_vertices(vertices, invert_affine(matrices[0]), z_scale=0.5)
    score = reconstruction_nme(rec.vertices, bfm.triangles, rec.landmarks,
                               np.asarray(vertices, np.float64), np.asarray(faces, np.int64),
                               rec.image.shape[:2], icp_iterations=10)
    assert score.icp < 0.025
