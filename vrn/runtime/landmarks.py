"""68 facial landmarks per detected face, with 3DDFA_V2's MobileNet regressor
(:mod:`vrn.model.landmark_net`) on PyTorch or ONNX Runtime (CPU), or as a TensorRT engine
(:class:`TorchLandmarkRunner`, :class:`OrtLandmarkRunner`,
:class:`TensorRTLandmarkRunner`: the runners ``vrn-export`` checks its landmark files
with, too).

For each face box: a square crop box around it (:func:`box_to_crop_box`), the crop
resized to 120x120 (:func:`crop_120`), one batched forward pass for all faces of the
frame, and the landmarks mapped back to the photo (:func:`crop_to_photo`). With
``refine``, a second pass crops around the first pass's landmarks
(:func:`landmarks_to_crop_box`), as 3DDFA_V2 does on video.

Landmarks are ``(N, 68, 3)`` float32 in photo pixels: ``x`` right, ``y`` down (pixel
centres at integers), ``z`` toward the camera in photo pixels, its origin arbitrary
(3DDFA_V2's ``(P_z - 1) * scale``; only differences along ``z`` are meaningful). Crop
boxes are ``(4,)`` float64 ``(x0, y0, x1, y1)``, square, possibly outside the photo.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import BackendUnavailableError, EngineError, ImageError, UnreadableOnnxError
from ..model.landmark_net import (INPUT_SIZE, NUM_LANDMARKS, LandmarkRegressor,
                                  default_landmark_weights, fuse_batch_norms,
                                  load_landmark_regressor)
from .cpu import physical_cores
from .detect import FaceBox

# Crop box from a YuNet box: downward shift of the centre and side, in units of the
# box's mean side. 3DDFA_V2 uses (0.14, 1.58) for FaceBoxes boxes; YuNet's boxes are
# taller (forehead included). On the 8-image AFLW2000-3D sample
# (tools/eval_landmarks_aflw.py --grid) the 2D NME is 3.30% with (0.0, 1.25) against
# 4.35% with (0.14, 1.58) (3.41% and 4.27% averaged over small box perturbations).
BOX_SHIFT = 0.0
BOX_SCALE = 1.25
ONNX_EXPORT_VERSION = "1"  # bump when the export changes: renames the cached files


def box_to_crop_box(box: FaceBox, *, shift: float | None = None,
                    scale: float | None = None) -> np.ndarray:
    """Square crop box ``(x0, y0, x1, y1)`` for a detector box.

    With ``s`` the mean of the box's width and height: the centre is the box centre
    moved down by ``shift * s``, the side is ``int(scale * s)``. ``shift`` and ``scale``
    default to :data:`BOX_SHIFT` and :data:`BOX_SCALE` (calibrated for YuNet).
    """
    shift = BOX_SHIFT if shift is None else shift
    scale = BOX_SCALE if scale is None else scale
    s = (box.w + box.h) / 2.0
    cx, cy = box.x + box.w / 2.0, box.y + box.h / 2.0 + shift * s
    side = float(int(scale * s))
    return np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2])


def landmarks_to_crop_box(landmarks: np.ndarray) -> np.ndarray:
    """Square crop box ``(x0, y0, x1, y1)`` for landmarks ``(K, 2 or 3)``: centred on
    their extent, its side the diagonal of the square around that extent."""
    xy = np.asarray(landmarks, dtype=np.float64)[:, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    centre = (lo + hi) / 2.0
    half = np.sqrt(2.0) * (hi - lo).max() / 2.0  # half the square's diagonal
    return np.array([centre[0] - half, centre[1] - half, centre[0] + half, centre[1] + half])


def crop_120(image: np.ndarray, crop_box: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """The ``crop_box`` region of ``image`` ``(H, W, C)`` resized to ``(size, size, C)``
    (bilinear, zero outside the image), same dtype and channel order.

    Sampling matches cropping then ``cv2.resize`` (pixel centres aligned), but with the
    sub-pixel box kept rather than rounded.
    """
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    sx, sy = (x1 - x0) / size, (y1 - y0) / size
    # Output pixel (i, j) samples the photo at (x0 + (j + 0.5) sx - 0.5, ...).
    matrix = np.array([[sx, 0.0, x0 + 0.5 * sx - 0.5], [0.0, sy, y0 + 0.5 * sy - 0.5]])
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR
                          | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def to_network_input(crops: np.ndarray) -> np.ndarray:
    """``(N, 120, 120, 3)`` uint8 RGB crops -> ``(N, 3, 120, 120)`` float32 BGR,
    ``(pixel - 127.5) / 128``."""
    bgr = np.ascontiguousarray(crops[..., ::-1].transpose(0, 3, 1, 2), dtype=np.float32)
    return (bgr - 127.5) / 128.0


def crop_to_photo(points: np.ndarray, crop_boxes: np.ndarray,
                  size: int = INPUT_SIZE) -> np.ndarray:
    """Landmarks ``(N, K, 3)`` in the crops' MATLAB-style frame (1-based, ``y`` up) ->
    photo pixels ``(N, K, 3)`` float32 (``y`` down), for crop boxes ``(N, 4)``."""
    points = np.asarray(points, dtype=np.float64)
    boxes = np.asarray(crop_boxes, dtype=np.float64).reshape(-1, 1, 4)
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    scale_x, scale_y = (x1 - x0) / size, (y1 - y0) / size
    out = np.empty_like(points)
    out[..., 0] = (points[..., 0] - 1.0) * scale_x + x0
    out[..., 1] = (size - points[..., 1]) * scale_y + y0
    out[..., 2] = (points[..., 2] - 1.0) * (scale_x + scale_y) / 2.0
    return out.astype(np.float32)


class TorchLandmarkRunner:
    """The regressor (batch norms folded) in PyTorch on the CPU: ``runner(batch)`` maps
    ``(N, 3, 120, 120)`` float32 network inputs (:func:`to_network_input`) to ``(N, 68,
    3)`` float32 landmarks in the crops' MATLAB-style frame."""

    def __init__(self, model: LandmarkRegressor):
        self.model = fuse_batch_norms(model)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(batch)).numpy()

    def describe(self) -> str:
        return f"PyTorch {torch.__version__} (CPU, {torch.get_num_threads()} threads)"


