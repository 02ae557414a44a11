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


# The inner 51 of the 68 landmarks (brows, nose, eyes, mouth). The 17 jawline points are
# left out of the depth field: on a turned face half of them lie on the hidden side, far
# behind the visible cheek they project onto (on 40 synthetic faces the field's error
# against the target's front surface falls from 19.3 to 11.9 voxels without them).
DEPTH_LANDMARKS = (17, 68)


def render_landmark_depth(landmarks: np.ndarray, *, size: int, step: float = 1.0,
                          start: float = 0.0, sigma: float = 8.0, cover_sigma: float = 16.0,
                          anchor: float = 191.0, depth_scale: float = 2.0) -> np.ndarray:
    """NumPy twin of :class:`LandmarkDepth`: ``(N, 68, 3)`` -> ``(N, 2, size, size)``
    float32."""
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 3):
        raise ValueError(f"landmarks must be (N, 68, 3), got {lm.shape}")
    lm = lm[:, DEPTH_LANDMARKS[0]:DEPTH_LANDMARKS[1]]
    grid = start + step * np.arange(size, dtype=np.float64)
    r2 = ((grid[None, None, :, None] - lm[..., 1, None, None]) ** 2
          + (grid[None, None, None, :] - lm[..., 0, None, None]) ** 2)       # (N, K, S, S)
    logits = -r2 / (2 * sigma ** 2)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    z = lm[..., 2]
    front = depth_scale * (z - z.max(axis=1, keepdims=True)) + anchor
    depth = (w * front[..., None, None]).sum(axis=1)
    cover = np.exp(-r2.min(axis=1) / (2 * cover_sigma ** 2))
    return np.stack([depth, cover], axis=1).astype(np.float32)


class LandmarkDepth(nn.Module):
    """A smooth face-depth field from 68 3D landmarks, for a volume's trunk grid.

    ``forward(landmarks (N, 68, 3) float32 crop px (x, y, z toward the camera)) ->
    (N, 2, size, size)`` float32 on the grid ``start + step * arange(size)``, from the
    inner 51 landmarks (:data:`DEPTH_LANDMARKS`):

    - channel 0: the depth index ``d`` of the face's front surface, interpolated from
      the landmarks' (Gaussian-weighted average, weights ``softmax_k(-r_k^2 / (2
      sigma^2))`` with ``r_k`` the distance to landmark ``k``), each landmark's ``d``
      being ``anchor + depth_scale * (z_k - max_j z_j)``: the volume's frame, where the
      face's nearest point is at ``anchor`` and depth runs at ``depth_scale`` voxels per
      crop pixel;
    - channel 1: coverage, ``exp(-min_k r_k^2 / (2 cover_sigma^2))``: 1 on the
      landmarks, falling off away from them.

    Only depth differences between landmarks are used, so the z origin of the landmark
    stage does not matter.
    """

    def __init__(self, size: int, *, step: float = 1.0, start: float = 0.0,
                 sigma: float = 8.0, cover_sigma: float = 16.0, anchor: float = 191.0,
                 depth_scale: float = 2.0):
        super().__init__()
        self.size, self.step, self.start = size, step, start
        self.sigma, self.cover_sigma = sigma, cover_sigma
        self.anchor, self.depth_scale = anchor, depth_scale
        grid = start + step * torch.arange(size, dtype=torch.float32)
        self.register_buffer("grid", grid, persistent=False)

    def forward(self, landmarks: torch.Tensor) -> torch.Tensor:
        grid = self.grid.float()
        lm = landmarks[:, DEPTH_LANDMARKS[0]:DEPTH_LANDMARKS[1]].float()
        dx2 = (grid - lm[..., 0:1]) ** 2                                  # (N, K, S)
        dy2 = (grid - lm[..., 1:2]) ** 2
        r2 = dy2.unsqueeze(-1) + dx2.unsqueeze(-2)                        # (N, K, S, S)
        w = torch.softmax(r2 * (-0.5 / self.sigma ** 2), dim=1)
        z = lm[..., 2]
        front = (z - z.amax(dim=1, keepdim=True)) * self.depth_scale + self.anchor
        depth = (w * front[..., None, None]).sum(dim=1)
        cover = torch.exp(r2.amin(dim=1) * (-0.5 / self.cover_sigma ** 2))
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
