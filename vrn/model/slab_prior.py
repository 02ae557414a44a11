"""The face slab prior: a VRN-shaped occupancy volume from 68 3D landmarks alone.

It mirrors how the training targets are made (:mod:`vrn.data.voxelize`): the face is
turned frontal, its frontal depth map ``zf`` is taken, and a voxel is inside when, in
the frontal frame, ``zf(q) - thickness < q_z <= zf(q)``. Here the face is ``J`` surface
points, each a fixed affine combination of the landmarks (the ``points`` of
:class:`~vrn.model.heatmaps.LandmarkDepth`), and the steps are:

1. **pose**: an affine fit of the landmarks to a frontal reference layout (a fixed
   ``(3, 68)`` pseudo-inverse), made a rotation ``R`` by Gram-Schmidt (crop frame =
   ``R`` @ frontal frame);
2. **frontal depth map** on a ``map_size``-square grid over crop pixels ``[-16, 208)``:
   a first-order Shepard interpolation of the frontal points, each carrying the plane
   fitted to its ``K`` neighbours (fixed indices), with Gaussian weights (``sigma``
   crop pixels) that favour nearer points (``nearness`` per crop pixel); coverage is
   the points' density ``sum_j exp(-r_j^2 / (2 cover_sigma^2))``, which is smooth over
   the face (a nearest-point distance leaves holes between the points) and falls off
   at its edge;
3. **volume**: each voxel ``(d, y, x)`` is the crop point ``(x, y, (d - front) / 2 +
   z_max)`` (depth at twice the pixel scale, the nearest point at ``d = front``),
   turned frontal (the map is read on every second depth plane, ``map_planes``
   evenly spaced ones, and linearly interpolated along depth in between: the read
   point moves at most 1 crop pixel between them, and the map read is the prior's
   largest cost); its logit is the smaller of the slab's ramp ``2 * min(zf - q_z, q_z -
   zf + thickness)`` (voxels) and the face's edge ``edge_slope * (density(q) -
   cover_cut)``, each clipped to ``[outside, clamp]``: the slab cut by a smooth wall
   where the density falls to ``cover_cut``. Both terms are linear near the surface, so
   interpolating the logits between grid points moves the surface smoothly. The result
   is scaled by ``logit_scale`` (0.3 per voxel): a gentle slope keeps the sigmoid near
   linear between neighbouring voxels where the surface is steep (a face's sides), so
   that marching cubes, which interpolates the occupancy linearly, does not terrace it.

Everything is a fixed function of the landmarks (no trained parameters): on the
AFLW2000-3D sample, from our landmark stage, its isosurface alone scores an ICP NME of
about 0.022. :func:`render_slab_prior` is its NumPy twin.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_LANDMARKS = 68


def _default_reference(num_points: int, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """A finite placeholder reference (pseudo-inverse of a fixed layout) and neighbour
    table, replaced by the fitted ones (``tools/fit_surface_points.py``)."""
    rng = np.random.default_rng(0)
    layout = rng.standard_normal((NUM_LANDMARKS, 3))
    pinv = np.linalg.pinv(layout - layout.mean(0))
    table = (np.arange(num_points)[:, None] + np.arange(1, neighbours + 1)) % num_points
    return pinv.astype(np.float32), table.astype(np.int64)


def landmark_rotation(landmarks: torch.Tensor, reference_pinv: torch.Tensor) -> torch.Tensor:
    """Rotation ``(N, 3, 3)`` (crop = R @ frontal) of landmarks ``(N, 68, 3)``, from the
    affine fit ``L - mean(L) ~ (M - mean(M)) A^T`` (``reference_pinv`` = pinv of the
    centred frontal layout ``M``, ``(3, 68)``) and Gram-Schmidt on ``A``'s rows."""
    centred = landmarks - landmarks.mean(dim=1, keepdim=True)
    a_t = torch.matmul(reference_pinv, centred)                  # (N, 3, 3) = A^T
    a1, a2 = a_t[..., 0], a_t[..., 1]                            # A's first two rows
    r1 = a1 / (a1.norm(dim=-1, keepdim=True) + 1e-6)
    a2 = a2 - (a2 * r1).sum(dim=-1, keepdim=True) * r1
    r2 = a2 / (a2.norm(dim=-1, keepdim=True) + 1e-6)
    r3 = torch.stack([r1[..., 1] * r2[..., 2] - r1[..., 2] * r2[..., 1],
                      r1[..., 2] * r2[..., 0] - r1[..., 0] * r2[..., 2],
                      r1[..., 0] * r2[..., 1] - r1[..., 1] * r2[..., 0]], dim=-1)
    return torch.stack([r1, r2, r3], dim=1)