class OrtLandmarkRunner:
    """The regressor's ONNX graph (:mod:`vrn.export.landmark_onnx`) on ONNX Runtime's CPU
    provider; called as :class:`TorchLandmarkRunner`.

    Parameters
    ----------
    path : path
        The graph; :class:`~vrn.errors.UnreadableOnnxError` if ONNX Runtime refuses it.
    threads : int, optional
        Intra-op threads (default: physical cores).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        ort = _import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or physical_cores()
        # A 0.4 ms graph: threads that spin after it only take cores from the next stage.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self.session = _ort_session(ort, self.path, options)
        self.input_name = self.session.get_inputs()[0].name
        self.threads = options.intra_op_num_threads
        self.version = ort.__version__

    @classmethod
    def cached(cls, model: LandmarkRegressor, weights: Path, cache_dir: Path | None,
               threads: int | None) -> OrtLandmarkRunner:
        """``model`` (from the file ``weights``) exported once to ONNX in ``cache_dir``
        (default: the ONNX Runtime backend's cache folder) and opened; a cached file
        that does not load is exported again."""
        from .backends.onnx_cache import open_cached
        from .backends.onnxruntime_backend import default_cache_dir

        _import_onnxruntime()  # before exporting anything
        return open_cached(
            lambda: cached_landmark_onnx(model, weights, cache_dir or default_cache_dir()),
            lambda path: cls(path, threads=threads))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def describe(self) -> str:
        return f"ONNX Runtime {self.version} (CPU, {self.threads} threads)"


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("landmarks on onnxruntime: the onnxruntime package "
                                      "is not installed (pip install onnxruntime)") from None
    return onnxruntime


def _ort_session(ort, path: Path, options):
    """A CPU session over ``path``; :class:`~vrn.errors.UnreadableOnnxError` if ONNX
    Runtime refuses the file (so that a corrupt cache file is exported again)."""
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise UnreadableOnnxError(f"{path}: onnxruntime cannot load this graph "
                                  f"({exc})") from None


class TensorRTLandmarkRunner:
    """A landmark engine built by ``vrn-export`` (``landmarks.engine``, fp32), run by
    :class:`~vrn.runtime.backends.tensorrt_backend.TensorRTEngine` (the VRN backend's
    engine runner and buffers); called as :class:`TorchLandmarkRunner`. The CPU-only
    tests run it on a stand-in TensorRT; a real engine needs a GPU."""

    def __init__(self, engine_path: str | os.PathLike, *, device_id: int = 0):
        from .backends.tensorrt_backend import TensorRTEngine

        self.engine = TensorRTEngine(engine_path, device_id=device_id)
        self.path, self.metadata = self.engine.path, self.engine.metadata
        in_shape = self.engine.input_shapes[self.engine.input_names[0]]
        if in_shape[1:] != (3, INPUT_SIZE, INPUT_SIZE) or \
                self.engine.output_shape[1:] != (NUM_LANDMARKS, 3):
            raise EngineError(f"{self.path}: tensor shapes {in_shape} -> "
                              f"{self.engine.output_shape} are not (N, 3, {INPUT_SIZE}, "
                              f"{INPUT_SIZE}) -> (N, {NUM_LANDMARKS}, 3)")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        output = self.engine.run([np.ascontiguousarray(batch, dtype=np.float32)])
        return self.engine.buffers.to_host(output)

    def describe(self) -> str:
        return f"TensorRT ({self.path.name}, {self.metadata.gpu_name})"


def cached_landmark_onnx(model: LandmarkRegressor, weights: str | os.PathLike,
                         cache_dir: str | os.PathLike) -> Path:
    """``cache_dir/onnx/landmarks-<hash>.onnx``, exported now (atomically) if missing
    or corrupt (:func:`.backends.onnx_cache.cached_file`); the hash covers the weights
    file's bytes and the export version."""
    from ..export.landmark_onnx import export_landmark_onnx
    from .backends.onnx_cache import cached_file

    data = Path(weights).read_bytes()
    key = hashlib.sha256(f"landmarks-onnx/{ONNX_EXPORT_VERSION}\n".encode())
    key.update(data)
    meta = getattr(model, "metadata", {})
    metadata = {"vrn_landmarks_weights_sha256": hashlib.sha256(data).hexdigest(),
                **{f"weights_{k}": v for k, v in meta.items() if k in ("source", "license")}}
    return cached_file(Path(cache_dir) / "onnx" / f"landmarks-{key.hexdigest()[:20]}.onnx",
                       lambda tmp: export_landmark_onnx(model, tmp, metadata=metadata))


class LandmarkStage:
    """68 landmarks for the faces of a frame.

    Parameters
    ----------
    backend : {"torch", "onnxruntime", "tensorrt"}
        PyTorch on the CPU, ONNX Runtime's CPU provider with the graph exported once
        into ``cache_dir`` (default: the ONNX Runtime backend's cache folder), or a
        TensorRT ``engine`` built by ``vrn-export`` (``landmarks.engine``).
    weights : path, optional
        A landmark safetensors file; the shipped one by default.
    refine : bool
        Run a second pass on a crop around the first pass's landmarks. Off by default:
        with YuNet boxes and :data:`BOX_SCALE` it did not lower the error on the
        AFLW2000-3D sample (it does with 3DDFA_V2's looser 1.58 crops).
    threads : int, optional
        ONNX Runtime intra-op threads (default: physical cores).
    engine : path, optional
        The TensorRT engine (``backend="tensorrt"`` only).
    device_id : int
        The GPU the TensorRT engine runs on.

    Calls are thread-safe (the torch module is only read; ONNX Runtime sessions are
    thread-safe).
    """

    def __init__(self, backend: str = "torch", weights: str | os.PathLike | None = None,
                 refine: bool = False, *, cache_dir: str | os.PathLike | None = None,
                 threads: int | None = None, engine: str | os.PathLike | None = None,
                 device_id: int = 0):
        weights = Path(weights) if weights is not None else default_landmark_weights()
        model = load_landmark_regressor(weights)
        if backend == "tensorrt":
            if engine is None:
                raise ValueError("the tensorrt landmark backend needs engine= "
                                 "(landmarks.engine from vrn-export)")
            self._run = TensorRTLandmarkRunner(engine, device_id=device_id)
        elif backend == "torch":
            self._run = TorchLandmarkRunner(model)
        elif backend == "onnxruntime":
            self._run = OrtLandmarkRunner.cached(model, weights,
                                                 Path(cache_dir) if cache_dir else None, threads)
        else:
            raise ValueError(f"unknown landmark backend {backend!r}; "
                             "use 'torch', 'onnxruntime' or 'tensorrt'")
        self.backend = backend
        self.weights = weights
        self.refine = refine

    def __call__(self, image: np.ndarray, boxes: list[FaceBox]) -> np.ndarray:
        """Landmarks ``(N, 68, 3)`` float32 in photo pixels for ``image`` ``(H, W, 3)``
        uint8 RGB and its ``N`` face boxes."""
        _check_image(image)
        if not boxes:
            return np.zeros((0, NUM_LANDMARKS, 3), dtype=np.float32)
        landmarks = self.from_crop_boxes(image, np.stack([box_to_crop_box(b) for b in boxes]))
        if self.refine:
            landmarks = self.from_crop_boxes(
                image, np.stack([landmarks_to_crop_box(p) for p in landmarks]))
        return landmarks

    def from_crop_boxes(self, image: np.ndarray, crop_boxes: np.ndarray) -> np.ndarray:
        """One pass: landmarks ``(N, 68, 3)`` float32 in photo pixels for crop boxes
        ``(N, 4)`` ``(x0, y0, x1, y1)`` (one batched forward pass)."""
        crop_boxes = np.asarray(crop_boxes, dtype=np.float64).reshape(-1, 4)
        if len(crop_boxes) == 0:
            return np.zeros((0, NUM_LANDMARKS, 3), dtype=np.float32)
        crops = np.stack([crop_120(image, box) for box in crop_boxes])
        return crop_to_photo(self._run(to_network_input(crops)), crop_boxes)

    def describe(self) -> str:
        return f"3DDFA_V2 MobileNet-0.5 landmarks on {self._run.describe()}"


def _check_image(image: np.ndarray) -> None:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3):
        got = (f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray)
               else type(image).__name__)
        raise ImageError(f"landmarks need an (H, W, 3) uint8 RGB image, got {got}")
