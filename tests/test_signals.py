"""Signals during clean-up: a second Ctrl-C or SIGTERM while ``vrn-live`` finalises its
recording is ignored, so the recording is kept and the exit code is the first signal's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import cv2
import pytest
from test_live import plane_weights, write_video  # noqa: F401  (a fixture, a helper)

from vrn.signals import Terminated, interrupts_deferred, sigterm_as_interrupt


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_interrupts_deferred_ignores_signals_and_restores_handlers():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # a KeyboardInterrupt or a termination would happen here
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_only_the_first_interrupt_raises():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        pass
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    try:
        with pytest.raises(Terminated), sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        # Interrupted: every later signal is ignored, after the block too.
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    finally:
        for sig, handler in zip((signal.SIGINT, signal.SIGTERM), before):
            signal.signal(sig, handler)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_second_signal_during_clean_up_keeps_the_recording(tmp_path, plane_weights):  # noqa: F811
    video = tmp_path / "long.avi"
    write_video(video, 400)
    record = tmp_path / "rec.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-m", "vrn.cli.live", "--source", str(video), "--headless",
         "--backend", "torch", "--weights", str(plane_weights), "--record", str(record),
         "--stats-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 60
    while time.time() < deadline and sum("[vrn-live] frame" in x for x in lines) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)  # impatient: while the first one's clean-up runs
    proc.wait(timeout=30)
    reader.join(timeout=5)
    err = proc.stderr.read()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminate called" not in err
    capture = cv2.VideoCapture(str(record))
    assert capture.read()[0] and capture.get(cv2.CAP_PROP_FRAME_COUNT) >= 3
    assert list(tmp_path.glob(".rec.mp4*")) == []
