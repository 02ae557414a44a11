import numpy as np
import pytest

from vrn.runtime import create_detector, load_image
from vrn.runtime.detect import FaceBox, iou, non_max_suppression


def test_haar_finds_the_astronaut(sample_image):
    boxes = create_detector()(sample_image)
    assert boxes, "no face found in the sample photo"
    best = boxes[0]
    assert iou(best, FaceBox(177, 66, 95, 95)) > 0.6


def test_no_face_in_a_flat_image():
    assert create_detector()(np.full((240, 320, 3), 128, np.uint8)) == []


def test_non_max_suppression_keeps_the_best():
    a, b, c = FaceBox(0, 0, 10, 10, 3.0), FaceBox(1, 1, 10, 10, 5.0), FaceBox(50, 50, 10, 10, 1.0)
    assert non_max_suppression([a, b, c]) == [b, c]


def test_small_faces_in_a_small_photo(shared_data):
    image = load_image(shared_data / "photos" / "multi-4faces.png")
    assert len(create_detector()(image)) >= 3


def test_yunet_needs_its_model_file(tmp_path):
    from vrn.errors import VRNError

    with pytest.raises(VRNError, match="YuNet model file not found"):
        create_detector(tmp_path / "yunet.onnx")
