"""The per-frame pipeline, as a plain sequence of named, timed stages:

``detect`` faces -> ``crop`` each to 192x192 -> ``infer`` the volumes (one batch) ->
``isosurface`` (marching cubes at 0.5) -> ``colour`` (vertex colours from the crop, and
vertices mapped from crop voxels back to photo pixels).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import NoFaceError
from ..kernels import marching_cubes, transform_vertices, vertex_colors
from .crop import box_crop_matrix, invert_affine, to_network_input, warp_crop
from .detect import FaceBox, create_detector
from .image_io import as_rgb_uint8
from .mesh import FaceMesh
from .timing import StageTimer

STAGES = ("detect", "crop", "infer", "isosurface", "colour")


@dataclass
class FaceResult:
    """One reconstructed face.

    ``mesh``: vertices ``(V, 3)`` float32 ``(x, y, z)`` in photo pixels (x right, y down,
    z toward the camera, in photo pixels), faces ``(F, 3)`` int32, colours ``(V, 3)``
    uint8 RGB; empty when the volume has no surface at the level. ``box``: the detection.
    ``photo_to_crop``: the 2x3 affine from photo pixels to crop pixels. ``crop``: the
    ``(S, S, 3)`` uint8 RGB crop the network saw.
    """

    box: FaceBox
    mesh: FaceMesh
    photo_to_crop: np.ndarray
    crop: np.ndarray


@dataclass
class FrameResult:
    """All faces of one frame and the frame's per-stage milliseconds."""

    faces: list[FaceResult]
    timings_ms: dict[str, float] = field(default_factory=dict)


class Reconstructor:
    """Photo in, coloured face meshes out.

    Parameters
    ----------
    weights : path or None
        ``.t7``, vrn-edge ``.safetensors``, or ``None`` for the package default. Ignored
        when ``backend`` is an already-built backend object.
    backend : {"torch"} or Backend
        The inference backend (see :mod:`vrn.runtime.backends`).
    device : str
        ``"cpu"`` or ``"cuda"``.
    all_faces : bool
        Reconstruct every detected face (as one batch); otherwise only the largest.
    level : float
        Isosurface level of the occupancy volume.
    yunet_model : path, optional
        A YuNet ``.onnx`` file; the detector is then ``cv2.FaceDetectorYN``.
    """

    def __init__(self, weights: str | os.PathLike | None = None, *, backend="torch",
                 device: str = "cpu", precision: str = "fp32", all_faces: bool = False,
                 level: float = 0.5, yunet_model: str | os.PathLike | None = None,
                 detector=None):
        if isinstance(backend, str):
            backend = _create_backend(backend, weights, device, precision)
        self.backend = backend
        self.model_info = getattr(backend, "model_info", None)
        self.detector = detector or create_detector(yunet_model)
        self.all_faces = all_faces
        self.level = level
        self.z_scale = self.model_info.z_scale if self.model_info is not None else 0.5

    def __call__(self, image: np.ndarray, *, boxes: list[FaceBox] | None = None
                 ) -> FrameResult:
        """Reconstruct the faces in ``image`` ``(H, W, 3)`` uint8 RGB (grayscale, RGBA
        and 16-bit arrays are converted). ``boxes`` skips detection (e.g. from a tracker).
        A frame without faces gives a result with no faces."""
        timer = StageTimer()
        image = as_rgb_uint8(image)
        with timer("detect"):
            if boxes is None:
                boxes = self.detector(image)
            if not self.all_faces:
                boxes = boxes[:1]
        if not boxes:
            return FrameResult([], timer.ms)
        size = self.backend.input_size
        with timer("crop"):
            matrices = [box_crop_matrix(box, size) for box in boxes]
            crops = np.stack([warp_crop(image, m, size) for m in matrices])
            batch = to_network_input(crops)
        with timer("infer"):
            volumes = self.backend.infer(batch)
        meshes = []
        for i, matrix in enumerate(matrices):
            with timer("isosurface"):
                vertices, faces = marching_cubes(volumes[i], level=self.level)
            with timer("colour"):
                colors = vertex_colors(batch[i], vertices)
                vertices = transform_vertices(vertices, invert_affine(matrix),
                                              z_scale=self.z_scale)
            meshes.append(FaceMesh(vertices, faces, colors))
        faces = [FaceResult(box, mesh, matrix, crop)
                 for box, mesh, matrix, crop in zip(boxes, meshes, matrices, crops)]
        return FrameResult(faces, timer.ms)


def _create_backend(name: str, weights, device: str, precision: str):
    from ..model import load_model
    from .backends import TorchBackend

    if name == "torch":
        model = load_model(weights)
        backend = TorchBackend(model, device=device, precision=precision)
        backend.model_info = model.info
        return backend
    raise ValueError(f"unknown backend {name!r}")


def reconstruct(image, weights: str | os.PathLike | None = None, *, all_faces: bool = False,
                **kwargs) -> list[FaceResult]:
    """One-call API: reconstruct the faces in ``image`` (a path or an ``(H, W, 3)`` uint8
    RGB array). Raises :class:`~vrn.errors.NoFaceError` when no face is found. Builds a
    :class:`Reconstructor` per call; keep one yourself for many images."""
    from .image_io import load_image

    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    result = Reconstructor(weights, all_faces=all_faces, **kwargs)(image)
    if not result.faces:
        raise NoFaceError("no face found in the image")
    return result.faces
