"""The face tracker (vrn.runtime.tracking): alpha-beta smoothing of detections, IoU
association, and the landmarks followed between detections, with a fake detector and a
fake landmark stage over a synthetic moving face."""

from __future__ import annotations

import numpy as np
import pytest

from vrn.runtime.detect import FaceBox
from vrn.runtime.landmarks import landmarks_to_crop_box
from vrn.runtime.tracking import MAX_SIZE_CHANGE, FaceTracker

PHOTO = np.zeros((240, 400, 3), np.uint8)
# 68 points whose extent is exactly 60 px square around the face centre.
_TEMPLATE = np.random.default_rng(0).uniform(-30, 30, (68, 3))
_TEMPLATE[:2, :2] = [[-30, -30], [30, 30]]


class MovingFace:
    """One face moving ``speed`` px per frame along x from (100, 120): a fake detector
    and a fake landmark stage that answer for frame :attr:`frame` and record their
    calls. The detector's box sits 8 px higher than the landmarks' centre and is taller
    than wide (YuNet boxes include the forehead). ``bad`` maps a frame to the landmarks
    the stage returns then instead; from frame ``leaves_at`` on the detector finds
    nothing."""

    def __init__(self, speed: float = 10.0, *, leaves_at: int | None = None):
        self.speed, self.leaves_at = speed, leaves_at
        self.frame = 0
        self.detections = 0
        self.bad: dict[int, np.ndarray] = {}
        self.from_boxes: list[list[FaceBox]] = []
        self.crop_boxes: list[np.ndarray] = []

    def centre(self, i: int) -> np.ndarray:
        return np.array([100.0 + self.speed * i, 120.0])

    def true_box(self, i: int) -> np.ndarray:
        """``[cx, cy, w, h]`` of the detector's box in frame ``i``."""
        cx, cy = self.centre(i)
        return np.array([cx, cy - 8.0, 60.0, 72.0])

    def landmarks(self, i: int) -> np.ndarray:
        return (_TEMPLATE + [*self.centre(i), 0.0]).astype(np.float32)

    def detector(self, image) -> list[FaceBox]:
        self.detections += 1
        if self.leaves_at is not None and self.frame >= self.leaves_at:
            return []
        cx, cy, w, h = self.true_box(self.frame)
        return [FaceBox(cx - w / 2, cy - h / 2, w, h, 0.9)]

    def _answer(self, n: int) -> np.ndarray:
        points = self.bad.get(self.frame, self.landmarks(self.frame))
        return np.stack([points] * n).astype(np.float32)

    def __call__(self, image, boxes):
        self.from_boxes.append(list(boxes))
        return self._answer(len(boxes))

    def from_crop_boxes(self, image, crop_boxes):
        self.crop_boxes.append(np.asarray(crop_boxes))
        return self._answer(len(crop_boxes))


def run(tracker: FaceTracker, face: MovingFace, frames, *, follow: bool = True):
    """Track ``face`` over ``frames`` (indices, or a count from 0), the largest track
    reconstructed (its landmarks followed unless not ``follow``). Per frame: (that
    track's state, or None when none is left; whether the tracker detected)."""
    out = []
    for i in range(frames) if isinstance(frames, int) else frames:
        face.frame = i
        tracks, detected = tracker.update(PHOTO)
        if follow:
            tracks, _ = tracker.track_landmarks(PHOTO, tracks[:1], face)
        out.append((tracks[0].state.copy() if tracks else None, detected))
    return out


def test_boxes_follow_the_landmarks_between_detections():
    face = MovingFace(speed=10.0)
    tracker = FaceTracker(face.detector, detect_every=10)
    states = run(tracker, face, 20)
    assert [d for _, d in states] == [i % 10 == 0 for i in range(20)]
    assert face.detections == 2
    for i, (state, _) in enumerate(states):
        # The box keeps the detector's convention (8 px above the landmarks, 60x72) and
        # sits on the face in every frame: no lag at 10 px per frame.
        np.testing.assert_allclose(state, face.true_box(i), atol=1e-6, err_msg=str(i))
    # Detection frames crop from the detection; the others around the landmarks of the
    # frame before.
    assert len(face.from_boxes) == 2 and len(face.crop_boxes) == 18
    for i, (box,) in zip((0, 10), face.from_boxes):   # the detector's box, not smoothed
        np.testing.assert_allclose([*box.center, box.w, box.h], face.true_box(i))
    followed = [i for i in range(20) if i % 10]
    for i, crop_box in zip(followed, face.crop_boxes):
        np.testing.assert_allclose(crop_box[0], landmarks_to_crop_box(face.landmarks(i - 1)))

    # The alpha-beta prediction alone stands still until the next detection.
    face = MovingFace(speed=10.0)
    predicted = run(FaceTracker(face.detector, detect_every=10), face, 10, follow=False)
    assert abs(predicted[9][0][0] - face.true_box(9)[0]) > 80


def test_detector_jitter_is_smoothed_in_the_box_to_landmarks_relation():
    """A detection that is off by a few pixels moves the box only ``alpha`` of the way
    there, and the box still follows the landmarks after it."""
    face = MovingFace(speed=10.0)
    tracker = FaceTracker(face.detector, detect_every=5, alpha=0.5)
    run(tracker, face, 5)
    tracker.detector = lambda image: [FaceBox(b.x + 4, b.y, b.w, b.h)
                                      for b in face.detector(image)]
    states = run(tracker, face, range(5, 7))
    assert [d for _, d in states] == [True, False]
    for i, (state, _) in zip((5, 6), states):
        np.testing.assert_allclose(state[0] - face.true_box(i)[0], 2.0, atol=1e-6)


