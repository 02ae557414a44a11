"""The live loop: capture -> pipeline -> display, three stages on their own threads,
joined by bounded queues.

- **capture** (:class:`~vrn.runtime.capture.FrameGrabber`): a one-frame slot; a live
  source drops frames the pipeline is too slow for, a video file is read frame by frame.
- **pipeline** (a worker thread): faces and their landmarks from
  :class:`~vrn.runtime.tracking.FaceTracker` (detection every K frames, the landmarks
  followed from frame to frame in between), then the
  :class:`~vrn.runtime.pipeline.Reconstructor` on them, in its two halves
  (:meth:`~vrn.runtime.pipeline.Reconstructor.infer_faces`,
  :meth:`~vrn.runtime.pipeline.Reconstructor.mesh_faces`); on a CPU backend on two
  threads, the network of frame n + 1 beside the mesh of frame n
  (:class:`_PipelineWorker`). Results go into a queue of :data:`RESULT_QUEUE_SIZE`
  items, in frame order; the worker waits when it is full.
- **display** (the calling thread, since GUI toolkits want the main thread): the shaded
  surface over the face, a side view of the mesh and a HUD (FPS, latency from capture to
  mesh, per-stage ms), or, with ``headless``, a periodic stats line. It also writes the
  recording and the meshes.

Frames without a face pass through unchanged. ``q``/Esc or Ctrl-C end the loop cleanly:
the threads stop, the recording is finalised (written under a temporary name and renamed
at the end, so the final name only ever holds a playable file) and a summary is printed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import cv2
import numpy as np

from ..atomic import atomic_path, write_text_atomic
from ..errors import VRNError
from ..metrics import PERCENTILES, summarize
from ..signals import interrupt_word, interrupts_deferred
from .capture import Frame, FrameGrabber
from .mesh import save_mesh
from .timing import StageTimer
from .tracking import FaceTracker, Track

if TYPE_CHECKING:
    from .pipeline import InferredFrame

RESULT_QUEUE_SIZE = 2
VIEWS = ("overlay", "textured", "camera")  # the main panel; `v` cycles through them
SIDE_PANEL_MIN = 160
_END = object()


@dataclass
class LiveFrame:
    """One processed frame, as the pipeline stage hands it to the display stage.

    ``result`` is the :class:`~vrn.runtime.pipeline.FrameResult` (faces empty when none
    were found); ``tracks`` the tracks of its faces, in order. ``timings_ms`` holds the
    pipeline's stages, ``detect`` being the tracker's time (detection on detection
    frames, prediction only in between) and ``landmarks`` the landmark stage the
    tracker ran, plus ``total``.
    """

    frame: Frame
    result: object
    tracks: list[Track]
    detected: bool
    timings_ms: dict[str, float]
    done_at: float = 0.0


# Per-stage timings kept for the summary's percentiles: the last half hour at 20 FPS, so
# a loop that runs for days holds a bounded amount (about 10 MB), not a growing one.
STATS_WINDOW = 36_000


@dataclass
class LiveStats:
    """Frame counts of a run, and per-stage milliseconds of its last
    :data:`STATS_WINDOW` frames."""

    frames: int = 0
    frames_with_faces: int = 0
    started_at: float = field(default_factory=time.perf_counter)
    first_done_at: float | None = None
    last_done_at: float | None = None
    stage_ms: dict[str, deque] = field(
        default_factory=lambda: defaultdict(lambda: deque(maxlen=STATS_WINDOW)))
    records: list[dict] | None = None

    def add(self, item: LiveFrame, extra_ms: dict[str, float] | None = None) -> None:
        self.frames += 1
        self.frames_with_faces += bool(item.result.faces)
        if self.first_done_at is None:
            self.first_done_at = item.done_at
        self.last_done_at = item.done_at
        timings = dict(item.timings_ms)
        timings.update(extra_ms or {})
        timings["latency"] = (item.done_at - item.frame.timestamp) * 1e3
        for stage, ms in timings.items():
            self.stage_ms[stage].append(ms)
        if self.records is not None:
            self.records.append({
                "index": item.frame.index,
                "detected": item.detected,
                "faces": [{"track": t.id, "box": [round(float(v), 2) for v in f.box.as_array()],
                           "vertices": int(len(f.mesh.vertices)),
                           "triangles": int(len(f.mesh.faces))}
                          for t, f in zip(item.tracks, item.result.faces)],
                "timings_ms": {k: round(v, 3) for k, v in timings.items()},
            })

    @property
    def fps(self) -> float:
        """Steady-state frames per second: frames after the first over the time since the
        first was done (the first frame carries one-off start-up costs)."""
        if self.frames < 2 or self.last_done_at is None:
            return 0.0
        span = self.last_done_at - self.first_done_at
        return (self.frames - 1) / span if span > 0 else 0.0

    def recent_ms(self, stage: str, last: int = 30) -> float:
        values = list(itertools.islice(reversed(self.stage_ms.get(stage, ())), last))
        return float(np.mean(values)) if values else 0.0

    def line(self, dropped: int = 0) -> str:
        """One stats line for the console."""
        stages = " ".join(f"{s} {self.recent_ms(s):.1f}" for s in self.stage_ms
                          if s not in ("latency", "total"))
        return (f"[vrn-live] frame {self.frames} | {self.fps:.2f} fps | latency "
                f"{self.recent_ms('latency'):.0f} ms | faces in {self.frames_with_faces} | "
                f"{stages} ms | dropped {dropped}")

    def summary(self, **extra) -> dict:
        """Counts, FPS and per-stage :func:`vrn.metrics.summarize` stats (ms: mean,
        percentiles, extremes) as a JSON-ready dict."""
        stages = {stage: {k: round(v, 3) for k, v in summarize(values).items() if k != "n"}
                  for stage, values in self.stage_ms.items() if values}
        return {"frames": self.frames, "frames_with_faces": self.frames_with_faces,
                "fps": round(self.fps, 3),
                "wall_s": round(time.perf_counter() - self.started_at, 3),
                "stages_ms": stages, **extra}


def format_summary(summary: dict) -> str:
    """The final summary as a small table."""
    lines = [f"[vrn-live] {summary['frames']} frames ({summary['frames_with_faces']} with a "
             f"face, {summary.get('dropped', 0)} dropped by capture) in "
             f"{summary['wall_s']:.1f} s: {summary['fps']:.2f} FPS{_latency(summary)}; "
             f"ended: {summary.get('ended', '?')}"]
    if summary["stages_ms"]:
        lines.append(f"  {'stage (ms)':<12}" + "".join(f"{f'p{q}':>9}" for q in PERCENTILES))
        for stage, values in summary["stages_ms"].items():
            lines.append(f"  {stage:<12}" + "".join(f"{values[f'p{q}']:>9.1f}"
                                                     for q in PERCENTILES))
    return "\n".join(lines)


def _latency(summary: dict) -> str:
    """``", latency p50 N ms"`` (capture to mesh), when the summary has it."""
    latency = summary["stages_ms"].get("latency")
    return f", latency p50 {latency['p50']:.0f} ms" if latency else ""


# ----------------------------------------------------------------------------- drawing

def compose_view(image: np.ndarray, item: LiveFrame | None, *, view: str = "overlay",
                 hud: list[str] | None = None) -> np.ndarray:
    """The display canvas ``(H, W + H, 3)`` uint8 RGB: the main panel (``view``) with the
    face boxes and HUD lines, and a side view of the first face's mesh."""
    from .render import overlay, side_view

    h = image.shape[0]
    meshes = [f.mesh for f in item.result.faces if not f.mesh.is_empty] if item else []
    if view == "camera" or not meshes:
        main = image.copy()
    else:
        main = overlay(image, meshes, colored=view == "textured")
    if item is not None:
        for face in item.result.faces:
            x, y, w, bh = (int(round(v)) for v in face.box.as_array())
            cv2.rectangle(main, (x, y), (x + w, y + bh), (80, 220, 80), 1, cv2.LINE_AA)
    side_size = max(h, SIDE_PANEL_MIN)
    if meshes:
        side = side_view(meshes[0], size=side_size)
    else:
        side = np.full((side_size, side_size, 3), 32, np.uint8)
        cv2.putText(side, "no face", (10, side_size // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                    (200, 200, 200), 1, cv2.LINE_AA)
    if side_size != h:
        side = cv2.resize(side, (h, h), interpolation=cv2.INTER_AREA)
    for i, text in enumerate(hud or []):
        org = (8, 20 + 20 * i)
        cv2.putText(main, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(main, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1,
                    cv2.LINE_AA)
    return np.concatenate([main, side], axis=1)


_HUD_LABELS = {"detect": "det", "crop": "crop", "infer": "net", "isosurface": "iso",
               "colour": "col", "render": "draw"}


def hud_lines(stats: LiveStats, view: str, faces: int) -> list[str]:
    """The two HUD lines: FPS, faces, view and keys; recent per-stage milliseconds."""
    stages = " ".join(f"{label} {stats.recent_ms(stage):.0f}"
                      for stage, label in _HUD_LABELS.items() if stage in stats.stage_ms)
    return [f"{stats.fps:.1f} FPS  latency {stats.recent_ms('latency'):.0f} ms  faces {faces}  "
            f"view {view}  (q quit, s save, v view)",
            f"{stages} ms"]


# ------------------------------------------------------------------------------ stages

class _PipelineWorker(threading.Thread):
    """Takes frames from the grabber, runs the tracker and the reconstruction, queues the
    results in frame order.

    Each frame has two halves: :meth:`network` (the tracker, the landmarks, the crop and
    the network) and :meth:`mesh` (the isosurface and the colours). Sequential:
    :meth:`process` runs both on this thread. Pipelined (``pipelined=True``, CPU
    backends): :meth:`network` runs on this thread and :meth:`mesh` on ``vrn-mesh``,
    joined by a queue of one frame. So the network works on frame n + 1 while the mesh
    of frame n is made, and the cores the network leaves idle (in its single-threaded
    layers, and while the single-threaded stages run) do the mesh work. At most three
    frames are in flight (one per stage, one waiting between them); a live source's
    grabber drops the frames taken too late. Either way the tracker and the landmark
    stage run on this thread, one frame after the other, so the landmarks of frame n
    are in the tracker before it moves on to frame n + 1. (The tracker on a third
    thread of its own measured no faster and a frame or two later.)
    """

    def __init__(self, grabber: FrameGrabber, tracker: FaceTracker, reconstructor,
                 results: queue.Queue, stop: threading.Event, max_frames: int | None,
                 pipelined: bool = False):
        super().__init__(name="vrn-pipeline", daemon=True)
        self.grabber, self.tracker, self.reconstructor = grabber, tracker, reconstructor
        self.results, self.stop, self.max_frames = results, stop, max_frames
        self.pipelined = pipelined
        self.error: BaseException | None = None
        self.ended = "source ended"

    def run(self) -> None:
        processed = 0
        stages: list[_Stage] = []
        try:
            if self.pipelined:
                stages = self._start_stages()
            while not self.stop.is_set() and all(s.is_alive() for s in stages):
                if self.max_frames is not None and processed >= self.max_frames:
                    self.ended = "max frames reached"
                    break
                frame = self.grabber.get(timeout=0.1)
                if frame is None:
                    if self.grabber.ended:
                        break
                    continue
                if stages:
                    stages[0].offer(self.network(frame))
                else:
                    self._put(self.process(frame))
                processed += 1
        except BaseException as exc:  # handed to the display thread, which re-raises
            self.error = exc
        finally:
            for stage in stages:  # in order: a stage's last frames reach the next first
                stage.finish()
                self.error = self.error or stage.error
            self._put(_END, force=True)

    def _start_stages(self) -> list[_Stage]:
        """The threads after this one: the mesh stage, whose marching cubes run beside
        the network (:func:`~vrn.runtime.threads.kernels_beside_network`)."""
        from .threads import kernels_beside_network

        mesh = _Stage("vrn-mesh", self.mesh, self._put, self.stop, setup=kernels_beside_network)
        mesh.start()
        return [mesh]

    def process(self, frame: Frame) -> LiveFrame:
        """The whole frame on this thread."""
        return self.mesh(self.network(frame))

    def network(self, frame: Frame) -> _InFlight:
        """The first half of a frame: the tracker, the landmarks (which the tracker
        follows into the next frame), the crop and the network
        (:meth:`~vrn.runtime.pipeline.Reconstructor.infer_faces`)."""
        start = time.perf_counter()
        rec, image, timer = self.reconstructor, frame.image, StageTimer()
        with timer("detect"):
            tracks, detected = self.tracker.update(image)
            if not rec.all_faces:
                tracks = tracks[:1]
        landmarks = None
        if tracks:
            with timer("landmarks"):
                tracks, landmarks = self.tracker.track_landmarks(image, tracks,
                                                                 rec.landmark_stage)
        inferred = rec.infer_faces(image, boxes=[t.box for t in tracks], landmarks=landmarks,
                                   timer=timer)
        return _InFlight(frame, tracks, detected, inferred, (time.perf_counter() - start) * 1e3)

    def mesh(self, item: _InFlight) -> LiveFrame:
        """The second half of a frame: isosurface and colours
        (:meth:`~vrn.runtime.pipeline.Reconstructor.mesh_faces`), the result."""
        start = time.perf_counter()
        result = self.reconstructor.mesh_faces(item.inferred)
        timings = dict(result.timings_ms)
        timings["total"] = item.work_ms + (time.perf_counter() - start) * 1e3
        return LiveFrame(item.frame, result, item.tracks, item.detected, timings,
                         time.perf_counter())

    def _put(self, item, force: bool = False) -> None:
        _offer(self.results, item, self.stop, force=force)


@dataclass
class _InFlight:
    """A frame between its two halves: the tracker's faces (those reconstructed),
    whether it detected, the :class:`~vrn.runtime.pipeline.InferredFrame` (its boxes
    are the tracks' boxes in this frame) and the milliseconds of work so far."""

    frame: Frame
    tracks: list[Track]
    detected: bool
    inferred: InferredFrame
    work_ms: float


class _Stage(threading.Thread):
    """One thread of the pipelined worker: takes items from its one-item inbox
    (:meth:`offer`), runs ``work`` on each and hands the result to ``send``, in order;
    ``setup`` runs first on the thread. An error ends the thread and is kept in
    :attr:`error`."""

    def __init__(self, name: str, work, send, stop: threading.Event, *, setup=None):
        super().__init__(name=name, daemon=True)
        self.work, self.send, self.stop, self.setup = work, send, stop, setup
        self.inbox: queue.Queue = queue.Queue(maxsize=1)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            if self.setup is not None:
                self.setup()
            while True:
                try:
                    item = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _END:
                    return
                self.send(self.work(item))
        except BaseException as exc:
            self.error = exc

    def offer(self, item) -> None:
        """Queue ``item``, waiting while the inbox is full (dropped once the loop stops
        or this thread has ended)."""
        _offer(self.inbox, item, self.stop, alive=self.is_alive)

    def finish(self) -> None:
        """Let the items in flight through (or drop them when the loop is stopping),
        then end the thread."""
        if self.is_alive():
            _offer(self.inbox, _END, self.stop, force=True, alive=self.is_alive)
            self.join()


def _offer(target: queue.Queue, item, stop: threading.Event, *, force: bool = False,
           alive=None) -> None:
    """Put ``item`` into ``target``, waiting while it is full. Once ``stop`` is set (or
    ``alive()`` turns false: nobody will take it) the item is dropped, unless ``force``,
    which makes room by dropping the oldest item instead."""
    while True:
        try:
            target.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set() or (alive is not None and not alive()):
                if not force:
                    return
                with contextlib.suppress(queue.Empty):
                    target.get_nowait()


class _Recorder:
    """Writes canvases to a video under a temporary name; :meth:`finish` renames it."""

    def __init__(self, path: Path, fps: float, stack: contextlib.ExitStack):
        self.path, self.fps = Path(path), fps
        self._tmp = stack.enter_context(atomic_path(self.path))
        self._writer = None
        self._size = None
        self.frames = 0

    def write(self, canvas: np.ndarray) -> None:
        h, w = canvas.shape[:2]
        if self._writer is None:
            self._size = (w, h)
            fourcc = cv2.VideoWriter_fourcc(*("mp4v" if self.path.suffix.lower() == ".mp4"
                                              else "MJPG"))
            self._writer = cv2.VideoWriter(str(self._tmp), fourcc, self.fps, self._size)
            if not self._writer.isOpened():
                raise VRNError(f"{self.path}: cannot open a video writer for this file type")
        if (w, h) != self._size:
            canvas = cv2.resize(canvas, self._size, interpolation=cv2.INTER_AREA)
        self._writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def finish(self) -> None:
        """Close the file (called before the rename that the ExitStack performs)."""
        if self._writer is not None:
            self._writer.release()


def check_display() -> None:
    """Raise :class:`VRNError` when no window can be shown here (e.g. over SSH)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                 or os.environ.get("WAYLAND_DISPLAY")):
        raise VRNError("no display available (DISPLAY is not set); use --headless")


class _Display:
    """An OpenCV window; keys are returned lower-cased (``""`` when none)."""

    TITLE = "vrn-live"

    def __init__(self):
        check_display()
        try:
            cv2.namedWindow(self.TITLE, cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            raise VRNError(f"cannot open a window ({exc.err}); use --headless") from None

    def show(self, canvas: np.ndarray) -> str:
        cv2.imshow(self.TITLE, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        key = cv2.waitKey(1) & 0xFF
        if key == 27:
            return "q"
        return chr(key).lower() if 0 < key < 128 else ""

    def close(self) -> None:
        with contextlib.suppress(cv2.error):
            cv2.destroyWindow(self.TITLE)
            cv2.waitKey(1)


class _DisplayStage:
    """The display stage's work for each processed frame, in order: the canvas (for the
    window and the recording), the statistics, the recording, the meshes on disk, the
    web view, the window and its keys, and the headless stats line."""

    def __init__(self, stats: LiveStats, grabber: FrameGrabber, *, display, recorder,
                 mesh_dir: Path | None, web, headless: bool, stats_interval_s: float,
                 out: TextIO):
        self.stats, self.grabber = stats, grabber
        self.display, self.recorder, self.mesh_dir, self.web = display, recorder, mesh_dir, web
        self.headless, self.stats_interval_s, self.out = headless, stats_interval_s, out
        self.view = VIEWS[0]
        self.last_print = time.perf_counter()

    def handle(self, item: LiveFrame) -> bool:
        """Pass one frame to every output; ``False`` when the user quit."""
        canvas, extra = self._canvas(item)
        self.stats.add(item, extra)
        if self.web is not None:
            self.web.publish(item, self.stats)
        if self.recorder is not None:
            self.recorder.write(canvas)
        if self.mesh_dir is not None:
            _save_frame_meshes(item, self.mesh_dir, "ply")
        if self.display is not None and not self._show(item, canvas):
            return False
        self._print_stats()
        return True

    def _canvas(self, item: LiveFrame) -> tuple[np.ndarray | None, dict[str, float]]:
        """The display canvas and its drawing time, when a window or recording wants it."""
        if self.display is None and self.recorder is None:
            return None, {}
        start = time.perf_counter()
        canvas = compose_view(item.frame.image, item, view=self.view,
                              hud=hud_lines(self.stats, self.view, len(item.result.faces)))
        return canvas, {"render": (time.perf_counter() - start) * 1e3}

    def _show(self, item: LiveFrame, canvas: np.ndarray) -> bool:
        """Show the canvas and act on its key: ``q`` quits (``False``), ``v`` switches
        the view, ``s`` saves the frame's meshes as OBJ."""
        key = self.display.show(canvas)
        if key == "q":
            return False
        if key == "v":
            self.view = VIEWS[(VIEWS.index(self.view) + 1) % len(VIEWS)]
        elif key == "s":
            saved = _save_frame_meshes(item, self.mesh_dir or Path.cwd(), "obj")
            names = ", ".join(map(str, saved)) or "nothing (no face)"
            print(f"[vrn-live] saved {names}", file=self.out, flush=True)
        return True

    def _print_stats(self) -> None:
        now = time.perf_counter()
        if self.headless and now - self.last_print >= self.stats_interval_s:
            print(self.stats.line(self.grabber.frames_dropped), file=self.out, flush=True)
            self.last_print = now


# -------------------------------------------------------------------------------- loop

def run_live(reconstructor, grabber: FrameGrabber, *, detect_every: int = 5,
             headless: bool = False, max_frames: int | None = None,
             record: str | os.PathLike | None = None, record_fps: float | None = None,
             save_meshes: str | os.PathLike | None = None,
             stats_json: str | os.PathLike | None = None, stats_interval_s: float = 2.0,
             web=None, out: TextIO | None = None, pipelined: bool | None = None) -> dict:
    """Run the live loop until the source ends, ``max_frames`` are processed, or the user
    quits (``q``, Esc, Ctrl-C). Returns the summary (see :meth:`LiveStats.summary`).

    Parameters
    ----------
    reconstructor : Reconstructor
        Its detector feeds the tracker; ``all_faces`` decides one face or all.
    grabber : FrameGrabber
        The started capture; stopped on return.
    detect_every : int
        Run the face detector every K frames; in between the faces reconstructed follow
        their landmarks, the others are predicted (see :mod:`vrn.runtime.tracking`).
    headless : bool
        No window: print a stats line every ``stats_interval_s`` seconds.
    max_frames : int, optional
        Stop after this many processed frames.
    record : path, optional
        Write the display canvas to this video (``.mp4``: mp4v, else MJPG) at
        ``record_fps`` (default: the source's rate, else 15).
    save_meshes : path, optional
        Write each frame's meshes as ``frame_<index>[_face<i>].ply`` into this folder
        (and the ``s`` key's snapshots as ``.obj``).
    stats_json : path, optional
        Write the summary plus one record per frame (boxes, mesh sizes, timings).
    web : publisher, optional
        Anything with ``publish(item, stats)`` (the live web view,
        :class:`vrn.viewer.server.WebViewServer`): called on the display thread with
        each :class:`LiveFrame` and the run's :class:`LiveStats`; it must not block.
        The caller starts and closes it.
    pipelined : bool, optional
        Overlap the network of each frame with the isosurface and colours of the one
        before, on two threads (see :class:`_PipelineWorker`): more frames per second
        for a little more latency. Default: on for CPU backends (:func:`pipelined_by_default`),
        off on a GPU, where the mesh takes a fraction of a millisecond.
    """
    out = out or sys.stdout
    mesh_dir = Path(save_meshes) if save_meshes else None
    if mesh_dir is not None:
        mesh_dir.mkdir(parents=True, exist_ok=True)
    tracker = FaceTracker(reconstructor.detector, detect_every=detect_every)
    stats = LiveStats(records=[] if stats_json else None)
    results: queue.Queue = queue.Queue(maxsize=RESULT_QUEUE_SIZE)
    stop = threading.Event()
    if pipelined is None:
        pipelined = pipelined_by_default(reconstructor)
    worker = _PipelineWorker(grabber, tracker, reconstructor, results, stop, max_frames,
                             pipelined=pipelined)
    display = None if headless else _Display()
    with contextlib.ExitStack() as stack:
        recorder = (_Recorder(record, record_fps or grabber.fps or 15.0, stack)
                    if record else None)
        stage = _DisplayStage(stats, grabber, display=display, recorder=recorder,
                              mesh_dir=mesh_dir, web=web, headless=headless,
                              stats_interval_s=stats_interval_s, out=out)
        worker.start()
        try:
            ended = _consume(results, worker, stage)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM under sigterm_as_interrupt
            ended = interrupt_word(exc)
        finally:
            with interrupts_deferred():  # a second Ctrl-C must not cut the clean-up
                stop.set()
                grabber.stop()
                worker.join(timeout=10.0)
                if display is not None:
                    display.close()
                if recorder is not None:
                    recorder.finish()
    if worker.error is not None:  # after the recording was finalised
        raise worker.error
    return _finish(stats, grabber, ended, recorder, stats_json)


def pipelined_by_default(reconstructor) -> bool:
    """Whether :func:`run_live` pipelines ``reconstructor``'s frames by default: when its
    backend runs on the CPU."""
    return not getattr(reconstructor, "on_gpu", False)


def _consume(results: queue.Queue, worker: _PipelineWorker, stage: _DisplayStage) -> str:
    """Hand the worker's results to the display stage until its end marker or the user
    quits; returns why the loop ended."""
    while True:
        try:
            item = results.get(timeout=0.5)
        except queue.Empty:
            continue
        if item is _END:
            return worker.ended
        if not stage.handle(item):
            return "user quit"


def _finish(stats: LiveStats, grabber: FrameGrabber, ended: str, recorder: _Recorder | None,
            stats_json: str | os.PathLike | None) -> dict:
    """The run's summary, also written to ``stats_json`` with the per-frame records."""
    if grabber.error and ended == "source ended":
        ended = f"source ended: {grabber.error}"
    summary = stats.summary(ended=ended, dropped=grabber.frames_dropped,
                            frames_read=grabber.frames_read, reconnects=grabber.reconnects,
                            record=str(recorder.path) if recorder else None,
                            recorded_frames=recorder.frames if recorder else 0)
    if stats_json:
        write_text_atomic(stats_json, json.dumps(summary | {"per_frame": stats.records},
                                                 indent=1))
    return summary


def _save_frame_meshes(item: LiveFrame, folder: Path, fmt: str) -> list[Path]:
    saved = []
    for i, face in enumerate(item.result.faces):
        if face.mesh.is_empty:
            continue
        suffix = "" if i == 0 else f"_face{i}"
        saved.append(save_mesh(face.mesh, folder / f"frame_{item.frame.index:06d}{suffix}.{fmt}"))
    return saved
