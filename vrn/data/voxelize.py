"""Face mesh aligned to the crop -> VRN's binary occupancy volume
(``docs/reference.md``, "Training").

What the volume means (our training targets, and how the shipped model's output reads):

- shape ``(D, H, W)`` = ``(200, 192, 192)``, axis order ``[d][y][x]``; voxel ``(d, y, x)``
  sits over crop pixel ``(x, y)`` (pixel centres at integer coordinates);
- depth is at **twice the crop-pixel scale** and grows toward the camera: a surface point
  at crop-pixel depth ``z`` lies at ``d = 2 z + offset``. The offset puts the face's
  nearest visible point at ``d = D - 1 - FRONT_MARGIN`` (``D - 9``), so the visible face
  fills the volume from the front and whatever lies more than ``(D - 9) / 2`` crop
  pixels behind its nearest point is cut off;
- **face only** (the BFM face region: no ears, neck or hair), **mouth filled** (holes
  enclosed by the face take the depth of their nearest covered pixel);
- **frontalised, filled back to a fixed depth, rotated back**: with ``rotation`` ``R``
  (the face's pose, frontal frame -> crop frame), the mesh is turned frontal
  (``q = R^T (p - c) + c`` about its centroid ``c``), its frontal depth map ``zf`` is
  rendered, and a point is inside the face's slab when ``zf(q) - thickness / 2 < q_z <=
  zf(q)`` (``thickness`` voxels, default 40, i.e. 20 crop pixels, measured along the
  frontal viewing direction). The volume holds every voxel of that rotated slab whose
  column the face covers, from the visible surface (the camera z-buffer) back: a
  profile face is filled across, and the hidden half of a turned face is there as well,
  as in the paper's targets. ``rotation=None`` is the identity: the fill then runs
  along the camera axis.

A camera ray crosses the slab in a few runs of occupied voxels (the visible part, then
for a turned face the hidden cheek behind the nose, rarely more), so a target is stored
exactly as a ``(K, 2, H, W)`` uint8 map of ``[start, stop)`` per run and column
(:func:`column_runs`, :func:`volume_from_runs`; ``K`` = :data:`MAX_RUNS` = 3 by
default, gaps of up to four voxels are bridged).

The isosurface at 0.5 of such a volume, with vertex ``z = 0.5 d``, lies within half a
voxel of the visible surface (the surface at ``front`` is rounded to the voxel grid).
"""

from __future__ import annotations

import numba
import numpy as np

from ..runtime.render import _rasterize

VOLUME_DEPTH = 200
VOLUME_SIZE = 192
DEPTH_SCALE = 2.0
FRONT_MARGIN = 8
THICKNESS = 40
# Slack of the inside test (crop pixels on the front side; voxels of a run's gap) that
# absorbs the frontal depth map's pixel grid.
_FRONT_TOLERANCE = 1.0
_RUN_GAP = 4
MAX_RUNS = 3


def front_depth(vertices: np.ndarray, triangles: np.ndarray,
                size: int | tuple[int, int] = VOLUME_SIZE) -> np.ndarray:
    """Z-buffer of the mesh seen along -z: ``(H, W)`` float32 depth of the nearest
    surface (largest z), ``-inf`` where no triangle covers the pixel.

    ``vertices`` ``(V, 3)`` ``(x, y, z)`` pixels (z toward the camera); ``triangles``
    ``(F, 3)`` int; ``size``: ``S`` for ``(S, S)`` or ``(H, W)``.
    """
    vertices = np.ascontiguousarray(vertices, dtype=np.float32)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must be (V, 3), got {vertices.shape}")
    h, w = (size, size) if np.isscalar(size) else size
    zbuf = np.full((h, w), -np.inf, np.float32)
    scratch = np.zeros((h, w, 3), np.float32)
    rgb = np.zeros((len(vertices), 3), np.float32)
    _rasterize(vertices, np.ascontiguousarray(triangles, dtype=np.int64), rgb, zbuf, scratch)
    return zbuf


def _fill_holes(z: np.ndarray) -> np.ndarray:
    """Give pixels enclosed by the face (the open mouth, slivers between triangles) the
    depth of their nearest covered pixel, so the mouth is filled as in the paper."""
    from scipy import ndimage

    covered = np.isfinite(z)
    holes = ndimage.binary_fill_holes(covered) & ~covered
    if holes.any():
        _, (iy, ix) = ndimage.distance_transform_edt(~covered, return_indices=True)
        z = z.copy()
        z[holes] = z[iy[holes], ix[holes]]
    return z