@pytest.mark.parametrize("bad", ["nan", "off photo", "collapsed", "grown", "shrunk"])
def test_unusable_landmarks_lose_the_track_and_detection_takes_over(bad):
    face = MovingFace(speed=5.0)
    points = face.landmarks(3)
    face.bad[3] = {"nan": np.where(np.arange(68)[:, None] == 7, np.nan, points),
                   "off photo": points + [500.0, 0.0, 0.0],
                   "collapsed": np.repeat(points[:1], 68, axis=0),
                   "grown": (points - points.mean(0)) * MAX_SIZE_CHANGE * 1.1 + points.mean(0),
                   "shrunk": (points - points.mean(0)) / MAX_SIZE_CHANGE / 1.1
                   + points.mean(0)}[bad]
    tracker = FaceTracker(face.detector, detect_every=10)
    states = run(tracker, face, 6)
    assert states[3][0] is None                        # no box from those landmarks
    assert [d for _, d in states] == [True, False, False, False, True, False]
    (track,) = tracker.tracks                          # found again: the same track
    assert track.id == 0 and not track.lost
    np.testing.assert_allclose(states[5][0], face.true_box(5), atol=1e-6)


def test_a_face_leaving_the_photo_ends_its_track():
    """Landmarks off the photo, then no detection: the track ends at once (although
    ``max_missed`` would hold an undetected track for a round), and frames without
    a face go through."""
    face = MovingFace(speed=10.0, leaves_at=4)
    face.bad[3] = face.landmarks(3) + [400.0, 0.0, 0.0]
    tracker = FaceTracker(face.detector, detect_every=10, max_missed=1)
    states = run(tracker, face, 8)
    assert [s is not None for s, _ in states] == [True] * 3 + [False] * 5
    assert [d for _, d in states] == [True, False, False, False] + [True] * 4
    assert tracker.tracks == []


def test_tracks_not_reconstructed_are_predicted():
    """With one face reconstructed, a second (smaller) track only follows its
    prediction between detections: its landmarks are never asked for."""
    big, small = MovingFace(speed=10.0), FaceBox(300, 20, 30, 30)
    tracker = FaceTracker(lambda image: big.detector(image) + [small], detect_every=5)
    for i in range(5):
        big.frame = i
        tracks, _ = tracker.update(PHOTO)
        assert len(tracks) == 2
        kept, landmarks = tracker.track_landmarks(PHOTO, tracks[:1], big)
        assert [t.id for t in kept] == [tracks[0].id] and landmarks.shape == (1, 68, 3)
        np.testing.assert_allclose(tracks[1].state, [315, 35, 30, 30])
        assert tracks[1].crop_box is None and tracks[1].landmarks is None
    assert sum(len(b) for b in big.from_boxes) == 1 and len(big.crop_boxes) == 4


def test_no_faces_and_no_tracks():
    tracker = FaceTracker(lambda image: [], detect_every=3)
    for _ in range(3):
        tracks, detected = tracker.update(PHOTO)
        assert tracks == [] and detected               # no tracks: detect every frame
        kept, landmarks = tracker.track_landmarks(PHOTO, tracks, MovingFace())
        assert kept == [] and landmarks.shape == (0, 68, 3)


def test_tracker_smooths_jitter_and_detects_every_k():
    rng = np.random.default_rng(0)
    truth = [np.array([100.0 + 2 * i, 80.0, 60.0, 60.0]) for i in range(30)]
    frame = [0]

    def detector(image):
        cx, cy, w, h = truth[frame[0]] + rng.normal(0, 3, 4)
        return [FaceBox(cx - w / 2, cy - h / 2, w, h)]

    tracker = FaceTracker(detector, detect_every=1, alpha=0.4, beta=0.1)
    smooth_err = []
    for i in range(30):
        frame[0] = i
        tracks, detected = tracker.update(None)
        assert detected and len(tracks) == 1 and tracks[0].id == 0
        if i >= 10:
            smooth_err.append(np.abs(tracks[0].state - truth[i]).mean())
    # Raw detections are off by 3 * sqrt(2 / pi) = 2.4 px on average; the moving track
    # is followed (no lag from the constant velocity) with less error than that.
    assert np.mean(smooth_err) < 1.8

    calls = []
    tracker = FaceTracker(lambda image: calls.append(1) or [FaceBox(10, 10, 50, 50)],
                          detect_every=4)
    detected = [tracker.update(None)[1] for _ in range(9)]
    assert detected == [True, False, False, False, True, False, False, False, True]
    assert len(calls) == 3


def test_tracker_associates_by_iou_and_drops_lost_faces():
    boxes = {"a": FaceBox(0, 0, 50, 50), "b": FaceBox(200, 0, 80, 80)}
    seen = [[boxes["a"], boxes["b"]], [boxes["b"]], [], [boxes["a"]]]
    tracker = FaceTracker(lambda image: seen.pop(0), detect_every=1, max_missed=1)
    first, _ = tracker.update(None)
    assert [t.id for t in first] == [1, 0]                 # largest first
    second, _ = tracker.update(None)
    assert sorted(t.id for t in second) == [0, 1]          # "a" missed once: kept
    third, _ = tracker.update(None)
    assert [t.id for t in third] == [1]                    # "a" missed twice: dropped
    fourth, _ = tracker.update(None)
    assert sorted(t.id for t in fourth) == [2]             # "a" is a new track now
    with pytest.raises(ValueError, match="detect_every"):
        FaceTracker(lambda image: [], detect_every=0)
