"""Bounded image input: byte and pixel limits checked before decoding (decompression
bombs), the EXIF orientation of phone photos, and the same pixel limit on video frames."""

from __future__ import annotations

import resource
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from vrn.errors import ImageError
from vrn import image_io
from vrn.runtime.capture import CaptureError, FrameGrabber, open_video_source
from vrn.image_io import MAX_BYTES, MAX_PIXELS, load_image, sample_image_path


def _bomb_png(path, width=30000, height=30000):
    """A valid 1-bit grayscale PNG of ``width x height`` black pixels, ~100 KB on disk
    (decoded by OpenCV as 8-bit RGB it would take gigabytes)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 1000) for _ in range(height // 1000))
    idat += z.compress(row * (height % 1000)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _no_decoding(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the file was read or decoded")
    monkeypatch.setattr(image_io.cv2, "imdecode", refuse)
    monkeypatch.setattr(image_io.np, "fromfile", refuse)


def test_defaults():
    assert MAX_PIXELS == 50_000_000 and MAX_BYTES == 200 * 2**20


@pytest.mark.parametrize("width, height, message", [
    (10000, 10000, r"bomb\.png: image is 10000x10000 pixels, over the limit of 50000000"),
    # Over Pillow's own guard (2 * PIL.Image.MAX_IMAGE_PIXELS): still our ImageError.
    (30000, 30000, r"bomb\.png: image has more than \d+ pixels, over the limit of 50000000"),
])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, monkeypatch, width, height,
                                                        message):
    path = _bomb_png(tmp_path / "bomb.png", width, height)
    assert path.stat().st_size < 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with monkeypatch.context() as m:
        _no_decoding(m)
        with pytest.raises(ImageError, match=message):
            load_image(path)
    assert time.perf_counter() - start < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def test_a_limit_above_pillows_guard_decodes_and_checks(tmp_path, monkeypatch):
    path = _bomb_png(tmp_path / "huge.png", 20000, 10000)  # 2e8 > 2 * MAX_IMAGE_PIXELS
    decoded = []

    def fake_decode(data, flags):
        decoded.append(data.size)
        return np.zeros((10000, 20000), np.uint8)
    monkeypatch.setattr(image_io.cv2, "imdecode", fake_decode)
    with pytest.raises(ImageError, match="huge.png: image is 20000x10000 pixels, over the "
                                         "limit of 190000000"):
        load_image(path, max_pixels=190_000_000)
    assert decoded == [path.stat().st_size]


def test_pixel_limit_argument_and_environment(tmp_path, monkeypatch):
    path = sample_image_path()  # 512 x 512
    assert load_image(path, max_pixels=512 * 512).shape == (512, 512, 3)
    with pytest.raises(ImageError, match="512x512 pixels, over the limit of 262143"):
        load_image(path, max_pixels=512 * 512 - 1)
    monkeypatch.setenv("VRN_MAX_PIXELS", "1000")
    with pytest.raises(ImageError, match="over the limit of 1000"):
        load_image(path)
    assert load_image(path, max_pixels=10**6).shape == (512, 512, 3)  # argument wins
    monkeypatch.setenv("VRN_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="VRN_MAX_PIXELS"):
        load_image(path)


def test_pixel_limit_applies_to_formats_pillow_does_not_know(tmp_path, monkeypatch):
    """A Radiance .hdr is decoded by OpenCV only; its decoded size is checked."""
    path = tmp_path / "x.hdr"
    cv2.imwrite(str(path), np.full((64, 80, 3), 0.5, np.float32))
    with pytest.raises(UnidentifiedImageError):
        Image.open(path)
    assert load_image(path).shape == (64, 80, 3)
    with pytest.raises(ImageError, match="80x64 pixels"):
        load_image(path, max_pixels=1000)


def test_byte_limit(tmp_path, monkeypatch):
    path = sample_image_path()
    size = path.stat().st_size
    assert load_image(path, max_bytes=size).shape == (512, 512, 3)
    with pytest.raises(ImageError, match=f"{size} bytes, over the limit of 1000"):
        load_image(path, max_bytes=1000)
    monkeypatch.setenv("VRN_MAX_IMAGE_BYTES", "1000")
    with pytest.raises(ImageError, match="over the limit of 1000"):
        load_image(path)


def test_huge_file_is_refused_without_reading_it(tmp_path, monkeypatch):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:  # sparse: takes no disk space
        f.write(b"\xff\xd8\xff")
        f.truncate(3 * 2**30)
    _no_decoding(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"huge\.jpg: file is 3221225472 bytes"):
        load_image(path)
    assert time.perf_counter() - start < 1.0


def test_decoder_exceptions_become_image_errors(tmp_path, monkeypatch):
    def fail(*args):
        raise cv2.error("OpenCV refuses")
    monkeypatch.setattr(image_io.cv2, "imdecode", fail)
    with pytest.raises(ImageError, match="astronaut.jpg.*OpenCV refuses"):
        load_image(sample_image_path())
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # truncated header
    with pytest.raises(ImageError, match="corrupt.png"):
        load_image(corrupt)


def _rotated_photo(tmp_path, orientation, suffix=".jpg"):
    """A 40x80 (H x W) photo with a distinct quadrant layout, saved with an EXIF
    orientation tag, and the upright image a viewer shows."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (2, 4, 3)).astype(np.uint8)
    pixels = np.kron(blocks, np.ones((20, 20, 1), np.uint8))  # 40 x 80, flat blocks
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"phone_{orientation}{suffix}"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    return path, pixels


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    """Orientation 6: the camera was turned 90 degrees; viewers rotate clockwise."""
    path, pixels = _rotated_photo(tmp_path, 6, suffix)
    img = load_image(path)
    assert img.shape == (80, 40, 3)
    upright = np.rot90(pixels, -1)  # clockwise
    assert np.abs(img.astype(int) - upright).mean() < 4


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    from PIL import ImageOps
    path, _ = _rotated_photo(tmp_path, orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    img = load_image(path)
    assert img.shape == expected.shape
    assert np.abs(img.astype(int) - expected).mean() < 4


def test_sample_and_16_bit_images_still_load(tmp_path):
    base = load_image(sample_image_path())
    assert base.shape == (512, 512, 3) and base.dtype == np.uint8
    path = tmp_path / "w.png"
    cv2.imwrite(str(path), cv2.cvtColor(base, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    np.testing.assert_array_equal(load_image(path), base)


class _BigCamera:
    def __init__(self, shape):
        self.shape = shape
        self.released = False

    def read(self):
        return True, np.zeros(self.shape, np.uint8)

    def get(self, prop):
        return 30.0

    def release(self):
        self.released = True


def test_capture_frames_over_the_pixel_limit_end_the_grabber():
    camera = _BigCamera((60, 80, 3))
    grabber = FrameGrabber("big", opener=lambda: camera, reconnect=True, max_pixels=4000)
    assert grabber.get(timeout=5.0) is None and grabber.ended
    assert grabber.error == "big: frames are 80x60 pixels, over the limit of 4000 (VRN_MAX_PIXELS)"
    assert grabber.reconnects == 0 and camera.released
    ok = FrameGrabber("ok", opener=lambda: _BigCamera((60, 80, 3)), max_pixels=4800)
    frame = ok.get(timeout=5.0)
    ok.stop()
    assert frame is not None and frame.image.shape == (60, 80, 3)


def test_capture_checks_the_reported_frame_size_when_opening(tmp_path, monkeypatch):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    with pytest.raises(CaptureError, match="frames are 64x48 pixels, over the limit of 3000"):
        open_video_source(str(path), max_pixels=3000)
    monkeypatch.setenv("VRN_MAX_PIXELS", "3000")
    with pytest.raises(CaptureError, match="over the limit of 3000"):
        FrameGrabber(str(path))
    monkeypatch.delenv("VRN_MAX_PIXELS")
    with FrameGrabber(str(path)) as grabber:
        frames = list(grabber)
    assert len(frames) == 3 and frames[0].image.shape == (48, 64, 3)
