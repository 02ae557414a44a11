"""End-to-end ``vrn-reconstruct`` on real photos (CPU), and its handling of bad input."""

import cv2
import numpy as np
import pytest
import trimesh

import vrn
from vrn.cli.reconstruct import main
from vrn.errors import NoFaceError, WeightsError
from vrn.runtime import Reconstructor, sample_image_path
from vrn.runtime.pipeline import STAGES


def test_cli_on_the_sample_photo(tmp_path, small_checkpoint, capsys):
    rc = main([str(sample_image_path()), "-o", str(tmp_path), "--weights",
               str(small_checkpoint), "--formats", "obj,ply,glb", "--preview"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "face 0:" in out
    mesh = trimesh.load(tmp_path / "astronaut.obj", process=False)
    assert len(mesh.faces) > 100
    # Mesh in photo pixels around the detected face (x 177-272, y 66-161 in the photo).
    centre = mesh.vertices[:, :2].mean(0)
    assert 150 < centre[0] < 300 and 60 < centre[1] < 220
    assert (tmp_path / "astronaut.ply").stat().st_size > 0
    assert (tmp_path / "astronaut.glb").stat().st_size > 0
    obj_line = next(line for line in (tmp_path / "astronaut.obj").read_text().splitlines()
                    if line.startswith("v "))
    assert len(obj_line.split()) == 7  # v x y z r g b
    preview = cv2.imread(str(tmp_path / "astronaut_preview.png"))
    assert preview.shape == (512, 1024, 3)
    photo = cv2.imread(str(sample_image_path()))
    assert np.abs(preview[:, :512].astype(int) - photo).mean() > 1  # something was drawn


def test_random_default_weights_are_announced(tmp_path, capsys, monkeypatch):
    import vrn.model.weights as weights

    monkeypatch.setattr(weights, "default_weights_path", lambda: None)
    monkeypatch.setattr(Reconstructor, "__call__",
                        lambda self, image, boxes=None: vrn.runtime.FrameResult([], {}))
    rc = main(["--sample", "-o", str(tmp_path)])
    assert rc == 1
    assert "NOT trained" in capsys.readouterr().out


def test_bad_inputs_are_reported_and_others_complete(tmp_path, small_checkpoint, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "broken.jpg").write_text("not an image")
    cv2.imwrite(str(src / "tiny.png"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(src / "noface.png"), np.full((200, 200, 3), 127, np.uint8))
    photo = cv2.imread(str(sample_image_path()))
    cv2.imwrite(str(src / "gray.png"), cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY))
    out = tmp_path / "out"
    rc = main([str(src), str(tmp_path / "missing.jpg"), "-o", str(out), "--weights",
               str(small_checkpoint)])
    err = capsys.readouterr().err
    assert rc == 0
    assert (out / "gray.obj").is_file()
    assert "broken.jpg: not a readable image" in err
    assert "tiny.png: image is 8x8" in err
    assert "noface.png: no face found" in err
    assert "missing.jpg: file not found" in err


def test_no_image_produces_a_mesh(tmp_path, small_checkpoint):
    cv2.imwrite(str(tmp_path / "flat.png"), np.full((100, 100, 3), 127, np.uint8))
    assert main([str(tmp_path / "flat.png"), "-o", str(tmp_path / "o"), "--weights",
                 str(small_checkpoint)]) == 1


def test_missing_weights_is_one_clear_error(tmp_path, capsys):
    rc = main(["--sample", "-o", str(tmp_path), "--weights", str(tmp_path / "nope.t7")])
    assert rc == 2
    assert "nope.t7: weights file not found" in capsys.readouterr().err


def test_python_api(small_checkpoint, sample_image):
    faces = vrn.reconstruct(sample_image, weights=small_checkpoint)
    assert len(faces) == 1
    mesh = faces[0].mesh
    assert mesh.vertices.dtype == np.float32 and mesh.vertices.shape[1] == 3
    assert mesh.faces.dtype == np.int32 and mesh.colors.dtype == np.uint8
    assert faces[0].crop.shape == (192, 192, 3)
    with pytest.raises(NoFaceError):
        vrn.reconstruct(np.full((120, 120, 3), 90, np.uint8), weights=small_checkpoint)
    with pytest.raises(WeightsError):
        vrn.reconstruct(sample_image, weights="/nonexistent/w.safetensors")


def test_multiple_faces_go_through_as_one_batch(sample_image, small_checkpoint):
    from vrn.runtime.detect import FaceBox

    calls = []
    rec = Reconstructor(small_checkpoint, all_faces=True)
    infer = rec.backend.infer
    rec.backend.infer = lambda batch, landmarks=None: (calls.append(batch.shape)
                                                        or infer(batch, landmarks))
    boxes = [FaceBox(177, 66, 95, 95), FaceBox(300, 300, 80, 80)]
    result = rec(sample_image, boxes=boxes)
    assert calls == [(2, 3, 192, 192)]
    assert len(result.faces) == 2
    assert set(result.timings_ms) == set(STAGES)
