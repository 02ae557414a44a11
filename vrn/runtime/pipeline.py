"""The per-frame pipeline, as a plain sequence of named, timed stages:

``detect`` faces (YuNet) -> ``landmarks`` (68 per face, :mod:`vrn.runtime.landmarks`) ->
``crop`` each to 192x192 with the original landmark rule -> ``infer`` the volumes (one
batch; a landmark-guided model also takes the landmarks in crop pixels) ->
``isosurface`` (marching cubes at 0.5) -> ``colour`` (vertex colours from the crop, and
vertices mapped from crop voxels back to photo pixels). :meth:`Reconstructor.infer_faces`
runs the stages up to ``infer`` and :meth:`Reconstructor.mesh_faces` the rest, so that a
caller can run the two halves apart (the pipelined live loop runs them on two threads).

On a GPU backend the crops are uploaded once and everything after stays on the device:
the volumes come out of the backend as CUDA arrays, and marching cubes, the vertex
transform and the colours run as :mod:`vrn.kernels` GPU kernels on them; only the
finished meshes are copied to the host (at the end of the ``colour`` stage). Stage times
on a GPU are measured after a device synchronisation, so each stage's own work is
counted in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NoFaceError
from ..kernels import marching_cubes_batch, to_host, transform_vertices, vertex_colors
from .crop import (CROP_SIZE, invert_affine, landmarks_crop_matrix, points_to_crop,
                   to_network_input, warp_crop)
from .detect import FaceBox, create_detector
from ..image_io import as_rgb_uint8
from .landmarks import LandmarkStage
from .mesh import FaceMesh
from .timing import StageTimer



@dataclass
class FaceResult:
    """One reconstructed face.

    ``mesh``: vertices ``(V, 3)`` float32 ``(x, y, z)`` in photo pixels (x right, y down,
    z toward the camera, in photo pixels), faces ``(F, 3)`` int32, colours ``(V, 3)``
    uint8 RGB; empty when the volume has no surface at the level. ``box``: the detection.
    ``photo_to_crop``: the 2x3 affine from photo pixels to crop pixels. ``crop``: the
    ``(S, S, 3)`` uint8 RGB crop the network saw. ``landmarks``: ``(68, 3)`` float32
    photo pixels ``(x, y, z)`` from the landmark stage (z toward the camera, origin
    arbitrary).
    """

    box: FaceBox
    mesh: FaceMesh
    photo_to_crop: np.ndarray
    crop: np.ndarray
    landmarks: np.ndarray | None = None


@dataclass
class FrameResult:
    """All faces of one frame and the frame's per-stage milliseconds."""

    faces: list[FaceResult]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class InferredFrame:
    """A frame after the network, before its meshes: what
    :meth:`Reconstructor.infer_faces` hands to :meth:`Reconstructor.mesh_faces`.

    For its N faces: ``boxes`` (photo pixels), ``landmarks`` ``(N, 68, 3)`` float32 photo
    pixels ``(x, y, z)``, ``photo_to_crop`` N ``(2, 3)`` float64 affines, ``crops`` ``(N,
    S, S, 3)`` uint8 RGB, the network input ``batch`` ``(N, 3, S, S)`` float32 and the
    backend's ``volumes`` ``(N, D, S, S)`` (both CUDA arrays on a GPU backend; ``None``
    when there is no face), and the ``timer`` holding the frame's stage times so far.
    """

    boxes: list[FaceBox]
    landmarks: np.ndarray
    photo_to_crop: list[np.ndarray]
    crops: np.ndarray
    batch: object
    volumes: object
    timer: StageTimer


