"""Landmark guidance: 68 Gaussian heatmaps rendered from landmark coordinates, in the
graph (:class:`LandmarkHeatmaps`, exported with the model) and in NumPy
(:func:`render_heatmaps`, the reference the graph is tested against); a smooth depth
field interpolated from the landmarks' depths (:class:`LandmarkDepth`,
:func:`render_landmark_depth`); and the fixed Gaussian smoothing of volume logits along
depth (:class:`DepthSmoothing`).

Landmarks are ``(N, 68, 2)`` crop pixels ``(x, y)`` (x = column, y = row, pixel centres
at integers); heatmaps are ``(N, 68, H, W)`` with ``heat[n, k, i, j] = exp(-((grid[j] -
x)^2 + (grid[i] - y)^2) / (2 sigma^2))`` on the sample grid ``grid = start + step *
arange(size)`` crop pixels. Landmarks must be finite (the runtime checks them before
the graph runs).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def render_heatmaps(landmarks: np.ndarray, *, size: int, step: float = 1.0,
                    start: float = 0.0, sigma: float = 3.0) -> np.ndarray:
    """NumPy heatmaps ``(N, K, size, size)`` float32 of landmarks ``(N, K, 2+)``."""
    landmarks = np.asarray(landmarks, np.float64)
    if landmarks.ndim != 3 or landmarks.shape[2] < 2:
        raise ValueError(f"landmarks must be (N, K, 2), got {landmarks.shape}")
    grid = start + step * np.arange(size, dtype=np.float64)
    gx = np.exp(-(grid[None, None, :] - landmarks[..., 0:1]) ** 2 / (2 * sigma ** 2))
    gy = np.exp(-(grid[None, None, :] - landmarks[..., 1:2]) ** 2 / (2 * sigma ** 2))
    return (gy[..., :, None] * gx[..., None, :]).astype(np.float32)


class LandmarkHeatmaps(nn.Module):
    """``forward(landmarks (N, K, 2) float32 crop px) -> (N, K, size, size)`` float32,
    the same values as :func:`render_heatmaps` with the same arguments. Separable (two
    ``(N, K, size)`` Gaussians multiplied), so it is cheap and exports to plain ONNX
    ops. Always computed in float32, also in a half-precision model."""

    def __init__(self, size: int, *, step: float = 1.0, start: float = 0.0,
                 sigma: float = 3.0):
        super().__init__()
        self.size, self.step, self.start, self.sigma = size, step, start, sigma
        grid = start + step * torch.arange(size, dtype=torch.float32)
        self.register_buffer("grid", grid, persistent=False)

    def forward(self, landmarks: torch.Tensor) -> torch.Tensor:
        scale = -1.0 / (2.0 * self.sigma ** 2)
        grid = self.grid.float()
        x = landmarks[..., 0:1].float()
        y = landmarks[..., 1:2].float()
        gx = torch.exp((grid - x) ** 2 * scale)
        gy = torch.exp((grid - y) ** 2 * scale)
        return gy.unsqueeze(-1) * gx.unsqueeze(-2)


def render_landmark_depth(landmarks: np.ndarray, points: np.ndarray, *, size: int,
                          step: float = 1.0, start: float = 0.0, sigma: float = 4.0,
                          nearness: float = 0.1, cover_sigma: float = 5.0,
                          anchor: float = 186.5, depth_scale: float = 2.0) -> np.ndarray:
    """NumPy twin of :class:`LandmarkDepth`: landmarks ``(N, 68, 3)`` and its surface
    point weights ``points`` ``(J, 68)`` -> ``(N, 2, size, size)`` float32."""
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 3):
        raise ValueError(f"landmarks must be (N, 68, 3), got {lm.shape}")
    p = np.einsum("jk,nkc->njc", np.asarray(points, np.float64), lm)
    grid = start + step * np.arange(size, dtype=np.float64)
    r2 = ((grid[None, None, :, None] - p[..., 1, None, None]) ** 2
          + (grid[None, None, None, :] - p[..., 0, None, None]) ** 2)       # (N, J, S, S)
    z = p[..., 2] - p[..., 2].max(axis=1, keepdims=True)                    # (N, J)
    logits = -r2 / (2 * sigma ** 2) + nearness * z[..., None, None]
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    depth = (w * (anchor + depth_scale * z)[..., None, None]).sum(axis=1)
    cover = np.exp(-r2.min(axis=1) / (2 * cover_sigma ** 2))
    return np.stack([depth, cover], axis=1).astype(np.float32)


class LandmarkDepth(nn.Module):
    """A face-depth field from 68 3D landmarks, for a volume's trunk grid.

    ``forward(landmarks (N, 68, 3) float32 crop px (x, y, z toward the camera)) ->
    (N, 2, size, size)`` float32 on the grid ``start + step * arange(size)``.

    The landmarks first give ``J`` face-surface points, each a fixed affine combination
    of them (``points`` ``(J, 68)``, rows summing to 1, fitted on BFM faces by
    ``tools/fit_surface_points.py``; they follow any rotation, scale or shift of the
    landmarks exactly). Then, per grid pixel:

    - channel 0: the depth index ``d`` of the face's front surface, a soft z-buffer of
      the points: the average of their ``anchor + depth_scale * (z_j - max z)`` with
      weights ``softmax_j(-r_j^2 / (2 sigma^2) + nearness * (z_j - max z))`` (``r_j``
      the distance to point ``j``; ``nearness`` per crop pixel favours the visible
      points over those of a turned face's hidden side). ``anchor`` is the volume's
      front (``d`` of the nearest face point) less the field's mean bias on synthetic
      faces;
    - channel 1: coverage, ``exp(-min_j r_j^2 / (2 cover_sigma^2))``: about 1 on the
      face, falling to 0 off it.

    Only depth differences matter, so the z origin of the landmark stage does not.
    """

    def __init__(self, size: int, *, step: float = 1.0, start: float = 0.0,
                 num_points: int = 256, sigma: float = 4.0, nearness: float = 0.1,
                 cover_sigma: float = 5.0, anchor: float = 186.5, depth_scale: float = 2.0):
        super().__init__()
        self.size, self.step, self.start = size, step, start
        self.sigma, self.nearness, self.cover_sigma = sigma, nearness, cover_sigma
        self.anchor, self.depth_scale = anchor, depth_scale
        # Fitted, not trained: a buffer keeps the rows' sum at 1 (see above).
        self.register_buffer("points", torch.full((num_points, 68), 1.0 / 68))
        grid = start + step * torch.arange(size, dtype=torch.float32)
        self.register_buffer("grid", grid, persistent=False)

    def forward(self, landmarks: torch.Tensor) -> torch.Tensor:
        grid = self.grid.float().view(1, -1, 1)
        p = torch.matmul(self.points.float(), landmarks.float())           # (N, J, 3)
        # Points on the last axis: a softmax and a min over the last axis are one
        # contiguous pass each (over axis 1, ONNX Runtime transposes: 10x slower).
        dx2 = (grid - p[..., 0].unsqueeze(1)) ** 2                           # (N, S, J)
        dy2 = (grid - p[..., 1].unsqueeze(1)) ** 2
        r2 = dy2.unsqueeze(2) + dx2.unsqueeze(1)                             # (N, S, S, J)
        z = p[..., 2] - p[..., 2].amax(dim=1, keepdim=True)                  # (N, J)
        w = torch.softmax(r2 * (-0.5 / self.sigma ** 2)
                          + (self.nearness * z)[:, None, None, :], dim=-1)
        n, s = w.shape[0], w.shape[1]
        values = (z * self.depth_scale + self.anchor).unsqueeze(-1)         # (N, J, 1)
        depth = torch.matmul(w.reshape(n, s * s, -1), values).reshape(n, s, s)
        cover = torch.exp(r2.amin(dim=-1) * (-0.5 / self.cover_sigma ** 2))
        return torch.stack([depth, cover], dim=1)


class DepthSmoothing(nn.Module):
    """A fixed, normalised Gaussian blur of ``(N, D, H, W)`` logits along ``D`` (edge
    values repeated at the ends): turns the network's near-binary steps between depth
    channels into ramps, so the isosurface between trunk pixels is interpolated instead
    of terraced. ``sigma`` in voxels; ``sigma <= 0`` is the identity."""

    def __init__(self, sigma: float = 2.0):
        super().__init__()
        self.sigma = float(sigma)
        radius = max(0, int(math.ceil(3 * self.sigma)))
        taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-taps ** 2 / (2 * self.sigma ** 2)) if self.sigma > 0 else \
            torch.ones(1)
        self.radius = radius
        self.register_buffer("kernel", (kernel / kernel.sum()).view(1, 1, -1, 1, 1),
                             persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.radius == 0:
            return logits
        x = logits.unsqueeze(1)                                   # (N, 1, D, H, W)
        x = F.pad(x, (0, 0, 0, 0, self.radius, self.radius), mode="replicate")
        return F.conv3d(x, self.kernel).squeeze(1)


class PlaneSmoothing(nn.Module):
    """A fixed ``[1, 2, 1] x [1, 2, 1] / 16`` blur of ``(N, D, H, W)`` logits over ``(H,
    W)`` (edge values repeated): applied between two bilinear doublings of the volume,
    it rounds the kinks that bilinear interpolation leaves at the coarse grid's nodes,
    which shading shows as a grid of facets. ``channels`` is ``D``: the blur is a
    depthwise convolution (PyTorch's CPU ``conv3d`` over a 1-channel volume, its other
    form, is 8 times slower)."""

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0]) / 4
        kernel = (taps[:, None] * taps[None, :]).expand(channels, 1, 3, 3).contiguous()
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        x = F.pad(logits, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(x, self.kernel.to(logits.dtype), groups=self.kernel.shape[0])
