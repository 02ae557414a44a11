"""Drawing meshes: a z-buffer rasteriser (Numba) with Lambert shading, the overlay of
the shaded surface on the photo, and a side view.

Frames: vertices ``(x, y, z)`` in image pixels, x right, y down, z toward the camera
(larger z is nearer, so the z-buffer keeps the largest z).
"""

from __future__ import annotations

import numba
import numpy as np

from .mesh import FaceMesh

_LIGHT = np.array([0.3, -0.4, 1.0], dtype=np.float32)
_LIGHT /= np.linalg.norm(_LIGHT)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals ``(V, 3)`` float32."""
    v = vertices.astype(np.float32, copy=False)
    tri = v[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros_like(v)
    for k in range(3):
        for axis in range(3):
            normals[:, axis] += np.bincount(faces[:, k], weights=face_n[:, axis],
                                            minlength=len(v)).astype(np.float32)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return normals / np.maximum(length, 1e-12)


@numba.njit(cache=True, nogil=True)
def _rasterize(xyz, faces, rgb, zbuf, image):
    """Gouraud-fill ``faces`` into ``image`` ``(H, W, 3)`` float32 with a max-z buffer."""
    h, w = zbuf.shape
    for f in range(faces.shape[0]):
        a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
        x0, y0, z0 = xyz[a, 0], xyz[a, 1], xyz[a, 2]
        x1, y1, z1 = xyz[b, 0], xyz[b, 1], xyz[b, 2]
        x2, y2, z2 = xyz[c, 0], xyz[c, 1], xyz[c, 2]
        area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        if area == 0.0:
            continue
        xmin = max(int(np.floor(min(x0, min(x1, x2)))), 0)
        xmax = min(int(np.ceil(max(x0, max(x1, x2)))), w - 1)
        ymin = max(int(np.floor(min(y0, min(y1, y2)))), 0)
        ymax = min(int(np.ceil(max(y0, max(y1, y2)))), h - 1)
        inv = 1.0 / area
        for py in range(ymin, ymax + 1):
            for px in range(xmin, xmax + 1):
                w0 = ((x1 - px) * (y2 - py) - (x2 - px) * (y1 - py)) * inv
                w1 = ((x2 - px) * (y0 - py) - (x0 - px) * (y2 - py)) * inv
                w2 = 1.0 - w0 - w1
                if w0 < 0.0 or w1 < 0.0 or w2 < 0.0:
                    continue
                z = w0 * z0 + w1 * z1 + w2 * z2
                if z <= zbuf[py, px]:
                    continue
                zbuf[py, px] = z
                for ch in range(3):
                    image[py, px, ch] = w0 * rgb[a, ch] + w1 * rgb[b, ch] + w2 * rgb[c, ch]


def render_mesh(vertices: np.ndarray, faces: np.ndarray, size: tuple[int, int], *,
                colors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise a Lambert-shaded mesh seen along -z (orthographic, image frame).

    Returns ``(image, mask)``: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` bool coverage.
    ``colors`` ``(V, 3)`` uint8 modulate the shading; without them the surface is grey.
    """
    h, w = size
    image = np.zeros((h, w, 3), np.float32)
    zbuf = np.full((h, w), -np.inf, np.float32)
    if len(faces):
        normals = vertex_normals(vertices, faces)
        shade = 0.25 + 0.75 * np.abs(normals @ _LIGHT)  # two-sided
        base = (colors.astype(np.float32) / 255.0 if colors is not None
                else np.full((len(vertices), 3), 0.8, np.float32))
        rgb = np.ascontiguousarray(base * shade[:, None], dtype=np.float32)
        _rasterize(np.ascontiguousarray(vertices, dtype=np.float32),
                   np.ascontiguousarray(faces, dtype=np.int64), rgb, zbuf, image)
    mask = np.isfinite(zbuf)
    return (np.clip(image * 255.0 + 0.5, 0, 255)).astype(np.uint8), mask


def overlay(photo: np.ndarray, meshes: list[FaceMesh], *, alpha: float = 0.85,
            colored: bool = False) -> np.ndarray:
    """The shaded surfaces drawn over ``photo`` ``(H, W, 3)`` uint8 RGB."""
    out = photo.copy()
    if not meshes:
        return out
    vertices = np.concatenate([m.vertices for m in meshes])
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    faces = np.concatenate([m.faces + o for m, o in zip(meshes, offsets)])
    colors = np.concatenate([m.colors for m in meshes]) if colored else None
    shaded, mask = render_mesh(vertices, faces, photo.shape[:2], colors=colors)
    blend = (alpha * shaded[mask] + (1 - alpha) * photo[mask]).round()
    out[mask] = blend.astype(np.uint8)
    return out


def side_view(mesh: FaceMesh, size: int = 256, *, yaw_degrees: float = 90.0) -> np.ndarray:
    """The mesh turned by ``yaw_degrees`` about the vertical axis, fitted into a
    ``(size, size, 3)`` uint8 RGB panel on a dark background."""
    panel = np.full((size, size, 3), 32, np.uint8)
    if mesh.is_empty:
        return panel
    v = mesh.vertices.astype(np.float64)
    centre = (v.min(0) + v.max(0)) / 2
    v = v - centre
    t = np.deg2rad(yaw_degrees)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    v = v @ rot.T
    extent = max(np.ptp(v[:, 0]), np.ptp(v[:, 1]), 1e-6)
    scale = 0.9 * size / extent
    v = v * scale + np.array([size / 2, size / 2, 0])
    shaded, mask = render_mesh(v.astype(np.float32), mesh.faces, (size, size),
                               colors=mesh.colors)
    panel[mask] = shaded[mask]
    return panel