class Reconstructor:
    """Photo in, coloured face meshes out.

    Parameters
    ----------
    weights_or_engine : path or None
        ``.t7`` or vrn-edge ``.safetensors`` weights, an ``.onnx`` graph, a TensorRT
        engine (``.engine``/``.plan``), or ``None`` for the package default. Ignored
        when ``backend`` is an already-built backend object.
    backend : {"torch", "auto", "onnxruntime", "tensorrt"} or Backend
        The inference backend (see :func:`vrn.runtime.backends.create_backend`; ``"auto"``
        picks the fastest available).
    device : {"cpu", "cuda"}, optional
        Default: CUDA when the backend can use it.
    precision : {"fp32", "fp16", "bf16"}, optional
        Default: fp16 on CUDA, fp32 on the CPU.
    all_faces : bool
        Reconstruct every detected face (as one batch); otherwise only the largest.
    level : float
        Isosurface level of the occupancy volume.
    detector_model : path, optional
        A YuNet ``.onnx`` file replacing the shipped one (see
        :func:`~vrn.runtime.detect.create_detector`).
    detector : callable, optional
        ``detector(image) -> list[FaceBox]``, replacing the default.
    landmark_stage : LandmarkStage, optional
        The 68-landmark stage (default: :func:`default_landmark_stage`).
    **backend_options
        Passed to :func:`~vrn.runtime.backends.create_backend` (``cuda_graphs``,
        ``provider``, ``cache_dir``).
    """

    def __init__(self, weights_or_engine: str | os.PathLike | None = None, *,
                 backend="torch", device: str | None = None, precision: str | None = None,
                 all_faces: bool = False, level: float = 0.5,
                 detector_model: str | os.PathLike | None = None, detector=None,
                 landmark_stage: LandmarkStage | None = None, **backend_options):
        if isinstance(backend, str):
            from .backends import create_backend

            backend = create_backend(backend, weights_or_engine, device=device,
                                     precision=precision, **backend_options)
        self.backend = backend
        self.model_info = getattr(backend, "model_info", None)
        self.detector = detector or create_detector(detector_model)
        self.landmark_stage = landmark_stage or default_landmark_stage(backend)
        self.all_faces = all_faces
        self.level = level
        self.z_scale = self.model_info.z_scale if self.model_info is not None else 0.5
        self.on_gpu = getattr(backend, "device", "cpu") == "cuda"
        self.device_id = getattr(backend, "device_id", None) or 0  # the backend's GPU
        self._upload = _Uploader(self.device_id)

    def __call__(self, image: np.ndarray, *, boxes: list[FaceBox] | None = None,
                 landmarks: np.ndarray | None = None) -> FrameResult:
        """Reconstruct the faces in ``image`` ``(H, W, 3)`` uint8 RGB (grayscale, RGBA
        and 16-bit arrays are converted). ``boxes`` skips detection (e.g. from a tracker);
        ``landmarks`` ``(N, 68, 3)`` photo pixels, one per box, skips the landmark stage.
        A frame without faces gives a result with no faces.

        The same as ``mesh_faces(infer_faces(image, boxes=boxes, landmarks=landmarks))``.
        """
        return self.mesh_faces(self.infer_faces(image, boxes=boxes, landmarks=landmarks))

    def infer_faces(self, image: np.ndarray, *, boxes: list[FaceBox] | None = None,
                    landmarks: np.ndarray | None = None,
                    timer: StageTimer | None = None) -> InferredFrame:
        """The first half of :meth:`__call__`: the ``detect``, ``landmarks``, ``crop`` and
        ``infer`` stages. ``image``, ``boxes`` and ``landmarks`` as for :meth:`__call__`;
        the stage times are added to ``timer`` (default: a new one), e.g. one that
        already holds a tracker's. Finish the frame with :meth:`mesh_faces`."""
        timer = StageTimer() if timer is None else timer
        sync = self._stage_sync()
        image = as_rgb_uint8(image)
        size = self.backend.input_size
        with timer("detect"):
            if boxes is None:
                boxes = self.detector(image)
            if not self.all_faces:
                boxes = boxes[:1]
        if not boxes:
            return InferredFrame([], np.zeros((0, 68, 3), np.float32), [],
                                 np.zeros((0, size, size, 3), np.uint8), None, None, timer)
        with timer("landmarks"):
            if landmarks is None:
                landmarks = self.landmark_stage(image, boxes)
            landmarks = np.asarray(landmarks, np.float32)
            if len(landmarks) != len(boxes):
                raise ValueError(f"got {len(landmarks)} landmark sets for {len(boxes)} faces")
        with timer("crop", sync):
            matrices, crops, crop_landmarks = landmark_crops(image, landmarks, size)
            batch = to_network_input(crops)
            if self.on_gpu:
                batch = self._upload(batch)
        with timer("infer", sync):
            volumes = self.backend.infer(batch, crop_landmarks)
        return InferredFrame(list(boxes), landmarks, matrices, crops, batch, volumes, timer)

    def mesh_faces(self, inferred: InferredFrame) -> FrameResult:
        """The second half of :meth:`__call__`: the ``isosurface`` and ``colour`` stages
        of a frame from :meth:`infer_faces` (timed into its timer)."""
        timer, sync = inferred.timer, self._stage_sync()
        if not inferred.boxes:
            return FrameResult([], timer.ms)
        with timer("isosurface", sync):
            isosurfaces = marching_cubes_batch(inferred.volumes, level=self.level)
        faces = []
        for i, (vertices, triangles) in enumerate(isosurfaces):
            matrix = inferred.photo_to_crop[i]
            with timer("colour", sync):
                mesh = self._finish_mesh(inferred.batch[i], vertices, triangles, matrix)
            faces.append(FaceResult(inferred.boxes[i], mesh, matrix, inferred.crops[i],
                                    inferred.landmarks[i]))
        return FrameResult(faces, timer.ms)

    def _stage_sync(self):
        """What the stage timer waits for before reading the clock: the GPU's queued
        work on a GPU backend, nothing on the CPU."""
        return (lambda: _synchronize_device(self.device_id)) if self.on_gpu else None

    def _finish_mesh(self, crop, vertices, faces, photo_to_crop) -> FaceMesh:
        """Colour the crop-space mesh, map it into the photo and bring it to the host
        (where it already is on the CPU path)."""
        if len(faces) == 0:
            return FaceMesh(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32),
                            np.zeros((0, 3), np.uint8))
        colors = vertex_colors(crop, vertices)
        vertices = transform_vertices(vertices, invert_affine(photo_to_crop),
                                      z_scale=self.z_scale)
        vertices, faces = to_host(vertices, faces)
        colors = colors if isinstance(colors, np.ndarray) else colors.copy_to_host()
        return FaceMesh(vertices, faces, colors)

    def warmup(self) -> None:
        """Run every stage once on a blank crop, so one-off costs (JIT compilation,
        cuDNN autotuning, CUDA-graph capture) do not land on the first real frame."""
        size = self.backend.input_size
        blank = np.zeros((size * 2, size * 2, 3), np.uint8)
        self(blank, boxes=[FaceBox(size / 2, size / 2, size, size)])


