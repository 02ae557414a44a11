"""Landmark guidance: 68 Gaussian heatmaps rendered from landmark coordinates, in the
graph (:class:`LandmarkHeatmaps`, exported with the model) and in NumPy
(:func:`render_heatmaps`, the reference the graph is tested against), and the fixed
Gaussian smoothing of volume logits along depth (:class:`DepthSmoothing`).

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
