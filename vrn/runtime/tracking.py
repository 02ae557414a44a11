"""Face boxes over a video: detection every K frames, the faces' landmarks followed in
between (as 3DDFA_V2 tracks on video).

Each face is a :class:`Track`: a box state ``(cx, cy, w, h)`` and its velocity (per
frame), in photo pixels (:class:`~vrn.runtime.detect.FaceBox`). At every frame the state
moves by its velocity (prediction).

**Detection frames.** Detections are matched to tracks greedily by IoU with the
predicted box (the highest IoU first, at least ``iou_threshold``). A matched track's
state moves ``alpha`` of the way to the detection and its velocity ``beta`` of the way
(per frame since the track was last measured) to the residual: an alpha-beta filter;
``alpha`` near 0 smooths harder (less jitter, more lag), ``beta = 0`` disables motion
prediction. An unmatched detection starts a new track (taken as is); a track missing
from ``max_missed`` detection rounds in a row is dropped.

**Landmarks** (:meth:`FaceTracker.track_landmarks`, on the tracks reconstructed):

- *Crop*: between detections, a track with landmarks in the frame before is cropped
  around them (:func:`~vrn.runtime.landmarks.landmarks_to_crop_box`). Otherwise (a
  detection frame, a track not reconstructed in the frame before) the landmark stage
  starts from the box, as on a photo: the detection matched in this frame, else the
  track's box.
- *Box*: a track keeps the relation of its box to its landmark crop box
  (``Track.box_in_crop``: the box centre's offset from the crop box centre and the box
  size, in units of the crop box side). Each matched detection measures the relation
  anew and it moves ``alpha`` of the way there (a track without one takes it as is).
  In every frame with usable landmarks the box is the landmark crop box mapped through
  the relation: it follows the face without lag, stays in the detector's convention
  (so IoU matching at the next detection sees no jump), and the detector's jitter is
  smoothed in the relation, which does not lag with motion. The velocity moves
  ``beta`` of the way to the residual, for the frames in which the track is predicted.
- *Lost*: landmarks that are not finite, whose crop box side is under
  :data:`MIN_CROP_SIDE` px, of which under :data:`MIN_VISIBLE` lie inside the photo, or
  (when followed from the landmarks before) whose crop box is more than
  :data:`MAX_SIZE_CHANGE` times larger or smaller than the last one found from a box,
  never become a box: the face is left out of the frame, and the next frame detects.
  A lost track the detector does not find again ends there (whatever ``max_missed``).
  A face leaving the photo ends so: the landmark regressor fits a shrinking face into
  the part of the crop still inside the photo.

Tracks that are not reconstructed (with one face only, all but the largest) are only
predicted between detections.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np

from .detect import FaceBox, iou
from .landmarks import landmarks_to_crop_box

# The lost-track rule (see the module docstring). A face's crop box is sqrt(2) times
# the side of its landmarks' extent. Between two detections (5 frames by default, 1/6 s
# at 30 FPS) a face hardly changes size by 30%, while landmarks that lose the face (it
# leaves the photo, or the crop slid off it) shrink or grow frame after frame.
MIN_CROP_SIDE = 8.0
MIN_VISIBLE = 0.5
MAX_SIZE_CHANGE = 1.3


@dataclass
class Track:
    """One tracked face: ``state`` ``[cx, cy, w, h]`` and ``velocity`` (per frame), both
    float64 photo pixels; ``missed`` counts detection rounds without a match,
    ``unmeasured`` the frames since the state was last measured (by a detection or
    landmarks); ``detection`` is the detection matched in this frame, if any.

    Landmark tracking (see the module docstring): ``landmarks`` ``(68, 3)`` float32
    photo pixels ``(x, y, z)`` found in this frame (``None`` until
    :meth:`FaceTracker.track_landmarks` ran on the track in this frame); ``crop_box``
    ``(4,)`` float64 ``(x0, y0, x1, y1)``, this frame's landmark crop box from the
    landmarks of the frame before (``None``: the landmark stage starts from a box);
    ``box_in_crop`` ``(4,)`` float64 ``[dx, dy, w, h]``, the relation of the box to the
    landmark crop box; ``anchored_side`` the side (px) of the last landmark crop box
    found from a box; ``lost``: the landmarks failed, the next frame detects.
    """

    id: int
    state: np.ndarray
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4))
    score: float = 1.0
    kind: str = "frontal"
    missed: int = 0
    age: int = 0
    unmeasured: int = 0
    detection: FaceBox | None = None
    landmarks: np.ndarray | None = None
    crop_box: np.ndarray | None = None
    box_in_crop: np.ndarray | None = None
    anchored_side: float = 0.0
    lost: bool = False

    @property
    def box(self) -> FaceBox:
        cx, cy, w, h = self.state
        return FaceBox(cx - w / 2, cy - h / 2, w, h, self.score, self.kind)


def _box_state(box: FaceBox) -> np.ndarray:
    cx, cy = box.center
    return np.array([cx, cy, box.w, box.h], dtype=np.float64)


class FaceTracker:
    """Detect every ``detect_every`` frames, track between (landmarks for the faces
    reconstructed, box prediction for the rest) and smooth.

    Parameters
    ----------
    detector : callable
        ``detector(image) -> list[FaceBox]`` (see :func:`~vrn.runtime.detect.create_detector`).
    detect_every : int
        Run the detector every K-th frame since the last detection (and whenever there
        are no tracks or one was lost).
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
        self._since_detection = 0
        self._ids = itertools.count()

    def update(self, image: np.ndarray) -> tuple[list[Track], bool]:
        """Advance one frame of ``image`` ``(H, W, 3)`` uint8 RGB.

        Returns ``(tracks, detected)``: the live tracks, largest box first, and whether
        the detector ran on this frame. Call :meth:`track_landmarks` on the ones to
        reconstruct for them to follow their landmarks into the next frame.
        """
        self._since_detection += 1
        detect = (not self.tracks or self._since_detection >= self.detect_every
                  or any(t.lost for t in self.tracks))
        for track in self.tracks:
            track.state = track.state + track.velocity
            track.age += 1
            track.unmeasured += 1
            follow = not detect and track.landmarks is not None
            track.crop_box = landmarks_to_crop_box(track.landmarks) if follow else None
            track.landmarks = None
            track.detection = None
        if detect:
            self._associate(self.detector(image))
            self._since_detection = 0
        self.tracks.sort(key=lambda t: -t.state[2] * t.state[3])
        return list(self.tracks), detect

    def track_landmarks(self, image: np.ndarray, tracks: list[Track], landmark_stage
                        ) -> tuple[list[Track], np.ndarray]:
        """Find this frame's landmarks of ``tracks`` (some or all of :meth:`update`'s)
        and follow them: each track's crop comes from its landmarks of the frame before
        where it has them, else from a box, and its box moves with the new landmarks
        (see the module docstring).

        ``image`` ``(H, W, 3)`` uint8 RGB; ``landmark_stage`` a
        :class:`~vrn.runtime.landmarks.LandmarkStage`. Returns ``(kept, landmarks)``:
        the tracks whose landmarks are usable, in order, and their landmarks ``(M, 68,
        3)`` float32 photo pixels ``(x, y, z)``. The others are lost: left out, and the
        next frame detects.
        """
        landmarks = np.zeros((len(tracks), 68, 3), np.float32)
        from_box = [i for i, t in enumerate(tracks) if t.crop_box is None]
        followed = [i for i, t in enumerate(tracks) if t.crop_box is not None]
        if from_box:
            boxes = [tracks[i].box if tracks[i].detection is None else tracks[i].detection
                     for i in from_box]
            landmarks[from_box] = landmark_stage(image, boxes)
        if followed:
            landmarks[followed] = landmark_stage.from_crop_boxes(
                image, np.stack([tracks[i].crop_box for i in followed]))
        kept = [i for i, (track, points) in enumerate(zip(tracks, landmarks))
                if self._follow(track, points, image.shape[:2])]
        return [tracks[i] for i in kept], landmarks[kept]

    def reset(self) -> None:
        """Forget every track; the next :meth:`update` detects."""
        self.tracks = []
        self._since_detection = 0

    def _follow(self, track: Track, landmarks: np.ndarray, photo_shape: tuple[int, int]
                ) -> bool:
        """Move ``track`` to its ``landmarks`` ``(68, 3)`` of this frame; ``False`` (and
        the track lost) when they are unusable."""
        followed = track.crop_box is not None
        crop_box = usable_crop_box(landmarks, photo_shape,
                                   track.anchored_side if followed else None)
        if crop_box is None:
            track.lost = True
            return False
        side = crop_box[2] - crop_box[0]
        centre = (crop_box[:2] + crop_box[2:]) / 2.0
        if not followed:
            track.anchored_side = side
        if track.detection is not None or track.box_in_crop is None:
            measured = track.state if track.detection is None else _box_state(track.detection)
            relation = np.array([*(measured[:2] - centre), *measured[2:]]) / side
            track.box_in_crop = relation if track.box_in_crop is None else \
                track.box_in_crop + self.alpha * (relation - track.box_in_crop)
        dx, dy, w, h = track.box_in_crop * side
        box = np.array([centre[0] + dx, centre[1] + dy, w, h])
        if track.unmeasured:  # not measured by a detection in this frame
            track.velocity = track.velocity + self.beta * (box - track.state) / track.unmeasured
        track.state = box
        track.unmeasured = 0
        track.landmarks = landmarks
        return True

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
            if track.missed <= self.max_missed and not (track.lost and ti not in used_tracks):
                kept.append(track)
        for di, det in enumerate(detections):
            if di not in used_detections:
                kept.append(Track(next(self._ids), _box_state(det), score=det.score,
                                  kind=det.kind, detection=det))
        self.tracks = kept

    def _correct(self, track: Track, detection: FaceBox) -> None:
        residual = _box_state(detection) - track.state
        track.state = track.state + self.alpha * residual
        track.velocity = track.velocity + self.beta * residual / max(track.unmeasured, 1)
        track.score = detection.score
        track.kind = detection.kind
        track.missed = 0
        track.unmeasured = 0
        track.lost = False
        track.detection = detection


def usable_crop_box(landmarks: np.ndarray, photo_shape: tuple[int, int],
                    reference_side: float | None = None) -> np.ndarray | None:
    """The landmark crop box ``(x0, y0, x1, y1)`` float64 of ``landmarks`` ``(68, 3)``
    photo pixels, or ``None`` when they are unusable for tracking: not finite, a crop box
    under :data:`MIN_CROP_SIDE` px, under :data:`MIN_VISIBLE` of them inside the photo
    ``(H, W)``, or a crop box side more than :data:`MAX_SIZE_CHANGE` times larger or
    smaller than ``reference_side`` (px)."""
    landmarks = np.asarray(landmarks, np.float64)
    if not np.isfinite(landmarks).all():
        return None
    crop_box = landmarks_to_crop_box(landmarks)
    side = crop_box[2] - crop_box[0]
    if side < MIN_CROP_SIDE:
        return None
    h, w = photo_shape
    x, y = landmarks[:, 0], landmarks[:, 1]
    if np.mean((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)) < MIN_VISIBLE:
        return None
    if reference_side is not None and not (
            1.0 / MAX_SIZE_CHANGE <= side / reference_side <= MAX_SIZE_CHANGE):
        return None
    return crop_box