def default_landmark_stage(backend) -> LandmarkStage:
    """The landmark stage to pair with a VRN backend: TensorRT when the backend runs an
    engine and ``vrn-export`` left ``landmarks.engine`` beside it (on the backend's GPU),
    ONNX Runtime beside ONNX Runtime, else PyTorch."""
    name = getattr(backend, "name", "")
    if name == "tensorrt":
        engine = Path(backend.path).with_name("landmarks.engine")
        if engine.is_file():
            return LandmarkStage("tensorrt", engine=engine,
                                 device_id=getattr(backend, "device_id", 0) or 0)
    if name == "onnxruntime":
        return LandmarkStage("onnxruntime")
    return LandmarkStage("torch")


def landmark_crops(image: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE
                   ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The original crop of each face from its landmarks.

    ``image`` ``(H, W, 3)`` uint8 RGB, ``landmarks`` ``(N, 68, 3)`` photo pixels ``(x, y,
    z)`` -> ``(photo_to_crop matrices (2, 3) float64 per face, crops (N, size, size, 3)
    uint8, landmarks in crop pixels (N, 68, 3) float32)`` (z scaled with the crop).
    """
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (68, 3):
        raise ValueError(f"landmarks must be (N, 68, 3), got {landmarks.shape}")
    if not np.isfinite(landmarks).all():
        raise ValueError("landmarks must be finite")
    matrices = [landmarks_crop_matrix(lm, size) for lm in landmarks]
    crops = np.stack([warp_crop(image, m, size) for m in matrices]) if matrices else \
        np.zeros((0, size, size, 3), np.uint8)
    in_crop = np.zeros((len(matrices), 68, 3), np.float32)
    for i, (lm, m) in enumerate(zip(landmarks, matrices)):
        in_crop[i] = points_to_crop(lm, m)
    return matrices, crops, in_crop


def face_crops(image: np.ndarray, *, detector=None, landmark_stage: LandmarkStage | None = None,
               size: int = CROP_SIZE, max_faces: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Network inputs for the faces in ``image`` ``(H, W, 3)`` uint8 RGB (largest
    first), made as the pipeline makes them: ``(crops (N, 3, size, size) float32 in
    [0, 1], landmarks (N, 68, 3) float32 crop pixels)``. ``detector`` and
    ``landmark_stage`` default to the pipeline's."""
    detector = detector or create_detector()
    boxes = detector(image)[:max_faces]
    if not boxes:
        return (np.zeros((0, 3, size, size), np.float32), np.zeros((0, 68, 3), np.float32))
    landmarks = (landmark_stage or LandmarkStage())(image, boxes)
    _, crops, crop_landmarks = landmark_crops(image, landmarks, size)
    return to_network_input(crops), crop_landmarks


def sample_face_crops(size: int = CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """:func:`face_crops` of the bundled sample photo: the real face crops the parity
    checks of ``vrn-export`` use."""
    from ..image_io import load_image, sample_image_path

    return face_crops(load_image(sample_image_path()), size=size)


def _synchronize_device(device_id: int = 0) -> None:
    """Wait for all work on CUDA device ``device_id`` (stage timing on a GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize(device_id)
            return
    except ImportError:
        pass
    from numba import cuda

    from ..kernels._cuda import on_device

    with on_device(device_id):
        cuda.synchronize()


class _Uploader:
    """The crops to the GPU as the kind of CUDA array the backends work with: a torch
    CUDA tensor when torch has CUDA, else a numba-cuda device array.

    With torch, each batch goes through one page-locked host buffer, kept from frame
    to frame and grown when a frame needs more, so that the asynchronous copy needs no
    new pinned allocation per frame. Before the buffer is written again, the previous
    frame's copy out of it is waited for (an event recorded after that copy).
    """

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        self._host = None  # flat pinned torch tensor
        self._copied = None  # torch.cuda.Event after the last copy out of _host

    def __call__(self, batch: np.ndarray):
        """``batch`` (any shape, float32) on CUDA device :attr:`device_id`, ordered on its
        current stream."""
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            from numba import cuda

            from ..kernels._cuda import on_device

            with on_device(self.device_id):
                return cuda.to_device(batch)
        if self._copied is not None:
            self._copied.synchronize()  # the last copy has read the buffer
        source = torch.from_numpy(np.ascontiguousarray(batch))
        if self._host is None or self._host.dtype != source.dtype \
                or self._host.numel() < source.numel():
            self._host = torch.empty(source.numel(), dtype=source.dtype, pin_memory=True)
        staged = self._host[:source.numel()].view(source.shape)
        staged.copy_(source)
        device = torch.device("cuda", self.device_id)
        out = staged.to(device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(device))
        return out


def reconstruct(image, weights: str | os.PathLike | None = None, *, all_faces: bool = False,
                **kwargs) -> list[FaceResult]:
    """One-call API: reconstruct the faces in ``image`` (a path or an ``(H, W, 3)`` uint8
    RGB array). Raises :class:`~vrn.errors.NoFaceError` when no face is found. Builds a
    :class:`Reconstructor` per call; keep one yourself for many images."""
    from ..image_io import load_image

    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    result = Reconstructor(weights, all_faces=all_faces, **kwargs)(image)
    if not result.faces:
        raise NoFaceError("no face found in the image")
    return result.faces
