"""A deterministic test clip for live-loop benchmarks: the bundled sample photo, turned
and moved a little in every frame, so the tracker and the detector both have work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_path


def moving_face_video(path: str | os.PathLike, *, frames: int = 120, size: int = 512,
                      fps: float = 30.0) -> Path:
    """Write ``frames`` frames ``(size, size)`` of the sample photo (rotated from -10 to
    +10 degrees, shifted 40 px sideways and bobbing 10 px) as an MJPG ``.avi``."""
    import cv2

    from ..image_io import sample_image_path

    path = Path(path)
    photo = cv2.imread(str(sample_image_path()))
    centre = (size / 2, size / 2)
    with atomic_path(path) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size, size))
        for i in range(frames):
            t = i / max(frames - 1, 1)
            m = cv2.getRotationMatrix2D(centre, -10 + 20 * t, 1.0)
            m[:, 2] += (-20 + 40 * t, 10 * np.sin(2 * np.pi * t))
            writer.write(cv2.warpAffine(photo, m, (size, size), borderMode=cv2.BORDER_REFLECT))
        writer.release()
    return path
