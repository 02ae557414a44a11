"""Reading photos into the one layout the pipeline uses: ``(H, W, 3)`` uint8 RGB."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from ..errors import ImageError

MIN_IMAGE_SIDE = 32


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    Grayscale is replicated to three channels, alpha is dropped, 16-bit and float images
    are scaled to 8 bits. Raises :class:`ImageError` for a missing, unreadable or tiny
    image, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    data = np.fromfile(path, dtype=np.uint8)  # cv2.imread cannot report why it failed
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageError(f"{path}: not a readable image")
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3:
        image = image[..., ::-1]  # OpenCV decodes to BGR
    return as_rgb_uint8(image, name=str(path))


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
    return Path(__file__).resolve().parent.parent / "assets" / "astronaut.jpg"


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
