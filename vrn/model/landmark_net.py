"""68 facial landmarks from one 120x120 crop: 3DDFA_V2's MobileNet V1 (width 0.5)
regressor of 62 3DMM parameters, and the fixed BFM keypoint basis that turns them into
landmarks.

The network (:class:`MobileNetV1`) follows the layer names and shapes of 3DDFA_V2's
``models/mobilenet_v1.py`` so its released state dict loads as is; our own code. The
parameters ``p`` (after un-whitening, ``p = out * std + mean``) are

- ``p[:12]``, row-major ``(3, 4)``: the pose ``[s R | t]`` (scaled rotation and shift);
- ``p[12:52]``: 40 shape coefficients ``a``; ``p[52:62]``: 10 expression coefficients ``b``.

The 68 landmarks are ``P = [s R | t] @ [u + W_shp a + W_exp b; 1]`` over the 68 BFM
keypoint vertices, in the crop's MATLAB-style frame: 1-based ``x`` right, ``y`` *up*
(``y = 120`` is the crop's top row), ``z`` toward the camera, all in crop pixels.
:mod:`vrn.runtime.landmarks` maps them to the photo.

Weights ship as ``weights_data/mb05_120x120_3ddfa_v2.safetensors`` (converted by
``tools/convert_3ddfa_v2.py``; MIT, see ``weights_data/NOTICE.md``); the BFM keypoint
basis in that file is BFM-derived and for academic use only.
"""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError

INPUT_SIZE = 120
NUM_PARAMS = 62
NUM_SHAPE = 40
NUM_EXPRESSION = 10
NUM_LANDMARKS = 68
WIDTH = 0.5

FORMAT = "vrn-edge-landmarks/1"
DEFAULT_WEIGHTS = "mb05_120x120_3ddfa_v2.safetensors"

# (out_channels at width 1, stride) of the 13 depthwise-separable blocks, named as in
# 3DDFA_V2 (dw2_1 ... dw6).
_BLOCKS = (("dw2_1", 64, 1), ("dw2_2", 128, 2), ("dw3_1", 128, 1), ("dw3_2", 256, 2),
           ("dw4_1", 256, 1), ("dw4_2", 512, 2), ("dw5_1", 512, 1), ("dw5_2", 512, 1),
           ("dw5_3", 512, 1), ("dw5_4", 512, 1), ("dw5_5", 512, 1), ("dw5_6", 1024, 2),
           ("dw6", 1024, 1))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv -> BN -> ReLU -> 1x1 conv -> BN -> ReLU.
    ``(N, C_in, H, W) -> (N, C_out, H / stride, W / stride)``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1,
                                 groups=in_channels, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_channels)
        self.conv_sep = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn_sep = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_dw(self.conv_dw(x)))
        return torch.relu(self.bn_sep(self.conv_sep(x)))


