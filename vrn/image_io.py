"""Reading photos into the one layout the pipeline uses: ``(H, W, 3)`` uint8 RGB.

Image files are bounded before anything is decoded: at most :data:`MAX_BYTES` bytes on
disk (environment variable ``VRN_MAX_IMAGE_BYTES``) and :data:`MAX_PIXELS` pixels as the
file header declares them (``VRN_MAX_PIXELS``), so a small "decompression bomb" cannot
take gigabytes of memory.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .errors import ImageError

MIN_IMAGE_SIDE = 32
MAX_PIXELS = 50_000_000
"""Default pixel limit for images and video frames; ``VRN_MAX_PIXELS`` overrides it."""
MAX_BYTES = 200 * 2**20
"""Default size limit of an image file; ``VRN_MAX_IMAGE_BYTES`` overrides it."""


def pixel_limit(max_pixels: int | None = None) -> int:
    """``max_pixels`` if given, else ``$VRN_MAX_PIXELS``, else :data:`MAX_PIXELS`."""
    return _limit(max_pixels, "VRN_MAX_PIXELS", MAX_PIXELS)


def load_image(path: str | os.PathLike, *, max_pixels: int | None = None,
               max_bytes: int | None = None) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB, upright.

    The EXIF orientation (phone photos) is applied. Grayscale is replicated to three
    channels, alpha is dropped, 16-bit and float images are scaled to 8 bits.

    Parameters
    ----------
    path : str or path
        The image file.
    max_pixels : int, optional
        Largest ``width * height`` accepted, checked from the file header before
        decoding (formats Pillow cannot read are checked once OpenCV has decoded them).
        Default ``$VRN_MAX_PIXELS`` or :data:`MAX_PIXELS` (50 megapixels).
    max_bytes : int, optional
        Largest file size accepted, checked before reading. Default
        ``$VRN_MAX_IMAGE_BYTES`` or :data:`MAX_BYTES` (200 MiB).

    Raises :class:`ImageError`, naming the file, for a missing, unreadable, oversized or
    tiny image.
    """
    path = Path(path)
    max_pixels = pixel_limit(max_pixels)
    max_bytes = _limit(max_bytes, "VRN_MAX_IMAGE_BYTES", MAX_BYTES)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"{path}: file is {size} bytes, over the limit of {max_bytes} "
                         "(VRN_MAX_IMAGE_BYTES)")
    _check_header(path, max_pixels)
    try:
        data = np.fromfile(path, dtype=np.uint8)  # cv2.imread cannot report why it failed
        # Unlike IMREAD_UNCHANGED, these flags apply the EXIF orientation; they keep 16-bit
        # and float depth and drop alpha.
        image = (cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
                 if data.size else None)
    except (OSError, cv2.error) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from None
    if image is None:
        raise ImageError(f"{path}: not a readable image")
    _check_pixels(path, image.shape[1], image.shape[0], max_pixels)
    if image.ndim == 3:
        image = image[..., ::-1]  # OpenCV decodes to BGR
    return as_rgb_uint8(image, name=str(path))


def _check_header(path: Path, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels, without
    decoding it. A format Pillow does not know passes: its decoded size is checked."""
    try:
        with warnings.catch_warnings():  # our limit applies, not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as header:  # lazy: reads the header only
                width, height = header.size
    except Image.DecompressionBombError:  # over Pillow's own guard; size not known
        guard = 2 * Image.MAX_IMAGE_PIXELS
        if max_pixels <= guard:
            raise ImageError(f"{path}: image has more than {guard} pixels, over the limit "
                             f"of {max_pixels} (VRN_MAX_PIXELS)") from None
        return  # a limit above Pillow's: the decoded size is checked
    except Image.UnidentifiedImageError:
        return
    except Exception as exc:  # a plugin may raise anything on a corrupt header
        raise ImageError(f"{path}: not a readable image ({exc})") from None
    _check_pixels(path, width, height, max_pixels)


def _check_pixels(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageError(f"{path}: image is {width}x{height} pixels, over the limit of "
                         f"{max_pixels} (VRN_MAX_PIXELS)")


def _limit(value: int | None, env: str, default: int) -> int:
    """``value`` if given, else the environment variable ``env``, else ``default``."""
    if value is None:
        text = os.environ.get(env, "").strip()
        try:
            value = int(text) if text else default
        except ValueError:
            raise ValueError(f"{env}={text!r}: expected a whole number") from None
    if value <= 0:
        raise ValueError(f"{env}: the limit must be positive, got {value}")
    return int(value)


def as_rgb_uint8(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Normalise an RGB(A) or grayscale array to contiguous ``(H, W, 3)`` uint8 RGB.

    Accepts ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` arrays of uint8,
    uint16 (scaled by 1/257) or float (values in [0, 1]).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ImageError(f"{name}: expected an (H, W), (H, W, 3) or (H, W, 4) image, "
                         f"got shape {image.shape}")
    if image.shape[2] == 4:
        image = image[..., :3]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.dtype == np.uint16:
        image = (image.astype(np.uint32) * 255 + 32767) // 65535
    elif image.dtype.kind == "f":
        image = np.clip(np.nan_to_num(image) * 255.0 + 0.5, 0, 255)
    elif image.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {image.dtype}")
    h, w = image.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ImageError(f"{name}: image is {w}x{h} pixels; at least "
                         f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed to find a face")
    return np.ascontiguousarray(image, dtype=np.uint8)


def sample_image_path() -> Path:
    """The bundled sample photo: ``skimage.data.astronaut()`` (public domain, NASA)."""
    return Path(__file__).resolve().parent / "assets" / "astronaut.jpg"


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp",
                            ".pgm", ".ppm"})


def collect_images(inputs) -> tuple[list[Path], list[str]]:
    """Image files among ``inputs`` (folders expanded to their images, sorted) and one
    message per input that is missing or a folder without images."""
    images, problems = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(f"{path}: no images in this folder")
            images.extend(found)
        elif path.exists():
            images.append(path)
        else:
            problems.append(f"{path}: file not found")
    return images, problems
