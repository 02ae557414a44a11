"""End-to-end ``vrn-reconstruct`` on real photos (CPU), and its handling of bad input."""

import cv2
import numpy as np
import pytest
import trimesh

import vrn
from vrn.cli.reconstruct import main
from vrn.errors import NoFaceError, WeightsError
from vrn.runtime import Reconstructor, sample_image_path


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
    assert rc == 1
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
    assert set(result.timings_ms) == {"detect", "landmarks", "crop", "infer", "isosurface",
                                      "colour"}


def test_the_two_halves_make_the_whole(small_checkpoint, sample_image):
    """``mesh_faces(infer_faces(image))`` is ``rec(image)``; a photo without a face goes
    through both halves as a frame without faces."""
    rec = Reconstructor(small_checkpoint)
    whole = rec(sample_image)
    inferred = rec.infer_faces(sample_image)
    assert len(inferred.boxes) == 1 and inferred.landmarks.shape == (1, 68, 3)
    assert inferred.crops.shape == (1, 192, 192, 3) and inferred.batch.shape == (1, 3, 192, 192)
    assert set(inferred.timer.ms) == {"detect", "landmarks", "crop", "infer"}
    halves = rec.mesh_faces(inferred)
    assert set(halves.timings_ms) == set(whole.timings_ms)
    (a,), (b,) = whole.faces, halves.faces
    assert a.box == b.box and len(a.mesh.faces) > 100
    for x, y in [(a.landmarks, b.landmarks), (a.photo_to_crop, b.photo_to_crop),
                 (a.crop, b.crop), (a.mesh.vertices, b.mesh.vertices),
                 (a.mesh.faces, b.mesh.faces), (a.mesh.colors, b.mesh.colors)]:
        np.testing.assert_array_equal(x, y)
    empty = rec.infer_faces(np.full((120, 120, 3), 90, np.uint8))
    assert empty.boxes == [] and empty.landmarks.shape == (0, 68, 3)
    assert rec.mesh_faces(empty).faces == []


def _two_faces(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    photo = cv2.imread(str(sample_image_path()))
    for name in names:
        cv2.imwrite(str(folder / name), photo)


def test_shared_stems_never_overwrite(tmp_path, small_checkpoint, capsys):
    """a/face.jpg, b/face.jpg and b/face.png all get their own mesh, and the count
    printed is the files written."""
    _two_faces(tmp_path / "a", ["face.jpg"])
    _two_faces(tmp_path / "b", ["face.jpg", "face.png"])
    out = tmp_path / "out"
    rc = main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--weights",
               str(small_checkpoint)])
    text = capsys.readouterr().out
    assert rc == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a_face_jpg.obj", "b_face_jpg.obj", "b_face_png.obj"]
    assert "3 mesh(es) in 3 file(s)" in text
    assert "another input has the stem 'face'" in text


def test_second_face_and_a_like_named_photo_do_not_collide(tmp_path, capsys):
    from vrn.cli.reconstruct import OutputNames

    group, other = tmp_path / "group.jpg", tmp_path / "group_face1.jpg"
    names = OutputNames([group, other])
    assert names.claim(names.stem(group)) == "group"
    assert names.claim(names.stem(group) + "_face1") == "group_face1"
    assert names.claim(names.stem(other)) == "group_face1-2"


def test_write_probe_never_follows_a_symlink(tmp_path, small_checkpoint):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".vrn-write-test").symlink_to(victim)
    assert main(["--sample", "-o", str(out), "--weights", str(small_checkpoint)]) == 0
    assert victim.read_text() == "keep me"
    assert not any(p.name.startswith(".vrn-write-test.") for p in out.iterdir())


def test_an_unexpected_error_on_one_image_is_one_line(tmp_path, small_checkpoint, capsys,
                                                      monkeypatch):
    import vrn.cli.reconstruct as cli

    _two_faces(tmp_path / "in", ["a.jpg", "b.jpg"])
    real = cli.save_mesh

    def disk_full(mesh, path):
        if path.stem == "a":
            raise OSError(28, "No space left on device")
        return real(mesh, path)

    monkeypatch.setattr(cli, "save_mesh", disk_full)
    out = tmp_path / "out"
    rc = main([str(tmp_path / "in"), "-o", str(out), "--weights", str(small_checkpoint)])
    captured = capsys.readouterr()
    assert rc == 0 and (out / "b.obj").is_file()
    assert "a.jpg: OSError: [Errno 28] No space left on device" in captured.err
    assert "Traceback" not in captured.err
    assert "1 image(s) with a mesh, 0 without, 1 failed" in captured.out
    assert main([str(tmp_path / "in"), "-o", str(out), "--weights", str(small_checkpoint),
                 "--strict"]) == 1


def test_shared_reconstructor_matches_serial_meshes(small_checkpoint, sample_image):
    """One Reconstructor used by 4 threads on 4 different photos: every mesh equals the
    one a single thread makes (the README states it is safe to share)."""
    from concurrent.futures import ThreadPoolExecutor

    recon = Reconstructor(small_checkpoint)
    h, w = sample_image.shape[:2]
    images = [sample_image, np.ascontiguousarray(sample_image[:, ::-1]),
              cv2.resize(sample_image, (w * 3 // 4, h * 3 // 4)),
              np.ascontiguousarray(sample_image[40:, 20:])]

    def mesh(image):
        (face,) = recon(image).faces
        return face.mesh.vertices.copy(), face.mesh.faces.copy()

    serial = [mesh(image) for image in images]
    jobs = [i % 4 for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: mesh(images[i]), jobs))
    for i, (vertices, faces) in zip(jobs, results):
        np.testing.assert_array_equal(vertices, serial[i][0])
        np.testing.assert_array_equal(faces, serial[i][1])


@pytest.mark.parametrize("signum,code", [(2, 130), (15, 143)])  # SIGINT, SIGTERM
def test_signals_stop_cleanly(tmp_path, small_checkpoint, signum, code):
    """Ctrl-C or SIGTERM mid-batch: exit 130 / 143 with one line, every mesh written so
    far complete, no temporary file left."""
    import os
    import signal
    import subprocess
    import sys
    import time

    _two_faces(tmp_path / "in", [f"p{i:02d}.jpg" for i in range(30)])
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "vrn.cli.reconstruct", str(tmp_path / "in"),
                             "-o", str(out), "--weights", str(small_checkpoint)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("p*.obj")):
        time.sleep(0.05)
    proc.send_signal(signal.Signals(signum))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert ("terminated" if code == 143 else "interrupted") in err
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    meshes = list(out.glob("p*.obj"))
    assert 1 <= len(meshes) < 30
    for path in meshes:
        assert len(trimesh.load(path, process=False).faces) > 100


@pytest.mark.parametrize("name", ["x.onnx", "x.engine"])
def test_weights_for_another_backend_is_one_line(tmp_path, capsys, name):
    (tmp_path / name).write_bytes(b"garbage")
    rc = main(["--sample", "-o", str(tmp_path / "out"), "--weights", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert rc in (1, 2) and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("vrn-reconstruct: ")
