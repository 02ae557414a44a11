"""BFM loading, the AFLW2000-3D / 300W-LP reader and the synthetic face generator."""

from __future__ import annotations

import numpy as np
import pytest

from fake_bfm import GRID, landmark_indices, write_aflw_sample, write_bfm
from vrn.data.bfm import BFMNotFoundError, load_bfm, pose_vertices, rotation_matrix


@pytest.fixture(scope="module")
def fake_bfm(tmp_path_factory):
    basis, face = write_bfm(tmp_path_factory.mktemp("bfm"))
    return load_bfm(basis, face)


@pytest.mark.parametrize("wheel", [False, True])
def test_load_bfm_folder_and_wheel(tmp_path, wheel):
    basis, face = write_bfm(tmp_path, wheel=wheel)
    bfm = load_bfm(basis, face)
    assert bfm.num_vertices == GRID * GRID
    assert bfm.shape_basis.shape == (GRID * GRID, 3, 40)
    assert bfm.expression_basis.shape == (GRID * GRID, 3, 10)
    np.testing.assert_array_equal(bfm.landmarks, landmark_indices())
    assert bfm.shape_std.shape == (40,) and bfm.expression_std.shape == (10,)
    # Indices into the full basis select the face vertices (the first EXTRA are not).
    assert bfm.mean[:, 2].max() > 0
    # Triangles face the camera (+z) in the model frame.
    t = bfm.mean[bfm.triangles]
    nz = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])[:, 2]
    assert (nz > 0).mean() > 0.9


def test_load_bfm_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("VRN_BFM_FACE_DIR", raising=False)
    basis, face = write_bfm(tmp_path)
    with pytest.raises(BFMNotFoundError, match="face region"):
        load_bfm(basis, None)
    (basis / "u_exp.npy").unlink()
    with pytest.raises(BFMNotFoundError, match="u_exp.npy"):
        load_bfm(basis, face)
    with pytest.raises(BFMNotFoundError, match="not found"):
        load_bfm(tmp_path / "nowhere", face)


def test_vertices_with_parameters(fake_bfm):
    mean = fake_bfm.vertices()
    shape = np.zeros(199)
    shape[3] = 2.0
    moved = fake_bfm.vertices(shape, np.zeros(29))
    np.testing.assert_allclose(moved - mean, 2.0 * fake_bfm.shape_basis[:, :, 3], rtol=1e-6)


def test_pose_convention():
    r = rotation_matrix(0.3, -0.7, 0.2)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(r), 1.0)
    v = np.array([[10.0, 20.0, 5.0]])
    out = pose_vertices(v, [0, 0, 0, 100, 50, 7, 2.0], image_height=300)
    # X = s V + t = (120, 90, 17) -> x = X - 1, y = h - Y, z = Z
    np.testing.assert_allclose(out, [[119.0, 210.0, 17.0]])
    with pytest.raises(ValueError, match="7 values"):
        pose_vertices(v, [0, 0, 0], 10)


def test_read_fit_and_errors(tmp_path):
    from scipy.io import savemat

    from vrn.data.aflw import AnnotationError, read_fit

    path = write_aflw_sample(tmp_path).with_suffix(".mat")
    fit = read_fit(path)
    assert fit["shape"].shape == (199,) and fit["pose"].shape == (7,)
    savemat(str(tmp_path / "bad.mat"), {"Shape_Para": np.zeros((199, 1))})
    with pytest.raises(AnnotationError, match="Exp_Para"):
        read_fit(tmp_path / "bad.mat")


def test_aflw_reader_on_synthetic_mat(tmp_path, fake_bfm):
    from vrn.data.aflw import AFLWFolder
    from vrn.runtime.crop import points_to_crop
    from vrn.data.voxelize import volume_from_runs

    write_aflw_sample(tmp_path)
    data = AFLWFolder(tmp_path, fake_bfm)
    assert len(data) == 1
    rec = data.record(0)
    assert rec.image.shape == (200, 200, 3)
    # Pose_Para places the face near (tx - 1, h - ty) = (99, 105).
    centre = rec.vertices[:, :2].mean(0)
    assert np.allclose(centre, [99, 105], atol=15)
    crop, runs, landmarks = data[0]
    assert crop.shape == (192, 192, 3) and runs.shape == (3, 2, 192, 192)
    assert landmarks.shape == (68, 3)
    # The crop rule centres the landmarks and gives them an extent of 90 crop pixels.
    lm = points_to_crop(rec.landmarks, rec.photo_to_crop)
    np.testing.assert_allclose(lm[:, :2].mean(0), [95.5, 95.5], atol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.prod(np.ptp(lm[:, :2], 0))), 90.0, rtol=1e-6)
    vol = volume_from_runs(runs)
    assert vol.any() and vol[:, 96, 96].any()


def test_aflw_folder_errors(tmp_path, fake_bfm):
    from vrn.data.aflw import AFLWFolder

    with pytest.raises(FileNotFoundError, match="matching .mat"):
        AFLWFolder(tmp_path, fake_bfm)


def test_synthetic_faces_reproducible_and_cached(tmp_path, fake_bfm):
    from vrn.data.synthetic import CachedFaces, SyntheticFaces, write_cache

    faces = SyntheticFaces(fake_bfm, seed=3)
    a, b = faces[5], faces[5]
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.runs, b.runs)
    assert a.image.shape == (192, 192, 3) and a.image.dtype == np.uint8
    assert a.runs.dtype == np.uint8 and a.runs.shape == (3, 2, 192, 192) and a.runs.max() > 0
    assert not np.array_equal(faces[6].image, a.image)
    assert not np.array_equal(SyntheticFaces(fake_bfm, seed=4)[5].image, a.image)
    # The face is rendered where its target volume is.
    covered = a.runs[0, 1] > 0
    assert covered.sum() > 500
    write_cache(faces, tmp_path, start=0, count=5, shard_size=2, progress=False)
    cached = CachedFaces(tmp_path)
    assert len(cached) == 5
    image, runs, landmarks = cached[4]
    np.testing.assert_array_equal(image, faces[4].image)
    np.testing.assert_array_equal(runs, faces[4].runs)
    np.testing.assert_allclose(landmarks, faces[4].landmarks)


def test_real_bfm_rebuilds_aflw_landmarks(shared_data):
    """With the real BFM, the rebuilt 68 landmarks match pt3d_68 (SPEC: about 1-2 px)."""
    from vrn.data.aflw import AFLWFolder

    try:
        bfm = load_bfm(None, shared_data / "bfm")
    except BFMNotFoundError as exc:
        pytest.skip(str(exc))
    data = AFLWFolder(shared_data / "aflw2000-sample", bfm)
    errors = []
    for i in range(len(data)):
        rec = data.record(i)
        errors.append(np.abs(rec.landmarks[:, :2] - rec.annotated_landmarks[:, :2]).mean())
    assert np.mean(errors) < 2.0
