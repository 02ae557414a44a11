import threading

import numpy as np
import pytest

from vrn.errors import VRNError
from vrn.runtime import create_detector, load_image
from vrn.runtime.detect import DEFAULT_MODEL, FaceBox, YuNetFaceDetector, iou

# Faces per development photo. emma.jpg is three portraits side by side, and the first
# has a blurred, half-hidden face behind her head (the weakest true face, score ~0.69).
PHOTO_FACES = {"1.jpg": 1, "2.jpg": 1, "3.jpg": 1, "emma.jpg": 4, "multi-4faces.png": 4}


@pytest.fixture(scope="module")
def detector():
    return create_detector()


def test_shipped_model_is_the_default(detector):
    assert isinstance(detector, YuNetFaceDetector)
    assert detector.model_path == DEFAULT_MODEL and DEFAULT_MODEL.is_file()


def test_finds_the_astronaut(detector, sample_image):
    boxes = detector(sample_image)
    assert len(boxes) == 1
    box = boxes[0]
    assert iou(box, FaceBox(177, 66, 95, 95)) > 0.6  # the face, by hand
    assert box.kind == "yunet" and 0.6 <= box.score <= 1
    # Five landmarks: the eyes above the nose above the mouth, right eye on the left.
    (rex, rey), (lex, ley), (nx, ny), (rmx, rmy), (lmx, lmy) = box.points
    assert rex < nx < lex and rmx < nx < lmx
    assert max(rey, ley) < ny < min(rmy, lmy)
    assert all(box.x <= x <= box.x + box.w and box.y <= y <= box.y + box.h
               for x, y in box.points)
    hash(box)  # frozen and hashable, points included


def test_facebox_without_points():
    box = FaceBox(1, 2, 3, 4, 0.5, "frontal")
    assert box.points is None and box.center == (2.5, 4.0)
    assert box == FaceBox(1, 2, 3, 4, 0.5, "frontal")


def test_no_face_in_blank_or_noise(detector):
    rng = np.random.default_rng(0)
    assert detector(np.full((240, 320, 3), 128, np.uint8)) == []
    assert detector(np.zeros((480, 640, 3), np.uint8)) == []
    assert detector(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) == []
    assert detector(rng.integers(0, 256, (100, 90, 3), dtype=np.uint8)) == []


def test_thin_images_give_no_garbage(detector):
    """OpenCV's YuNet returns score-1 boxes of non-finite or zero size for images with a
    side of 32 px or less; those must not come through."""
    rng = np.random.default_rng(1)
    for h, w in [(1, 500), (3, 500), (8, 1000), (16, 1000), (32, 1000), (24, 100)]:
        for image in (np.full((h, w, 3), 100, np.uint8),
                      rng.integers(0, 256, (h, w, 3), dtype=np.uint8)):
            assert detector(image) == [], (h, w)
            assert detector(np.ascontiguousarray(image.transpose(1, 0, 2))) == [], (w, h)


@pytest.mark.parametrize("shape", [(120, 100), (120, 100, 1), (120, 100, 2), (120, 100, 4),
                                   (8, 8, 3), (8, 8), (1, 1, 3), (0, 0, 3)])
def test_any_channel_count_or_tiny_size(detector, shape):
    assert detector(np.full(shape, 90, np.uint8)) == []


def test_gray_rgba_uint16_and_float_find_the_face(detector, sample_image):
    gray = sample_image.mean(2).astype(np.uint8)
    rgba = np.concatenate([sample_image, np.full_like(sample_image[..., :1], 255)], 2)
    for image in (gray, gray[..., None], np.stack([gray, gray], 2), rgba,
                  sample_image.astype(np.uint16) * 257, sample_image / 255.0):
        boxes = detector(image)
        assert len(boxes) == 1 and iou(boxes[0], FaceBox(177, 66, 95, 95)) > 0.6


def test_bad_image_shape_is_a_vrn_error(detector):
    with pytest.raises(VRNError, match="shape"):
        detector(np.zeros((10, 10, 5), np.uint8))
    with pytest.raises(VRNError, match="pixel type"):
        detector(np.zeros((10, 10, 3), np.int32))


