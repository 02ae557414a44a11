"""Face boxes over a video: detection every K frames, smoothed tracks in between.

Each face is a :class:`Track` whose box is filtered with an alpha-beta filter over the
box centre and size ``(cx, cy, w, h)``: at every frame the state moves by its velocity
(prediction); on a detection frame the state moves ``alpha`` of the way to the matched
detection and the velocity ``beta`` of the way (per frame) to the residual. ``alpha`` near
0 smooths harder (less jitter, more lag); ``beta = 0`` disables motion prediction.

Detections are matched to tracks greedily by IoU with the predicted box (the highest IoU
first, at least ``iou_threshold``). An unmatched detection starts a new track (taken as
is, no smoothing); a track missing from ``max_missed`` detection rounds in a row is
dropped. Boxes are in photo pixels (:class:`~vrn.runtime.detect.FaceBox`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np

from .detect import FaceBox, iou


@dataclass
class Track:
    """One tracked face: ``state`` ``[cx, cy, w, h]`` and ``velocity`` (per frame), both
    float64 photo pixels; ``missed`` counts detection rounds without a match."""

    id: int
    state: np.ndarray
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    score: float = 1.0
    kind: str = "frontal"
    missed: int = 0
    age: int = 0

    @property
    def box(self) -> FaceBox:
        cx, cy, w, h = self.state
        return FaceBox(cx - w / 2, cy - h / 2, w, h, self.score, self.kind)


def _box_state(box: FaceBox) -> np.ndarray:
    cx, cy = box.center
    return np.array([cx, cy, box.w, box.h], dtype=np.float64)


class FaceTracker:
    """Detect every ``detect_every`` frames, track and smooth in between.

    Parameters
    ----------
    detector : callable
        ``detector(image) -> list[FaceBox]`` (see :func:`~vrn.runtime.detect.create_detector`).
    detect_every : int
        Run the detector on every K-th call (always when there are no tracks).
    alpha, beta : float
        Alpha-beta filter gains for position/size and velocity (see the module docstring).
    iou_threshold : float
        Least IoU between a predicted box and a detection for them to match.
    max_missed : int
        Detection rounds a track may go unmatched before it is dropped.
    """

    def __init__(self, detector: Callable[[np.ndarray], list[FaceBox]], *,
                 detect_every: int = 5, alpha: float = 0.6, beta: float = 0.1,
                 iou_threshold: float = 0.3, max_missed: int = 1):
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        if not (0.0 < alpha <= 1.0 and 0.0 <= beta <= 1.0):
            raise ValueError(f"alpha must be in (0, 1] and beta in [0, 1], got {alpha}, {beta}")
        self.detector = detector
        self.detect_every = detect_every
        self.alpha = alpha
        self.beta = beta
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.tracks: list[Track] = []
        self._calls = 0
        self._since_detection = 0
        self._ids = itertools.count()

    def update(self, image: np.ndarray) -> tuple[list[Track], bool]:
        """Advance one frame of ``image`` ``(H, W, 3)`` uint8 RGB.

        Returns ``(tracks, detected)``: the live tracks, largest box first, and whether
        the detector ran on this frame.
        """
        detect = not self.tracks or self._calls % self.detect_every == 0
        self._calls += 1
        self._since_detection += 1
        for track in self.tracks:
            track.state = track.state + track.velocity
            track.age += 1
        if detect:
            self._associate(self.detector(image))
            self._since_detection = 0
        self.tracks.sort(key=lambda t: -t.state[2] * t.state[3])
        return list(self.tracks), detect

    def reset(self) -> None:
        """Forget every track; the next :meth:`update` detects."""
        self.tracks = []
        self._calls = 0

    def _associate(self, detections: list[FaceBox]) -> None:
        pairs = sorted(((iou(t.box, d), ti, di) for ti, t in enumerate(self.tracks)
                        for di, d in enumerate(detections)), reverse=True)
        used_tracks: set[int] = set()
        used_detections: set[int] = set()
        for overlap, ti, di in pairs:
            if overlap < self.iou_threshold:
                break
            if ti in used_tracks or di in used_detections:
                continue
            used_tracks.add(ti)
            used_detections.add(di)
            self._correct(self.tracks[ti], detections[di])
        kept = []
        for ti, track in enumerate(self.tracks):
            if ti not in used_tracks:
                track.missed += 1
                track.velocity = np.zeros(4)
            if track.missed <= self.max_missed:
                kept.append(track)
        for di, det in enumerate(detections):
            if di not in used_detections:
                kept.append(Track(next(self._ids), _box_state(det), score=det.score,
                                  kind=det.kind))
        self.tracks = kept

    def _correct(self, track: Track, detection: FaceBox) -> None:
        residual = _box_state(detection) - track.state
        track.state = track.state + self.alpha * residual
        track.velocity = track.velocity + self.beta * residual / max(self._since_detection, 1)
        track.score = detection.score
        track.kind = detection.kind
        track.missed = 0
