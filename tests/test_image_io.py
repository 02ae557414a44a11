import cv2
import numpy as np
import pytest

from vrn.errors import ImageError
from vrn.image_io import as_rgb_uint8, load_image, sample_image_path


def test_sample_image_is_rgb():
    img = load_image(sample_image_path())
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    # The astronaut's suit is white and the flag behind her is red-dominant on the left.
    assert img[..., 0].mean() > img[..., 2].mean() - 40


@pytest.mark.parametrize("kind", ["gray", "rgba", "u16", "float"])
def test_formats_are_normalised(tmp_path, kind):
    base = load_image(sample_image_path())
    if kind == "gray":
        arr = cv2.cvtColor(base, cv2.COLOR_RGB2GRAY)
        path = tmp_path / "g.png"
        cv2.imwrite(str(path), arr)
    elif kind == "rgba":
        arr = cv2.cvtColor(base, cv2.COLOR_RGB2BGRA)
        path = tmp_path / "a.png"
        cv2.imwrite(str(path), arr)
    elif kind == "u16":
        arr = cv2.cvtColor(base, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257
        path = tmp_path / "w.png"
        cv2.imwrite(str(path), arr)
    else:
        out = as_rgb_uint8(base.astype(np.float32) / 255)
        np.testing.assert_array_equal(out, base)
        return
    img = load_image(path)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    if kind in ("rgba", "u16"):
        np.testing.assert_array_equal(img, base)


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(empty)
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((10, 12, 3), np.uint8))
    with pytest.raises(ImageError, match="12x10"):
        load_image(tiny)