class SlabPrior(nn.Module):
    """The face slab prior (see the module docstring).

    ``forward(landmarks (N, 68, 3) float32 crop px (x, y, z toward the camera), points
    (J, 68)) -> (N, depth, size, size)`` float32 logits (``logit_scale`` per voxel of
    distance to the slab's surface), on the crop grid
    ``linspace(0, crop - 1, size)`` (``align_corners`` sampling of a ``crop``-pixel crop).
    Buffers ``reference_pinv`` ``(3, 68)`` and ``neighbours`` ``(J, K)`` int64 are
    fitted with the surface points and saved with the model.
    """

    MAP_START, MAP_STOP = -16.0, 207.0

    def __init__(self, size: int, *, depth: int = 200, crop: int = 192, front: int = 191,
                 num_points: int = 256, neighbours: int = 6, map_size: int = 64,
                 sigma: float = 2.5, nearness: float = 0.1, cover_sigma: float = 5.0,
                 cover_cut: float = 1.0, edge_slope: float = 30.0, thickness: float = 20.0,
                 clamp: float = 30.0, outside: float = -30.0, logit_scale: float = 0.3,
                 map_planes: int | None = None):
        super().__init__()
        self.depth, self.front = depth, front
        self.map_planes = map_planes or depth // 2 + 1
        self.sigma, self.nearness, self.cover_sigma = sigma, nearness, cover_sigma
        self.cover_cut, self.edge_slope = cover_cut, edge_slope
        self.logit_scale = logit_scale
        self.thickness, self.clamp, self.outside = thickness, clamp, outside
        pinv, table = _default_reference(num_points, neighbours)
        self.register_buffer("reference_pinv", torch.from_numpy(pinv))
        self.register_buffer("neighbours", torch.from_numpy(table))
        self.register_buffer("map_grid", torch.linspace(self.MAP_START, self.MAP_STOP,
                                                        map_size), persistent=False)
        self.register_buffer("grid", torch.linspace(0, crop - 1, size), persistent=False)
        self.register_buffer("depth_px", (torch.arange(depth, dtype=torch.float32) - front)
                             .view(1, depth, 1, 1) * 0.5, persistent=False)
        self.register_buffer("map_depth_px", (torch.linspace(0, depth - 1, self.map_planes)
                                              - front).view(1, -1, 1, 1) * 0.5,
                             persistent=False)

    def frontal_map(self, frontal: torch.Tensor) -> torch.Tensor:
        """Frontal points ``(N, J, 3)`` -> ``(N, 2, M, M)``: depth (crop px) and point
        density on the map grid."""
        g = self.map_grid
        j, k = self.neighbours.shape
        diff = (torch.index_select(frontal, 1, self.neighbours.reshape(-1)).reshape(-1, j, k, 3)
                - frontal[:, :, None])
        dx, dy, dz = diff[..., 0], diff[..., 1], diff[..., 2]
        sxx, syy, sxy = (dx * dx).sum(-1), (dy * dy).sum(-1), (dx * dy).sum(-1)
        sxz, syz = (dx * dz).sum(-1), (dy * dz).sum(-1)
        det = torch.clamp(sxx * syy - sxy * sxy, min=0.0) + 1e-6 * (sxx + syy) ** 2 + 1e-3
        gx = torch.clamp((syy * sxz - sxy * syz) / det, -3.0, 3.0)          # (N, J)
        gy = torch.clamp((sxx * syz - sxy * sxz) / det, -3.0, 3.0)
        # The Gaussian weights factor into x and y terms, so each sum over the points
        # is one (M, J) @ (J, M) product instead of a (J, M, M) tensor. Coordinates are
        # taken about the points' centre and top, which keeps the planes' offsets small.
        x, y, z = frontal[..., 0:1], frontal[..., 1:2], frontal[..., 2]
        cx, cy = x.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)   # (N, 1, 1)
        top = z.amax(dim=1, keepdim=True)                                   # (N, 1)
        gxs, gys = g - cx, g - cy                                           # (N, 1, M)
        ex = torch.exp((gxs - (x - cx)) ** 2 * (-0.5 / self.sigma ** 2))    # (N, J, M)
        ey = torch.exp((gys - (y - cy)) ** 2 * (-0.5 / self.sigma ** 2))
        near = torch.exp(self.nearness * (z - top))                         # (N, J)
        offset = (z - top) - gx * (x - cx)[..., 0] - gy * (y - cy)[..., 0]

        def weighted(coef):                              # (N, J) -> (N, M, M) [y, x]
            return torch.matmul((ey * coef.unsqueeze(-1)).transpose(1, 2), ex)

        planes = (weighted(near * offset) + weighted(near * gx) * gxs
                  + weighted(near * gy) * gys.transpose(1, 2))
        depth = planes / torch.clamp(weighted(near), min=1e-30) + top.unsqueeze(-1)
        cover_x = torch.exp((g - x) ** 2 * (-0.5 / self.cover_sigma ** 2))
        cover_y = torch.exp((g - y) ** 2 * (-0.5 / self.cover_sigma ** 2))
        cover = torch.matmul(cover_y.transpose(1, 2), cover_x)
        return torch.stack([depth, cover], dim=1)

    def forward(self, landmarks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        lm = landmarks.float()
        rot = landmark_rotation(lm, self.reference_pinv.float())          # (N, 3, 3)
        p = torch.matmul(points.float(), lm)                              # (N, J, 3)
        centre = p.mean(dim=1, keepdim=True)
        frontal = torch.matmul(p - centre, rot) + centre                   # R^T (p - c) + c
        fmap = self.frontal_map(frontal)                                   # (N, 2, M, M)
        n, s, d, k = lm.shape[0], self.grid.shape[0], self.depth, self.map_planes
        c = centre[:, 0]                                                   # (N, 3)
        px = (self.grid.view(1, 1, 1, s) - c[:, 0].view(-1, 1, 1, 1))
        py = (self.grid.view(1, 1, s, 1) - c[:, 1].view(-1, 1, 1, 1))
        top = (p[..., 2].amax(dim=1) - c[:, 2]).view(-1, 1, 1, 1)
        pz, map_pz = self.depth_px + top, self.map_depth_px + top
        r = rot.view(-1, 9, 1, 1, 1)
        qx = r[:, 0] * px + r[:, 3] * py + r[:, 6] * map_pz + c[:, 0].view(-1, 1, 1, 1)
        qy = r[:, 1] * px + r[:, 4] * py + r[:, 7] * map_pz + c[:, 1].view(-1, 1, 1, 1)
        qz = r[:, 2] * px + r[:, 5] * py + r[:, 8] * pz + c[:, 2].view(-1, 1, 1, 1)
        span = self.MAP_STOP - self.MAP_START
        uv = torch.stack([(qx - self.MAP_START) * (2.0 / span) - 1.0,
                          (qy - self.MAP_START) * (2.0 / span) - 1.0], dim=-1)
        sampled = F.grid_sample(fmap, uv.reshape(n, k * s, s, 2), mode="bilinear",
                                padding_mode="border", align_corners=True)
        sampled = F.interpolate(sampled.reshape(n, 2, k, s * s), size=(d, s * s),
                                mode="bilinear", align_corners=True)   # along depth
        sampled = sampled.reshape(n, 2, d, s, s)
        zf, cover = sampled[:, 0], sampled[:, 1]
        inside = torch.minimum(zf - qz, qz - zf + self.thickness)
        ramp = torch.clamp(2.0 * inside, -self.clamp, self.clamp)
        edge = torch.clamp(self.edge_slope * (cover - self.cover_cut), self.outside, self.clamp)
        return self.logit_scale * torch.minimum(ramp, edge)


def render_slab_prior(landmarks: np.ndarray, points: np.ndarray, reference_pinv: np.ndarray,
                      neighbours: np.ndarray, *, size: int, depth: int = 200, crop: int = 192,
                      front: int = 191, map_size: int = 64, sigma: float = 2.5,
                      nearness: float = 0.1, cover_sigma: float = 5.0,
                      cover_cut: float = 1.0, edge_slope: float = 30.0,
                      thickness: float = 20.0, clamp: float = 30.0,
                      outside: float = -30.0, logit_scale: float = 0.3,
                      map_planes: int | None = None) -> np.ndarray:
    """NumPy twin of :class:`SlabPrior`: ``(N, 68, 3)`` landmarks -> ``(N, depth, size,
    size)`` float32 logits."""
    from scipy.ndimage import map_coordinates

    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (NUM_LANDMARKS, 3):
        raise ValueError(f"landmarks must be (N, 68, 3), got {lm.shape}")
    g = np.linspace(SlabPrior.MAP_START, SlabPrior.MAP_STOP, map_size)
    step = g[1] - g[0]
    grid = np.linspace(0, crop - 1, size)
    map_planes = map_planes or depth // 2 + 1
    map_d = np.linspace(0, depth - 1, map_planes)
    # Each depth plane between two map planes: its lower one and the weight of the upper.
    at = np.arange(depth) * ((map_planes - 1) / (depth - 1))
    lower = np.minimum(np.floor(at).astype(int), map_planes - 2)
    upper_weight = (at - lower)[:, None, None]
    out = np.empty((len(lm), depth, size, size), np.float32)
    for n, one in enumerate(lm):
        centred = one - one.mean(0)
        a = (np.asarray(reference_pinv, np.float64) @ centred).T
        r1 = a[0] / (np.linalg.norm(a[0]) + 1e-6)
        a2 = a[1] - (a[1] @ r1) * r1
        r2 = a2 / (np.linalg.norm(a2) + 1e-6)
        rot = np.stack([r1, r2, np.cross(r1, r2)])
        p = np.asarray(points, np.float64) @ one
        c = p.mean(0)
        q = (p - c) @ rot + c
        near = q[neighbours] - q[:, None]
        dx, dy, dz = near[..., 0], near[..., 1], near[..., 2]
        sxx, syy, sxy = (dx * dx).sum(-1), (dy * dy).sum(-1), (dx * dy).sum(-1)
        sxz, syz = (dx * dz).sum(-1), (dy * dz).sum(-1)
        det = np.maximum(sxx * syy - sxy ** 2, 0) + 1e-6 * (sxx + syy) ** 2 + 1e-3
        gx = np.clip((syy * sxz - sxy * syz) / det, -3, 3)[:, None, None]
        gy = np.clip((sxx * syz - sxy * sxz) / det, -3, 3)[:, None, None]
        ox = g[None, None, :] - q[:, 0, None, None]
        oy = g[None, :, None] - q[:, 1, None, None]
        r2 = ox ** 2 + oy ** 2
        planes = q[:, 2, None, None] + gx * ox + gy * oy
        logits = -r2 / (2 * sigma ** 2) + nearness * (q[:, 2] - q[:, 2].max())[:, None, None]
        w = np.exp(logits - logits.max(0))
        w /= w.sum(0)
        zmap = (w * planes).sum(0)
        cmap = np.exp(-r2 / (2 * cover_sigma ** 2)).sum(0)
        pd = (np.arange(depth)[:, None, None] - front) * 0.5 + p[:, 2].max() - c[2]
        map_pd = (map_d[:, None, None] - front) * 0.5 + p[:, 2].max() - c[2]
        px, py = grid[None, None, :] - c[0], grid[None, :, None] - c[1]
        qx, qy = (np.broadcast_to(rot[0, k] * px + rot[1, k] * py + rot[2, k] * map_pd + c[k],
                                  (map_planes, size, size)) for k in range(2))
        qz = rot[0, 2] * px + rot[1, 2] * py + rot[2, 2] * pd + c[2]
        coords = [((qy - g[0]) / step).ravel(), ((qx - g[0]) / step).ravel()]
        zf, cover = (map_coordinates(m, coords, order=1, mode="nearest").reshape(qx.shape)
                     for m in (zmap, cmap))
        zf, cover = ((1 - upper_weight) * v[lower] + upper_weight * v[lower + 1]
                     for v in (zf, cover))
        inside = np.minimum(zf - qz, qz - zf + thickness)
        edge = np.clip(edge_slope * (cover - cover_cut), outside, clamp)
        out[n] = logit_scale * np.minimum(np.clip(2 * inside, -clamp, clamp), edge)
    return out
