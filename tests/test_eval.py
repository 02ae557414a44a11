"""The paper's NME, its alignments, and vrn-eval on a synthetic AFLW-format folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fake_bfm import grid_mesh, write_aflw_sample, write_bfm
from vrn.eval.nme import (icp_rigid, kabsch, reconstruction_nme, surface_distances)


def _plane(n=41, half=50.0):
    vertices, tris = grid_mesh(n, half_width=half)
    vertices[:, 2] = 0.0
    vertices[:, :2] += 100.0
    return vertices, tris


def test_surface_distance_to_one_triangle():
    tri_v = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    tri_f = np.array([[0, 1, 2]])
    points = np.array([[0.2, 0.2, 3.0],    # above the interior
                       [2.0, 0.0, 0.0],    # beyond vertex 1
                       [0.5, -1.0, 0.0],   # beside edge 0-1
                       [1.0, 1.0, 0.0]])   # beside the hypotenuse
    d = surface_distances(points, tri_v, tri_f)
    np.testing.assert_allclose(d, [3.0, 1.0, 1.0, np.sqrt(0.5)], atol=1e-12)


def test_kabsch_and_icp_recover_a_rigid_motion():
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(500, 3)) * [30, 20, 10]
    angle = np.deg2rad(7)
    r = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                  [0, 0, 1]])
    moved = cloud @ r.T + [1.0, -2.0, 0.5]
    r_fit, t_fit = kabsch(cloud, moved)
    np.testing.assert_allclose(r_fit, r, atol=1e-10)
    r_icp, t_icp = icp_rigid(cloud, moved, iterations=50)
    np.testing.assert_allclose(cloud @ r_icp.T + t_icp, moved, atol=1e-3)


def test_nme_known_answer_tilted_plane():
    """A plane tilted by slope c about the GT plane's middle: after depth alignment every
    GT vertex is |c (x - x_mid)| / sqrt(1 + c^2) away, mean c L / (4 sqrt(1 + c^2));
    ICP removes the tilt."""
    gt, tris = _plane()
    landmarks = np.zeros((68, 3))
    landmarks[36], landmarks[45] = [80, 90, 0], [120, 90, 0]  # interocular 40
    c = 0.1
    pred = gt.copy()
    pred[:, 2] = c * (pred[:, 0] - 100.0) + 17.0  # arbitrary depth offset
    result = reconstruction_nme(gt, tris, landmarks, pred, tris, (200, 200))
    length = 100.0
    expected = c * length / (4 * np.sqrt(1 + c ** 2)) / 40.0
    assert result.interocular == pytest.approx(40.0)
    assert result.z_shift == pytest.approx(-17.0, abs=0.2)
    assert result.depth_aligned == pytest.approx(expected, rel=0.03)
    assert result.icp < 0.05 * expected


def test_nme_of_the_ground_truth_is_zero():
    gt, tris = _plane()
    gt[:, 2] = 0.002 * (gt[:, 0] - 100) ** 2
    landmarks = gt[:68]
    landmarks = landmarks.copy()
    landmarks[36], landmarks[45] = [80, 90, 0], [120, 90, 0]
    result = reconstruction_nme(gt, tris, landmarks, gt + [0, 0, 5.0], tris, (200, 200))
    assert result.depth_aligned < 1e-3 and result.icp < 1e-3


def test_empty_prediction_is_an_error():
    gt, tris = _plane()
    with pytest.raises(ValueError, match="empty"):
        reconstruction_nme(gt, tris, gt[:68], np.zeros((0, 3)), np.zeros((0, 3), int),
                           (200, 200))


def test_vrn_eval_scores_obj_meshes(tmp_path, capsys):
    from vrn.cli.eval import main
    from vrn.data.aflw import AFLWFolder
    from vrn.data.bfm import load_bfm
    from vrn.runtime.mesh import FaceMesh, save_mesh

    basis, face = write_bfm(tmp_path / "bfm")
    data_dir = tmp_path / "data"
    write_aflw_sample(data_dir, "image00001")
    write_aflw_sample(data_dir, "image00002", pose=(0.0, -0.4, 0.1, 90.0, 100.0, 0.0, 1e-3))
    bfm = load_bfm(basis, face)
    folder = AFLWFolder(data_dir, bfm)
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    rec = folder.record(0)  # a perfect mesh for the first image, none for the second
    colors = np.zeros((len(rec.vertices), 3), np.uint8)
    save_mesh(FaceMesh(rec.vertices.astype(np.float32), bfm.triangles, colors),
              meshes / "image00001.obj")
    out_json = tmp_path / "nme.json"
    code = main([str(data_dir), "--meshes", str(meshes), "--bfm", str(basis), "--bfm-face",
                 str(face), "--json", str(out_json)])
    assert code == 0
    text = capsys.readouterr().out
    assert "image00001.jpg" in text and "mean (1/2)" in text
    results = json.loads(out_json.read_text())
    first, second = results["images"]
    assert first["nme"] < 1e-3 and first["nme_icp"] < 1e-3
    # The zero-parameter fit *is* the mean face here, so the baseline is perfect too.
    assert first["baseline_nme"] < 1e-3
    assert second["nme"] is None and "no mesh" in second["error"]
    assert results["failed"] == ["image00002.jpg"]


def test_vrn_eval_without_bfm_fails_cleanly(tmp_path, capsys, monkeypatch):
    from vrn.cli.eval import main

    monkeypatch.delenv("VRN_BFM_FACE_DIR", raising=False)
    assert main([str(tmp_path), "--bfm", str(tmp_path / "none")]) == 1
    assert "vrn-eval:" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"MATLAB 5.0 MAT-file, garbage" + bytes(200)])
def test_one_corrupt_mat_costs_one_row(tmp_path, capsys, content):
    from vrn.cli.eval import main
    from vrn.data.aflw import AFLWFolder
    from vrn.data.bfm import load_bfm
    from vrn.runtime.mesh import FaceMesh, save_mesh

    basis, face = write_bfm(tmp_path / "bfm")
    data_dir = tmp_path / "data"
    write_aflw_sample(data_dir, "image00001")
    write_aflw_sample(data_dir, "image00002")
    bfm = load_bfm(basis, face)
    rec = AFLWFolder(data_dir, bfm).record(1)
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    colors = np.zeros((len(rec.vertices), 3), np.uint8)
    save_mesh(FaceMesh(rec.vertices.astype(np.float32), bfm.triangles, colors),
              meshes / "image00002.obj")
    (data_dir / "image00001.mat").write_bytes(content)
    out_json = tmp_path / "nme.json"
    code = main([str(data_dir), "--meshes", str(meshes), "--bfm", str(basis), "--bfm-face",
                 str(face), "--json", str(out_json)])
    captured = capsys.readouterr()
    assert code == 0
    assert "mean (1/2)" in captured.out and "Traceback" not in captured.err
    assert "error: image00001.jpg:" in captured.err
    results = json.loads(out_json.read_text())
    assert results["failed"] == ["image00001.jpg"]
    assert results["images"][1]["nme"] < 1e-3


def test_dataset_images_get_the_image_limits(tmp_path, monkeypatch):
    """vrn-eval reads the dataset's photos through the one image reader, limits included."""
    from vrn.data.aflw import AFLWFolder
    from vrn.data.bfm import load_bfm
    from vrn.errors import ImageError

    basis, face = write_bfm(tmp_path / "bfm")
    write_aflw_sample(tmp_path / "data", "image00001")
    folder = AFLWFolder(tmp_path / "data", load_bfm(basis, face))
    monkeypatch.setenv("VRN_MAX_PIXELS", "1000")
    with pytest.raises(ImageError, match="image00001.jpg"):
        folder.record(0)
