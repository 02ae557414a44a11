"""``vrn-live`` end to end on a video made from a real photo (moved and rotated), and
its fault cases: missing or unreadable sources, sources that end or fail mid-stream,
frames without faces, Ctrl-C with a recording. Also the capture thread's latest-frame
semantics and the landmark tracking between detections (the tracker's own tests are in
test_tracking.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import make_plane_weights
from vrn.cli.live import main
from vrn.runtime.capture import CaptureError, FrameGrabber
from vrn.runtime.detect import FaceBox
from vrn.image_io import sample_image_path

FRAME_SIZE = 320
N_FRAMES = 16
# Where skimage's astronaut face is in the 512x512 photo (YuNet box centre).
FACE_CENTRE_512 = (223.3, 119.5)


def _frames(n: int, *, blank: tuple[int, ...] = ()):
    """The sample photo at FRAME_SIZE, rotated by -8..8 degrees and moved by -12..12 px
    in x and a sine in y over ``n`` frames (BGR), with the 2x3 transform of each."""
    photo = cv2.imread(str(sample_image_path()))
    photo = cv2.resize(photo, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)
    for i in range(n):
        t = i / max(n - 1, 1)
        m = cv2.getRotationMatrix2D((FRAME_SIZE / 2, FRAME_SIZE / 2), -8 + 16 * t, 1.0)
        m[:, 2] += (-12 + 24 * t, 6 * np.sin(2 * np.pi * t))
        frame = cv2.warpAffine(photo, m, (FRAME_SIZE, FRAME_SIZE),
                               borderMode=cv2.BORDER_REFLECT)
        if i in blank:
            frame = np.full_like(frame, 127)
        yield frame, m


def write_video(path: Path, n: int = N_FRAMES, *, blank: tuple[int, ...] = ()) -> list:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                             (FRAME_SIZE, FRAME_SIZE))
    transforms = []
    for frame, m in _frames(n, blank=blank):
        writer.write(frame)
        transforms.append(m)
    writer.release()
    assert path.stat().st_size > 0
    return transforms


def true_face_centre(m: np.ndarray) -> np.ndarray:
    centre = np.array(FACE_CENTRE_512) * FRAME_SIZE / 512
    return m[:, :2] @ centre + m[:, 2]


@pytest.fixture(scope="module")
def plane_weights(tmp_path_factory) -> Path:
    """A small VRN (192x192 input, 16 depth channels) whose volume is a flat wall: the
    last convolution's weights are zero and its biases fall from +4 to -4 over depth, so
    every frame's mesh is the crop square at one depth (a few ms per frame, and its
    position says exactly where the crop was)."""
    return make_plane_weights(tmp_path_factory.mktemp("weights"), trained=False,
                              out_depth=16, input_size=192)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[Path, list]:
    path = tmp_path_factory.mktemp("video") / "moving_face.avi"
    return path, write_video(path)


def test_live_headless_end_to_end(video, plane_weights, tmp_path, capsys):
    path, transforms = video
    stats_path, meshes = tmp_path / "stats.json", tmp_path / "meshes"
    rc = main(["--source", str(path), "--headless", "--backend", "torch", "--weights",
               str(plane_weights), "--max-frames", str(N_FRAMES), "--detect-every", "3",
               "--save-meshes", str(meshes), "--stats-json", str(stats_path),
               "--stats-interval", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "[vrn-live] frame 1 |" in out                    # periodic stats lines
    assert f"{N_FRAMES} frames ({N_FRAMES} with a face, 0 dropped" in out
    for stage in ("detect", "landmarks", "crop", "infer", "isosurface", "colour"):
        assert any(line.split()[:1] == [stage] and len(line.split()) == 4
                   for line in out.splitlines()), stage     # stage p50 p90 p99
    stats = json.loads(stats_path.read_text())
    assert stats["frames"] == N_FRAMES and stats["ended"] == "max frames reached"
    frames = stats["per_frame"]
    assert [f["index"] for f in frames] == list(range(N_FRAMES))  # a file drops nothing
    assert [f["detected"] for f in frames] == [i % 3 == 0 for i in range(N_FRAMES)]
    assert {f["faces"][0]["track"] for f in frames} == {0}      # one track throughout
    import trimesh

    for i, (record, m) in enumerate(zip(frames, transforms)):
        box = FaceBox(*record["faces"][0]["box"])
        # The tracked box follows the face (smoothing lags by a few pixels).
        assert np.linalg.norm(np.array(box.center) - true_face_centre(m)) < 10, i
        mesh = trimesh.load(meshes / f"frame_{i:06d}.ply", process=False)
        assert len(mesh.faces) == record["faces"][0]["triangles"] > 1000
        # The flat-wall mesh is the crop square (made from the face's landmarks), mapped
        # back into this frame's pixels: centred near the face, square, a few boxes wide.
        centre = mesh.vertices[:, :2].mean(0)
        assert np.linalg.norm(centre - true_face_centre(m)) < 0.25 * box.w, i
        extent = np.ptp(mesh.vertices[:, :2], axis=0)
        assert abs(extent[0] - extent[1]) < 0.02 * extent.mean(), i
        assert 1.2 * box.w < extent.mean() < 3.0 * box.w, i


def test_record_and_no_face_frames_pass_through(tmp_path, plane_weights, capsys):
    path = tmp_path / "gaps.avi"
    write_video(path, 8, blank=(2, 3, 4))
    record, stats_path = tmp_path / "out.mp4", tmp_path / "stats.json"
    rc = main(["--source", str(path), "--headless", "--backend", "torch", "--weights",
               str(plane_weights), "--detect-every", "1", "--record", str(record),
               "--stats-json", str(stats_path)])
    assert rc == 0
    assert "ended: source ended" in capsys.readouterr().out
    faces = [len(f["faces"]) for f in json.loads(stats_path.read_text())["per_frame"]]
    # The tracker holds a face through one missed detection (no flicker on a blurred
    # frame), then lets the frames without a face through.
    assert faces == [1, 1, 1, 0, 0, 1, 1, 1]
    capture = cv2.VideoCapture(str(record))
    shown = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        shown.append(frame)
    assert len(shown) == 8 and shown[0].shape == (FRAME_SIZE, 2 * FRAME_SIZE, 3)
    # A blank frame is shown as it came (grey, no surface) beside an empty side panel.
    assert abs(float(np.median(shown[3][40:, :FRAME_SIZE])) - 127) < 6
    assert list(tmp_path.glob(".out.mp4*")) == []          # the temporary name is gone


def test_live_boxes_follow_a_fast_face_between_detections(tmp_path, plane_weights):
    """A face sliding 8 px per frame, detected every 10 frames: the landmarks carry the
    box along in between (box prediction alone is 70 px behind before each detection);
    once the face slides out of the photo its track ends and the frames go through
    without a face."""
    from vrn.runtime.live import run_live
    from vrn.runtime.pipeline import Reconstructor

    path, stats_path = tmp_path / "sliding.avi", tmp_path / "stats.json"
    photo = cv2.resize(cv2.imread(str(sample_image_path())), (FRAME_SIZE, FRAME_SIZE),
                       interpolation=cv2.INTER_AREA)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10,
                             (FRAME_SIZE, FRAME_SIZE))
    transforms = [np.float32([[1, 0, -60 + 8 * i], [0, 1, 0]]) for i in range(40)]
    for m in transforms:
        writer.write(cv2.warpAffine(photo, m, (FRAME_SIZE, FRAME_SIZE)))
    writer.release()
    rec = Reconstructor(plane_weights, backend="torch")
    run_live(rec, FrameGrabber(path), headless=True, detect_every=10, stats_json=stats_path,
             out=open(os.devnull, "w"))
    frames = json.loads(stats_path.read_text())["per_frame"]
    assert [f["detected"] for f in frames[:30]] == [i % 10 == 0 for i in range(30)]
    for i, (record, m) in enumerate(zip(frames[:26], transforms)):  # face in the photo
        (face,) = record["faces"]
        box = FaceBox(*face["box"])
        assert face["track"] == 0
        assert np.linalg.norm(np.array(box.center) - true_face_centre(m)) < 5, i
    assert all(f["detected"] and not f["faces"] for f in frames[-5:])  # the face is gone


@pytest.mark.parametrize("source, message", [
    ("missing.avi", "video file not found"),
    ("notavideo.avi", "cannot open video source"),
])
def test_bad_source_is_one_clear_error(tmp_path, source, message, capsys):
    (tmp_path / "notavideo.avi").write_text("this is not a video")
    rc = main(["--source", str(tmp_path / source), "--headless", "--backend", "torch"])
    assert rc == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_truncated_video_ends_cleanly(tmp_path, plane_weights, capsys):
    path = tmp_path / "cut.avi"
    write_video(path, 12)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    stats_path = tmp_path / "stats.json"
    rc = main(["--source", str(path), "--headless", "--backend", "torch", "--weights",
               str(plane_weights), "--stats-json", str(stats_path)])
    assert rc == 0
    stats = json.loads(stats_path.read_text())
    assert 1 <= stats["frames"] < 12
    assert stats["ended"].startswith("source ended")


class FlakyCapture:
    """A capture that yields ``frames`` copies of ``image`` and then fails: raises, or
    returns ``(False, None)`` like a camera that was unplugged."""

    def __init__(self, image, frames: int, *, raises: bool):
        self.image, self.left, self.raises = image, frames, raises
        self.released = False

    def read(self):
        if self.left <= 0:
            if self.raises:
                raise OSError("device disconnected")
            return False, None
        self.left -= 1
        return True, self.image.copy()

    def get(self, prop):
        return 0.0

    def release(self):
        self.released = True


@pytest.mark.parametrize("raises", [True, False])
def test_source_failing_mid_stream_is_reopened_then_ends(raises, plane_weights):
    from vrn.runtime.live import run_live
    from vrn.runtime.pipeline import Reconstructor

    image = next(_frames(1))[0]
    opened: list[FlakyCapture] = []

    def opener():
        if len(opened) >= 2:  # the camera never comes back after one reconnection
            raise CaptureError("camera 0: cannot open")
        opened.append(FlakyCapture(image, 3, raises=raises))
        return opened[-1]

    grabber = FrameGrabber("fake-camera", opener=opener, latest_only=False, reconnect=True,
                           reconnect_attempts=3, backoff_s=0.01, max_backoff_s=0.02)
    rec = Reconstructor(plane_weights, backend="torch")
    summary = run_live(rec, grabber, headless=True, detect_every=2, out=open(os.devnull, "w"))
    assert summary["frames"] == 6 and summary["frames_with_faces"] == 6
    assert summary["reconnects"] == 1
    assert "gave up after 3 reopening attempts" in summary["ended"]
    assert ("device disconnected" in summary["ended"]) or ("cannot open" in summary["ended"])
    assert all(c.released for c in opened)


def test_capture_keeps_only_the_latest_frame():
    """A live source faster than its consumer: frames are dropped, never queued."""
    produced = []

    class FastCamera:
        def read(self):
            time.sleep(0.002)
            produced.append(len(produced))
            return True, np.full((48, 64, 3), len(produced) % 256, np.uint8)

        def get(self, prop):
            return 30.0

        def release(self):
            pass

    grabber = FrameGrabber("fast", opener=FastCamera, latest_only=True)
    taken = []
    for _ in range(5):
        time.sleep(0.05)
        taken.append(grabber.get(timeout=1.0))
    grabber.stop()
    indices = [f.index for f in taken]
    assert indices == sorted(indices) and len(set(indices)) == 5
    assert min(np.diff(indices)) > 1                       # frames were skipped
    assert grabber.frames_dropped > 0
    assert grabber.frames_dropped + 5 >= grabber.frames_read - 1
    assert taken[0].image.shape == (48, 64, 3) and taken[0].image.dtype == np.uint8
    assert grabber.ended


def test_camera_that_does_not_exist(capsys):
    rc = main(["--source", "97", "--headless", "--backend", "torch"])
    assert rc == 1
    assert "camera 97: cannot open" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum,code,word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_finalise_the_recording(tmp_path, plane_weights, signum, code,
                                                   word):
    path = tmp_path / "long.avi"
    write_video(path, 400)
    record = tmp_path / "rec.mp4"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vrn.cli.live", "--source", str(path), "--headless",
         "--backend", "torch", "--weights", str(plane_weights), "--record", str(record),
         "--stats-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 60
    while time.time() < deadline and sum("[vrn-live] frame" in x for x in lines) < 3:
        time.sleep(0.05)
    proc.send_signal(signum)
    proc.wait(timeout=30)
    reader.join(timeout=5)
    err = proc.stderr.read()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    out = "".join(lines)
    assert f"ended: {word}" in out
    capture = cv2.VideoCapture(str(record))
    ok, frame = capture.read()
    assert ok and frame.shape == (FRAME_SIZE, 2 * FRAME_SIZE, 3)
    assert capture.get(cv2.CAP_PROP_FRAME_COUNT) >= 3
    assert list(tmp_path.glob(".rec.mp4*")) == []


def test_window_keys_switch_view_save_and_quit(video, plane_weights, tmp_path, monkeypatch):
    """The display stage with a stand-in window: `v` switches the view, `s` saves the
    current mesh, `q` quits; every frame shown is the overlay plus the side view."""
    import vrn.runtime.live as live
    from vrn.runtime.pipeline import Reconstructor

    shown, keys = [], iter(["", "v", "s", "v", "q"])

    class FakeWindow:
        def __init__(self):
            pass

        def show(self, canvas):
            shown.append(canvas)
            return next(keys)

        def close(self):
            shown.append("closed")

    monkeypatch.setattr(live, "_Display", FakeWindow)
    monkeypatch.chdir(tmp_path)
    rec = Reconstructor(plane_weights, backend="torch")
    out = tmp_path / "log.txt"
    with open(out, "w") as log:
        summary = live.run_live(rec, FrameGrabber(video[0]), out=log)
    assert summary["ended"] == "user quit" and summary["frames"] == 5
    assert shown[-1] == "closed" and len(shown) == 6
    assert all(c.shape == (FRAME_SIZE, 2 * FRAME_SIZE, 3) for c in shown[:5])
    saved = tmp_path / "frame_000002.obj"
    assert saved.is_file() and f"saved {saved}" in out.read_text()
    # Views: overlay, overlay, textured, textured, camera (after the second `v`).
    photo_only = np.abs(shown[4][:, :FRAME_SIZE].astype(int)
                        - shown[3][:, :FRAME_SIZE].astype(int)).mean()
    assert photo_only > 1  # the surface is no longer drawn in the camera view


def test_window_without_display_is_refused_early(monkeypatch, capsys):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if not sys.platform.startswith("linux"):
        pytest.skip("DISPLAY only decides on Linux")
    assert main(["--source", "missing.avi"]) == 1
    assert "no display available" in capsys.readouterr().err


@pytest.mark.parametrize("device, ok", [("cpu", True), ("cuda", True), ("cuda:1", True),
                                        ("gpu", False), ("cuda:x", False), ("cpu:0", False)])
def test_device_option(device, ok, capsys):
    """--device takes cpu, cuda or cuda:N (the N-th GPU), and nothing else."""
    from vrn.cli.live import _device

    if ok:
        assert _device(device) == device
    else:
        with pytest.raises(SystemExit):
            main(["--device", device, "--headless"])
        assert "expected cpu, cuda or cuda:N" in capsys.readouterr().err


def test_pipelined_loop_gives_the_sequential_loop_frames(video, plane_weights, tmp_path):
    """The pipelined loop (network of frame n + 1 beside the mesh of frame n) makes
    exactly the frames of the sequential one, in order, and reports latency beside FPS."""
    from vrn.runtime.live import format_summary, pipelined_by_default, run_live
    from vrn.runtime.pipeline import Reconstructor

    rec = Reconstructor(plane_weights, backend="torch")
    assert pipelined_by_default(rec)  # a CPU backend
    runs = {}
    for pipelined in (True, False):
        folder = tmp_path / ("pipelined" if pipelined else "sequential")
        stats = folder / "stats.json"
        summary = run_live(rec, FrameGrabber(video[0]), headless=True, detect_every=3,
                           pipelined=pipelined, save_meshes=folder, stats_json=stats,
                           out=open(os.devnull, "w"))
        assert summary["frames"] == N_FRAMES and summary["stages_ms"]["latency"]["p50"] > 0
        assert "latency p50" in format_summary(summary)
        runs[pipelined] = json.loads(stats.read_text())["per_frame"]
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a["index"] == b["index"] and a["detected"] == b["detected"]
        assert a["faces"] == b["faces"]  # same tracks, boxes and mesh sizes
        assert {"landmarks", "crop", "infer", "isosurface", "colour"} <= set(a["timings_ms"])
    for i in range(N_FRAMES):
        name = f"frame_{i:06d}.ply"
        assert (tmp_path / "pipelined" / name).read_bytes() == \
            (tmp_path / "sequential" / name).read_bytes()


def test_pipelined_loop_hands_on_a_mesh_stage_error(plane_weights, video):
    from vrn.runtime.live import run_live
    from vrn.runtime.pipeline import Reconstructor

    class Broken(Reconstructor):
        def _finish_mesh(self, *args):
            raise RuntimeError("colouring failed")

    rec = Broken(plane_weights, backend="torch")
    with pytest.raises(RuntimeError, match="colouring failed"):
        run_live(rec, FrameGrabber(video[0]), headless=True, pipelined=True,
                 out=open(os.devnull, "w"))