@numba.njit(cache=True, nogil=True)
def _walk_columns(front, frontal, origin, rt, centre, z_reference, anchor, half_thickness,
                  depth, runs):
    """Fill ``runs`` ``(K, 2, H, W)`` from the camera front ``(H, W)`` (voxels, ``-inf``
    where uncovered) and the frontal depth map ``frontal`` ``(Hf, Wf)`` (crop pixels,
    pixel ``(i, j)`` at frontal ``(x, y) = origin + (j, i)``). A column with more than
    ``K`` runs keeps the nearest ``K``."""
    k_max = runs.shape[0]
    h, w = front.shape
    hf, wf = frontal.shape
    for y in range(h):
        for x in range(w):
            f = front[y, x]
            if not np.isfinite(f):
                continue
            stop = min(max(int(np.floor(f)) + 1, 0), depth)
            if stop == 0:
                continue
            k = 0
            start = stop - 1  # the visible surface always opens the first run
            px, py = x - centre[0], y - centre[1]
            for d in range(stop - 2, -1, -1):
                pz = z_reference + (d - anchor) / DEPTH_SCALE - centre[2]
                qx = rt[0, 0] * px + rt[0, 1] * py + rt[0, 2] * pz + centre[0]
                qy = rt[1, 0] * px + rt[1, 1] * py + rt[1, 2] * pz + centre[1]
                qz = rt[2, 0] * px + rt[2, 1] * py + rt[2, 2] * pz + centre[2]
                j = int(np.floor(qx - origin[0] + 0.5))
                i = int(np.floor(qy - origin[1] + 0.5))
                if not (0 <= i < hf and 0 <= j < wf):
                    continue
                zf = frontal[i, j]
                if not (zf - half_thickness < qz <= zf + _FRONT_TOLERANCE):
                    continue
                if d >= start - 1 - _RUN_GAP:  # continues (or bridges a small gap in) the run
                    start = d
                    continue
                if k < k_max:
                    runs[k, 0, y, x] = start
                    runs[k, 1, y, x] = stop
                k += 1
                start, stop = d, d + 1
            if k < k_max:
                runs[k, 0, y, x] = start
                runs[k, 1, y, x] = stop


def column_runs(vertices: np.ndarray, triangles: np.ndarray, *,
                rotation: np.ndarray | None = None, size: int = VOLUME_SIZE,
                depth: int = VOLUME_DEPTH, thickness: int = THICKNESS,
                max_runs: int = MAX_RUNS, z_reference: float | None = None) -> np.ndarray:
    """The compact, exact form of the target volume: ``(max_runs, 2, size, size)`` uint8
    ``[start, stop)`` per run, nearest the camera first; column ``(y, x)`` is occupied
    for ``start <= d < stop`` of any of its runs (unused runs hold ``0, 0``). See the
    module docstring.

    ``vertices`` ``(V, 3)`` float ``(x, y, z)`` crop pixels, x right, y down, z toward
    the camera; ``triangles`` ``(F, 3)`` int; ``rotation`` ``(3, 3)``: the face's pose,
    frontal-frame directions -> crop-frame directions (same axis convention; see
    :func:`vrn.data.bfm.crop_rotation`); ``max_runs``: runs kept per column (a column
    with more keeps the nearest ones); ``z_reference``: the crop-pixel depth put at
    ``d = depth - 1 - FRONT_MARGIN``, by default the nearest visible point.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1 voxel, got {thickness}")
    if depth > 255:
        raise ValueError(f"depth must be <= 255 for uint8 runs, got {depth}")
    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    vertices = np.asarray(vertices, np.float64)
    runs = np.zeros((max_runs, 2, size, size), np.uint8)
    z = _fill_holes(front_depth(vertices, triangles, size))
    covered = np.isfinite(z)
    if not covered.any():
        return runs
    if z_reference is None:
        z_reference = float(z[covered].max())
    anchor = depth - 1 - FRONT_MARGIN
    front = np.where(covered, DEPTH_SCALE * (z - z_reference) + anchor, -np.inf)

    r = np.eye(3) if rotation is None else np.asarray(rotation, np.float64)
    if r.shape != (3, 3) or not np.allclose(r @ r.T, np.eye(3), atol=1e-6):
        raise ValueError("rotation must be a (3, 3) rotation matrix")
    centre = vertices.mean(0)
    frontal = (vertices - centre) @ r + centre          # rows: R^T (p - c) + c
    origin = np.floor(frontal[:, :2].min(0)) - 2
    extent = np.ceil(frontal[:, :2].max(0) - origin).astype(int) + 3
    shifted = frontal - np.array([origin[0], origin[1], 0.0])
    zf = _fill_holes(front_depth(shifted, triangles, (int(extent[1]), int(extent[0]))))
    _walk_columns(front.astype(np.float64), zf.astype(np.float64), origin,
                  np.ascontiguousarray(r.T), centre, float(z_reference), float(anchor),
                  thickness / DEPTH_SCALE, depth, runs)
    return runs


def volume_from_runs(runs: np.ndarray, *, depth: int = VOLUME_DEPTH) -> np.ndarray:
    """Expand runs ``(..., K, 2, H, W)`` uint8 to the binary volume ``(..., D, H, W)``
    bool."""
    runs = np.asarray(runs).astype(np.int16)
    d = np.arange(depth, dtype=np.int16)[:, None, None]
    volume = np.zeros(runs.shape[:-4] + (depth,) + runs.shape[-2:], bool)
    for k in range(runs.shape[-4]):
        volume |= (d >= runs[..., k, 0, None, :, :]) & (d < runs[..., k, 1, None, :, :])
    return volume


def voxelize(vertices: np.ndarray, triangles: np.ndarray, *,
             rotation: np.ndarray | None = None, size: int = VOLUME_SIZE,
             depth: int = VOLUME_DEPTH, thickness: int = THICKNESS,
             max_runs: int = MAX_RUNS, z_reference: float | None = None) -> np.ndarray:
    """Binary occupancy volume ``(depth, size, size)`` bool of a mesh aligned to the crop
    (see the module docstring for exactly what it holds, and :func:`column_runs` for the
    arguments)."""
    runs = column_runs(vertices, triangles, rotation=rotation, size=size, depth=depth,
                       thickness=thickness, max_runs=max_runs, z_reference=z_reference)
    return volume_from_runs(runs, depth=depth)
