"""A learnable toy problem for the training loop, shared by the training tests."""

from __future__ import annotations

import numpy as np


def disk_samples(n: int = 4, size: int = 32) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Disks whose brightness says how near they are: ``(image (size, size, 3) uint8,
    runs (1, 2, size, size) uint8, landmarks (68, 3) float32)`` per sample (the landmarks
    are random points; their z comes from a separate generator)."""
    rng = np.random.default_rng(0)
    depth_rng = np.random.default_rng(1)
    out = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cx, cy, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 9)
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        level = 3 + i % 5
        image = np.zeros((size, size, 3), np.uint8)
        image[inside] = 40 * level
        runs = np.stack([np.where(inside, max(level - 3, 0), 0),
                         np.where(inside, level, 0)])[None].astype(np.uint8)  # one run
        landmarks = np.stack([rng.uniform(4, 28, 68), rng.uniform(4, 28, 68),
                              depth_rng.uniform(-3, 3, 68)], 1)
        out.append((image, runs, landmarks.astype(np.float32)))
    return out