def test_boxes_are_in_photo_pixels_after_resizing(detector, sample_image):
    """Photos are shrunk (over 1280 px) or enlarged (under 160 px) for detection; the
    box comes back in the photo's pixels."""
    ref = detector(sample_image)[0]
    import cv2

    for size in (3000, 140):
        scale = size / 512
        image = cv2.resize(sample_image, (size, size), interpolation=cv2.INTER_LINEAR)
        box = detector(image)[0]
        scaled = FaceBox(ref.x * scale, ref.y * scale, ref.w * scale, ref.h * scale)
        assert iou(box, scaled) > 0.8, size
        np.testing.assert_allclose(np.array(box.points) / scale, ref.points,
                                   atol=0.15 * ref.w)  # 14 px; 4 px in the 140 px photo


def test_thread_safe(detector, sample_image, shared_data):
    """One detector shared by 4 threads gives the same boxes as serial calls (a shared
    cv2.FaceDetectorYN gives wrong boxes, or crashes)."""
    images = [sample_image, load_image(shared_data / "photos" / "multi-4faces.png"),
              load_image(shared_data / "photos" / "3.jpg")]
    serial = [detector(image) for image in images]
    errors, barrier = [], threading.Barrier(4)

    def work(k):
        barrier.wait()
        for i in range(12):
            j = (i + k) % len(images)
            if detector(images[j]) != serial[j]:
                errors.append((k, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("name", sorted(PHOTO_FACES))
def test_photo_face_counts(detector, shared_data, name):
    boxes = detector(load_image(shared_data / "photos" / name))
    assert len(boxes) == PHOTO_FACES[name], [round(b.score, 3) for b in boxes]


def test_every_aflw_sample_has_one_face(detector, shared_data):
    paths = sorted((shared_data / "aflw2000-sample").glob("*.jpg"))
    assert paths
    for path in paths:
        assert len(detector(load_image(path))) == 1, path.name


def test_missing_model_file(tmp_path):
    with pytest.raises(VRNError, match="YuNet model file not found"):
        create_detector(tmp_path / "yunet.onnx")


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all" * 10])
def test_corrupt_model_file(tmp_path, content):
    path = tmp_path / "yunet.onnx"
    path.write_bytes(content)
    with pytest.raises(VRNError, match=r"yunet\.onnx: not a YuNet ONNX model"):
        create_detector(path)


def test_truncated_model_file(tmp_path):
    path = tmp_path / "yunet.onnx"
    path.write_bytes(DEFAULT_MODEL.read_bytes()[:50_000])
    with pytest.raises(VRNError, match="not a YuNet ONNX model"):
        create_detector(path)


def test_threshold_is_checked_and_used(sample_image):
    with pytest.raises(ValueError, match="score_threshold"):
        create_detector(score_threshold=1.5)
    assert create_detector(score_threshold=0.99)(sample_image) == []
    assert len(create_detector(score_threshold=0.05)(sample_image)) > 1


def test_cli_flags():
    from vrn.cli.live import build_parser as live_parser
    from vrn.cli.reconstruct import build_parser as reconstruct_parser
    from vrn.runtime.detect import DEFAULT_SCORE_THRESHOLD

    args = reconstruct_parser().parse_args(["-o", "out", "--detector-model", "m.onnx",
                                            "--detector-threshold", "0.4"])
    assert (args.detector_model, args.detector_threshold) == ("m.onnx", 0.4)
    assert reconstruct_parser().parse_args(["-o", "o"]).detector_threshold == \
        DEFAULT_SCORE_THRESHOLD
    assert reconstruct_parser().parse_args(["-o", "o", "--yunet", "y.onnx"]).detector_model \
        == "y.onnx"  # the old flag, hidden
    live = live_parser()
    assert live.parse_args(["--detector-model", "m.onnx"]).detector_model == "m.onnx"
    assert f"default {DEFAULT_SCORE_THRESHOLD}" in " ".join(live.format_help().split())


def test_shared_reconstructor_gives_serial_boxes(small_checkpoint, sample_image, shared_data):
    """A Reconstructor shared by 4 threads: the same boxes as one thread."""
    from concurrent.futures import ThreadPoolExecutor

    from vrn.runtime.pipeline import Reconstructor

    recon = Reconstructor(small_checkpoint, all_faces=True)
    images = [sample_image, load_image(shared_data / "photos" / "multi-4faces.png")]
    serial = [[f.box for f in recon(image).faces] for image in images]
    assert [len(s) for s in serial] == [1, 4]
    jobs = [i % 2 for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: [f.box for f in recon(images[i]).faces], jobs))
    assert results == [serial[i] for i in jobs]
