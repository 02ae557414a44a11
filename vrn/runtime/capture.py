"""Frame capture on its own thread, with latest-frame semantics.

A :class:`FrameGrabber` reads a camera, a video file or a stream URL on a background
thread into a one-frame slot. A live source (camera, URL) overwrites a frame the consumer
has not taken yet, so slow inference drops frames instead of queueing them; a video file
waits for the slot to be taken, so every frame of the file is processed. Either way at
most one frame is held.

A live source that stops delivering frames (read fails or raises) is reopened with
exponential back-off; after ``reconnect_attempts`` failed reopenings the grabber ends
cleanly and :attr:`FrameGrabber.error` says why. A file simply ends.

Frames are ``(H, W, 3)`` uint8 RGB, like everything else in :mod:`vrn.runtime`, and at
most :data:`~vrn.image_io.MAX_PIXELS` pixels (``VRN_MAX_PIXELS``): a source whose
frames are larger fails with :class:`CaptureError`.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

import cv2
import numpy as np

from ..errors import CaptureError
from ..image_io import pixel_limit


@dataclass(frozen=True)
class Frame:
    """One captured frame: ``index`` counts every frame read from the source (gaps mean
    dropped frames), ``timestamp`` is ``time.perf_counter()`` when it was offered to the
    consumer (right after the read for a live source), ``image`` is ``(H, W, 3)`` uint8
    RGB."""

    index: int
    timestamp: float
    image: np.ndarray


def parse_source(source: str | int | os.PathLike) -> str | int:
    """``"0"`` or ``0`` -> camera index ``0``; a URL or a file path stays a string."""
    if isinstance(source, int):
        return source
    text = os.fspath(source).strip()
    return int(text) if text.isdigit() else text


def is_live_source(source: str | int) -> bool:
    """Cameras and URLs are live (frames may be dropped); files are not."""
    return isinstance(source, int) or "://" in str(source)


def open_video_source(source: str | int, *, max_pixels: int | None = None):
    """A ``cv2.VideoCapture`` for ``source``; :class:`CaptureError` when it cannot be
    opened, naming the source and the likely reason, or when the frame size it reports is
    over ``max_pixels`` (default ``$VRN_MAX_PIXELS`` or 50 megapixels)."""
    source = parse_source(source)
    max_pixels = pixel_limit(max_pixels)
    if isinstance(source, str) and "://" not in source:
        path = Path(source)
        if not path.is_file():
            raise CaptureError(f"{source}: video file not found")
    capture = cv2.VideoCapture(source)
    if not capture.isOpened():
        capture.release()
        if isinstance(source, int):
            raise CaptureError(f"camera {source}: cannot open (no such device, or it is in "
                               "use by another program)")
        raise CaptureError(f"{source}: cannot open video source (not a video OpenCV can "
                           "decode, or the stream is unreachable)")
    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)  # 0 when not reported
    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0)
    try:
        _check_frame_size(source, width, height, max_pixels)
    except CaptureError:
        capture.release()
        raise
    return capture


def _check_frame_size(source, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise CaptureError(f"{source}: frames are {width}x{height} pixels, over the limit "
                           f"of {max_pixels} (VRN_MAX_PIXELS)")


class FrameGrabber:
    """Reads frames on a background thread into a one-frame slot.

    Parameters
    ----------
    source : int, str or path
        Camera index (``0`` or ``"0"``), video file, or stream URL.
    opener : callable, optional
        Returns a capture object (``read() -> (ok, BGR frame)``, ``release()``); used
        for the first opening and every reopening. Default :func:`open_video_source`.
    latest_only : bool, optional
        Overwrite an untaken frame (drop) instead of waiting for the consumer. Default:
        ``True`` for live sources, ``False`` for files.
    reconnect : bool, optional
        Reopen after a failed or raising read. Default: ``True`` for live sources only
        (a file that stops reading has ended).
    reconnect_attempts : int
        Reopenings tried after a failure before giving up.
    backoff_s, max_backoff_s : float
        First wait before reopening, doubled per failed attempt up to the maximum.
    max_pixels : int, optional
        Largest frame (``width * height``) accepted. Default ``$VRN_MAX_PIXELS`` or 50
        megapixels. The default opener checks the size the source reports; every frame
        read is checked too, and a larger one ends the grabber with :attr:`error` set.
    start : bool
        Start reading at once; otherwise call :meth:`start`.

    The source is opened in the constructor, so a missing camera or file, or one whose
    frames are too large, raises :class:`CaptureError` at once. Use as a context manager
    or call :meth:`stop`.
    """

    def __init__(self, source: str | int | os.PathLike, *,
                 opener: Callable[[], object] | None = None,
                 latest_only: bool | None = None, reconnect: bool | None = None,
                 reconnect_attempts: int = 5, backoff_s: float = 0.25,
                 max_backoff_s: float = 4.0, max_pixels: int | None = None,
                 start: bool = True):
        self.source = parse_source(source) if opener is None else source
        live = is_live_source(self.source) if opener is None else False
        self.max_pixels = pixel_limit(max_pixels)
        self._opener = opener or (lambda: open_video_source(self.source,
                                                            max_pixels=self.max_pixels))
        self.latest_only = live if latest_only is None else latest_only
        self.reconnect = live if reconnect is None else reconnect
        self.reconnect_attempts = reconnect_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.frames_read = 0
        self.frames_dropped = 0
        self.reconnects = 0
        self.error: str | None = None
        self._capture = self._opener()
        self.fps = _reported_fps(self._capture)
        self._slot: Frame | None = None
        self._ended = False
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="vrn-capture", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        """Start the reader thread (done by the constructor unless ``start=False``)."""
        if not self._thread.is_alive() and not self._ended:
            self._thread.start()

    # consumer side -------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Frame | None:
        """The newest untaken frame; ``None`` once the source has ended (or on
        ``timeout``, check :attr:`ended` to tell the two apart)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._slot is not None or self._ended,
                                       timeout):
                return None
            frame, self._slot = self._slot, None
            self._cond.notify_all()
            return frame

    @property
    def ended(self) -> bool:
        """True once the source has ended and its last frame has been taken."""
        with self._cond:
            return self._ended and self._slot is None

    def __iter__(self) -> Iterator[Frame]:
        while True:
            frame = self.get()
            if frame is None:
                return
            yield frame

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading, drop any untaken frame and release the source (idempotent);
        :meth:`get` then returns ``None``."""
        self._stop.set()
        with self._cond:
            self._slot = None
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: release the source here
            _release(self._capture)
            self._capture = None
            with self._cond:
                self._ended = True

    def __enter__(self) -> FrameGrabber:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # reader thread ---------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0  # consecutive failed reads or reopenings
        try:
            while not self._stop.is_set():
                image = self._read() if self._capture is not None else None
                if image is not None:
                    failures = 0
                    self._put(image)
                    continue
                if not self.reconnect:
                    break
                if failures >= self.reconnect_attempts:
                    self.error = (f"{self.source}: disconnected; gave up after "
                                  f"{failures} reopening attempts (last: {self.error})")
                    break
                failures += 1
                _release(self._capture)
                self._capture = None
                if self._stop.wait(min(self.backoff_s * 2 ** (failures - 1),
                                       self.max_backoff_s)):
                    break
                try:
                    self._capture = self._opener()
                    self.reconnects += 1
                except Exception as exc:
                    self.error = f"{self.source}: reopening failed ({exc})"
        except CaptureError as exc:  # frames over the pixel limit: reopening cannot help
            self.error = str(exc)
        finally:
            _release(self._capture)
            self._capture = None
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _read(self) -> np.ndarray | None:
        """One RGB frame, or ``None`` when the read failed (recorded in :attr:`error`);
        :class:`CaptureError` for a frame over the pixel limit."""
        try:
            ok, bgr = self._capture.read()
        except Exception as exc:  # a driver or a fake source may raise anything
            self.error = f"{self.source}: read failed ({type(exc).__name__}: {exc})"
            return None
        if not ok or bgr is None:
            if self.frames_read == 0 or self.reconnect:
                self.error = f"{self.source}: no frame could be read"
            return None
        _check_frame_size(self.source, bgr.shape[1], bgr.shape[0], self.max_pixels)
        if bgr.ndim == 2:
            return cv2.cvtColor(bgr, cv2.COLOR_GRAY2RGB)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _put(self, image: np.ndarray) -> None:
        index = self.frames_read
        self.frames_read += 1
        with self._cond:
            if not self.latest_only:
                self._cond.wait_for(lambda: self._slot is None or self._stop.is_set())
            if self._stop.is_set():
                return
            if self._slot is not None:
                self.frames_dropped += 1
            self._slot = Frame(index, time.perf_counter(), image)
            self._cond.notify_all()


def _reported_fps(capture) -> float:
    """The source's frame rate, or 0.0 when it does not report one."""
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS))
    except Exception:
        return 0.0
    return fps if 0.0 < fps < 1000.0 else 0.0


def _release(capture) -> None:
    if capture is None:
        return
    try:
        capture.release()
    except Exception:
        pass