class MobileNetV1(nn.Module):
    """MobileNet V1 regressor as in 3DDFA_V2 (``widen_factor`` = ``width``).

    ``forward``: ``(N, 3, 120, 120)`` float32 BGR crop normalised as
    ``(pixel - 127.5) / 128`` -> ``(N, num_outputs)`` float32 (whitened parameters).
    Any input size works (global average pooling); the weights were trained on 120.
    """

    def __init__(self, width: float = WIDTH, num_outputs: int = NUM_PARAMS):
        super().__init__()
        self.width = width
        channels = int(32 * width)
        self.conv1 = nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        for name, out, stride in _BLOCKS:
            setattr(self, name, DepthwiseSeparable(channels, int(out * width), stride))
            channels = int(out * width)
        self.fc = nn.Linear(channels, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        for name, _, _ in _BLOCKS:
            x = getattr(self, name)(x)
        return self.fc(x.mean(dim=(2, 3)))


def landmarks_from_params(params: torch.Tensor, u: torch.Tensor, w_shp: torch.Tensor,
                          w_exp: torch.Tensor) -> torch.Tensor:
    """Pose and deform the keypoint basis: ``(N, 62)`` un-whitened parameters ->
    ``(N, K, 3)`` landmarks ``(x, y, z)`` in the crop's MATLAB-style frame.

    ``u`` ``(3K,)`` mean keypoints, ``w_shp`` ``(3K, 40)``, ``w_exp`` ``(3K, 10)``; rows
    are consecutive ``(x, y, z)`` triples per keypoint (``K = 68`` for the shipped
    basis). Differentiable and ONNX-exportable.
    """
    pose = params[:, :12].reshape(-1, 3, 4)
    shape = params[:, 12:12 + NUM_SHAPE]
    expression = params[:, 12 + NUM_SHAPE:12 + NUM_SHAPE + NUM_EXPRESSION]
    verts = u + shape @ w_shp.T + expression @ w_exp.T  # (N, 3K)
    verts = verts.reshape(params.shape[0], -1, 3)
    return verts @ pose[:, :, :3].transpose(1, 2) + pose[:, :, 3].unsqueeze(1)


class LandmarkRegressor(nn.Module):
    """:class:`MobileNetV1` plus the whitening and the 68-keypoint BFM basis.

    ``forward``: ``(N, 3, 120, 120)`` float32 BGR normalised crop -> ``(N, 68, 3)``
    float32 landmarks in the crop's MATLAB-style frame (see the module docstring).

    Buffers: ``param_mean``, ``param_std`` ``(62,)``; ``u`` ``(204,)``; ``w_shp``
    ``(204, 40)``; ``w_exp`` ``(204, 10)``. A fresh instance holds placeholders (zero
    basis, identity whitening); use :func:`load_landmark_regressor`.
    """

    def __init__(self, width: float = WIDTH):
        super().__init__()
        self.net = MobileNetV1(width, NUM_PARAMS)
        k3 = 3 * NUM_LANDMARKS
        self.register_buffer("param_mean", torch.zeros(NUM_PARAMS))
        self.register_buffer("param_std", torch.ones(NUM_PARAMS))
        self.register_buffer("u", torch.zeros(k3))
        self.register_buffer("w_shp", torch.zeros(k3, NUM_SHAPE))
        self.register_buffer("w_exp", torch.zeros(k3, NUM_EXPRESSION))

    def params(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 3, 120, 120)`` -> ``(N, 62)`` un-whitened 3DMM parameters."""
        return self.net(x) * self.param_std + self.param_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return landmarks_from_params(self.params(x), self.u, self.w_shp, self.w_exp)


def fuse_batch_norms(model: LandmarkRegressor) -> LandmarkRegressor:
    """A copy of ``model`` in evaluation mode with every batch norm folded into the
    convolution before it (same outputs up to rounding, fewer ops); ``model`` is not
    changed."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).float().eval()
    pairs = [(fused.net, "conv1", "bn1")]
    for name, _, _ in _BLOCKS:
        block = getattr(fused.net, name)
        pairs += [(block, "conv_dw", "bn_dw"), (block, "conv_sep", "bn_sep")]
    for module, conv, bn in pairs:
        setattr(module, conv, fuse_conv_bn_eval(getattr(module, conv), getattr(module, bn)))
        setattr(module, bn, nn.Identity())
    return fused


def expected_tensors(width: float = WIDTH) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a weights file for :class:`LandmarkRegressor` holds
    (its state dict without batch norm's ``num_batches_tracked`` counters)."""
    return {name: tuple(t.shape) for name, t in LandmarkRegressor(width).state_dict().items()
            if not name.endswith("num_batches_tracked")}


def default_landmark_weights() -> Path:
    """The shipped weights file (``vrn/model/weights_data``)."""
    return Path(str(resources.files("vrn.model").joinpath("weights_data", DEFAULT_WEIGHTS)))


def read_landmark_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a landmark weights file (no tensors read).

    Raises :class:`~vrn.errors.WeightsError` when the file is missing, is not a
    safetensors file, or is not a vrn-edge landmark file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: landmark weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a vrn-edge landmark weights file (metadata format "
                           f"is {meta.get('format')!r}, expected {FORMAT!r})")
    return meta


def load_landmark_regressor(path: str | os.PathLike | None = None, *,
                            map_location: str | torch.device = "cpu") -> LandmarkRegressor:
    """Load a :class:`LandmarkRegressor` (float32, evaluation mode) from a safetensors
    file, the shipped one by default. No pickle: safetensors executes nothing.

    Every tensor the architecture needs must be present with its exact shape, finite,
    and nothing else may be; otherwise :class:`~vrn.errors.WeightsError` names the file
    and the first problem. ``model.metadata`` holds the file's metadata.
    """
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_landmark_weights()
    meta = read_landmark_metadata(path)
    try:
        width = float(meta.get("width", WIDTH))
    except ValueError:
        raise WeightsError(f"{path}: invalid width {meta.get('width')!r} in metadata") from None
    if width not in (0.25, 0.5, 0.75, 1.0, 2.0):
        raise WeightsError(f"{path}: unsupported MobileNet width {width}")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise WeightsError(f"{path}: truncated or corrupt safetensors data ({exc})") from None
    expected = expected_tensors(width)
    for name, shape in expected.items():
        if name not in tensors:
            raise WeightsError(f"{path}: missing tensor {name!r} (shape {shape})")
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise WeightsError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"the architecture needs {shape}")
        if not tensor.is_floating_point():
            raise WeightsError(f"{path}: tensor {name!r} is {tensor.dtype}, not floating point")
        tensor = tensor.float()
        if not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{path}: tensor {name!r} holds NaN or infinite values")
        tensors[name] = tensor
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor {unexpected[0]!r} "
                           f"({len(unexpected)} not in the architecture)")
    if not bool((tensors["param_std"] > 0).all()):
        raise WeightsError(f"{path}: tensor 'param_std' must be positive")
    model = LandmarkRegressor(width)
    model.load_state_dict(tensors, strict=False)  # only num_batches_tracked stay default
    model.metadata = meta
    return model.to(map_location).eval()
