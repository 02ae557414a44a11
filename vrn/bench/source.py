"""The frames ``vrn-bench`` times: the ``decode`` stage's input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import VRNError


class FrameSource:
    """Frames for the ``decode`` stage: an image file decoded from its bytes on every
    read, or a video read frame by frame (rewound at its end). Frames are ``(H, W, 3)``
    uint8 RGB."""

    VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")

    def __init__(self, path: str | os.PathLike | None = None):
        import cv2

        from ..image_io import sample_image_path

        self._cv2 = cv2
        self.path = Path(path) if path is not None else sample_image_path()
        if not self.path.is_file():
            raise VRNError(f"{self.path}: source file not found")
        self.kind = "video" if self.path.suffix.lower() in self.VIDEO_SUFFIXES else "image"
        self._capture = None
        if self.kind == "video":
            self._capture = cv2.VideoCapture(str(self.path))
            if not self._capture.isOpened():
                raise VRNError(f"{self.path}: OpenCV cannot open this video")
        else:
            self._bytes = np.fromfile(self.path, dtype=np.uint8)
        self.read()  # fail now, with the file named, if it cannot be decoded

    def read(self) -> np.ndarray:
        cv2 = self._cv2
        if self._capture is not None:
            ok, frame = self._capture.read()
            if not ok:
                self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                ok, frame = self._capture.read()
            if not ok:
                raise VRNError(f"{self.path}: no frame could be read from this video")
        else:
            frame = cv2.imdecode(self._bytes, cv2.IMREAD_COLOR)
            if frame is None:
                raise VRNError(f"{self.path}: not a readable image or video")
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
