"""Face mesh aligned to the crop -> VRN's binary occupancy volume.

What the volume means (our training targets, and how the shipped model's output reads):

- shape ``(D, H, W)`` = ``(200, 192, 192)``, axis order ``[d][y][x]``; voxel ``(d, y, x)``
  sits over crop pixel ``(x, y)`` (pixel centres at integer coordinates);
- depth is at **twice the crop-pixel scale** and grows toward the camera: a surface point
  at crop-pixel depth ``z`` lies at ``d = 2 z + offset``. The offset puts the face's
  nearest visible point at ``d = D - 1 - FRONT_MARGIN`` (``D - 9``), so the visible face
  fills the volume from the front and whatever lies more than ``(D - 9) / 2`` crop
  pixels behind its nearest point is cut off;
- **face only** (the BFM face region: no ears, neck or hair), seen from the camera:
  ``front(y, x)`` is the z-buffer depth of the visible surface over the pixels the face
  covers, with holes enclosed by the face (an open mouth) given the depth of their
  nearest covered pixel (mouth filled); a voxel is occupied when its column is covered and
  ``front - thickness < d <= front`` (``thickness`` voxels, default 40, i.e. 20 crop
  pixels): the visible surface **filled back to a fixed depth** along the viewing
  direction. The paper fills back in the frontalised frame and rotates back; filling
  along the camera axis keeps the same visible surface (all that the network can see
  and all that the evaluation scores) and makes every column a single run of occupied
  voxels, so a target is stored exactly as one ``(H, W)`` uint8 map (:func:`top_map`).

The isosurface at 0.5 of such a volume, with vertex ``z = 0.5 d``, lies within half a
voxel of the visible surface (the surface at ``front`` is rounded to the voxel grid).
"""

from __future__ import annotations

import numpy as np

from ..runtime.render import _rasterize

VOLUME_DEPTH = 200
VOLUME_SIZE = 192
DEPTH_SCALE = 2.0
FRONT_MARGIN = 8
THICKNESS = 40


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


def top_map(vertices: np.ndarray, triangles: np.ndarray, *, size: int = VOLUME_SIZE,
            depth: int = VOLUME_DEPTH, z_reference: float | None = None) -> np.ndarray:
    """The compact, exact form of the target volume: ``(size, size)`` uint8 ``top`` with
    ``top = floor(front) + 1`` clipped to ``[0, depth]`` over covered pixels and 0
    elsewhere; column ``(y, x)`` is occupied for ``max(top - thickness, 0) <= d < top``.

    ``front = 2 (z - z_reference) + depth - 1 - FRONT_MARGIN`` in voxels;
    ``z_reference`` defaults to the largest z of the visible surface.
    """
    z = _fill_holes(front_depth(vertices, triangles, size))
    covered = np.isfinite(z)
    if not covered.any():
        return np.zeros((size, size), np.uint8)
    if z_reference is None:
        z_reference = float(z[covered].max())
    front = DEPTH_SCALE * (z[covered] - z_reference) + (depth - 1 - FRONT_MARGIN)
    top = np.zeros((size, size), np.int32)
    top[covered] = np.clip(np.floor(front).astype(np.int64) + 1, 0, depth)
    if depth > 255:
        raise ValueError(f"depth must be <= 255 for a uint8 top map, got {depth}")
    return top.astype(np.uint8)


def volume_from_top(top: np.ndarray, *, depth: int = VOLUME_DEPTH,
                    thickness: int = THICKNESS) -> np.ndarray:
    """Expand a top map ``(..., H, W)`` uint8 to the binary volume ``(..., D, H, W)`` bool."""
    top = np.asarray(top).astype(np.int16)[..., None, :, :]
    d = np.arange(depth, dtype=np.int16)[:, None, None]
    return (d < top) & (d >= top - thickness)


def voxelize(vertices: np.ndarray, triangles: np.ndarray, *, size: int = VOLUME_SIZE,
             depth: int = VOLUME_DEPTH, thickness: int = THICKNESS,
             z_reference: float | None = None) -> np.ndarray:
    """Binary occupancy volume ``(depth, size, size)`` bool of a mesh aligned to the crop
    (see the module docstring for exactly what it holds).

    ``vertices`` ``(V, 3)`` float ``(x, y, z)`` in crop pixels, x right, y down, z toward
    the camera (same units as x and y); ``triangles`` ``(F, 3)`` int.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1 voxel, got {thickness}")
    top = top_map(vertices, triangles, size=size, depth=depth, z_reference=z_reference)
    return volume_from_top(top, depth=depth, thickness=thickness)
