"""The paper's reconstruction error (``docs/reference.md``, "Evaluation") and the
posed-mean-face baseline.

``NME = mean over ground-truth vertices of the distance to the nearest point of the
predicted surface / 3D outer interocular distance`` (ground-truth landmarks 37 and 46,
1-based). Both meshes are in the photo's pixel coordinates (x right, y down, z toward
the camera). A reconstruction's depth offset is arbitrary, so before scoring the
prediction is either

- **depth-aligned**: shifted along z by the median difference between the two meshes'
  z-buffers over the pixels both cover; or
- **ICP-aligned**: depth-aligned, then moved by rigid ICP (rotation and translation,
  nearest-vertex correspondences) onto the ground truth.

Distances are exact point-to-triangle distances (the nearest triangle is searched among
those around the ``k`` nearest predicted vertices).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

OUTER_EYE_CORNERS = (36, 45)  # landmarks 37 and 46, 0-based


@dataclass
class NMEResult:
    """``depth_aligned`` and ``icp``: the NME of each alignment; ``interocular``: the
    normalising distance (pixels); ``z_shift``: the depth alignment (pixels)."""

    depth_aligned: float
    icp: float
    interocular: float
    z_shift: float


@numba.njit(cache=True, nogil=True, inline="always")
def _dot(ax, ay, az, bx, by, bz):
    return ax * bx + ay * by + az * bz


@numba.njit(cache=True, nogil=True)
def _point_triangle_sq(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
    """Squared distance from point ``p`` to triangle ``abc`` (Ericson, RTCD 5.1.5)."""
    abx, aby, abz = bx - ax, by - ay, bz - az
    acx, acy, acz = cx - ax, cy - ay, cz - az
    nx, ny, nz = aby * acz - abz * acy, abz * acx - abx * acz, abx * acy - aby * acx
    if nx * nx + ny * ny + nz * nz == 0.0:  # degenerate: its edges belong to neighbours
        return min((px - ax) ** 2 + (py - ay) ** 2 + (pz - az) ** 2,
                   (px - bx) ** 2 + (py - by) ** 2 + (pz - bz) ** 2,
                   (px - cx) ** 2 + (py - cy) ** 2 + (pz - cz) ** 2)
    d1 = _dot(abx, aby, abz, px - ax, py - ay, pz - az)
    d2 = _dot(acx, acy, acz, px - ax, py - ay, pz - az)
    if d1 <= 0.0 and d2 <= 0.0:
        qx, qy, qz = ax, ay, az
    else:
        d3 = _dot(abx, aby, abz, px - bx, py - by, pz - bz)
        d4 = _dot(acx, acy, acz, px - bx, py - by, pz - bz)
        if d3 >= 0.0 and d4 <= d3:
            qx, qy, qz = bx, by, bz
        else:
            vc = d1 * d4 - d3 * d2
            if vc <= 0.0 and d1 >= 0.0 and d3 <= 0.0:
                w = d1 / (d1 - d3)
                qx, qy, qz = ax + w * abx, ay + w * aby, az + w * abz
            else:
                d5 = _dot(abx, aby, abz, px - cx, py - cy, pz - cz)
                d6 = _dot(acx, acy, acz, px - cx, py - cy, pz - cz)
                if d6 >= 0.0 and d5 <= d6:
                    qx, qy, qz = cx, cy, cz
                else:
                    vb = d5 * d2 - d1 * d6
                    if vb <= 0.0 and d2 >= 0.0 and d6 <= 0.0:
                        w = d2 / (d2 - d6)
                        qx, qy, qz = ax + w * acx, ay + w * acy, az + w * acz
                    else:
                        va = d3 * d6 - d5 * d4
                        if va <= 0.0 and (d4 - d3) >= 0.0 and (d5 - d6) >= 0.0:
                            w = (d4 - d3) / ((d4 - d3) + (d5 - d6))
                            qx, qy, qz = bx + w * (cx - bx), by + w * (cy - by), bz + w * (cz - bz)
                        else:
                            denom = 1.0 / (va + vb + vc)
                            v, w = vb * denom, vc * denom
                            qx = ax + abx * v + acx * w
                            qy = ay + aby * v + acy * w
                            qz = az + abz * v + acz * w
    return (px - qx) ** 2 + (py - qy) ** 2 + (pz - qz) ** 2


@numba.njit(cache=True, nogil=True)
def _nearest_on_triangles(points, vertices, faces, neighbours, ptr, incident):
    out = np.empty(points.shape[0])
    for i in range(points.shape[0]):
        best = np.inf
        px, py, pz = points[i, 0], points[i, 1], points[i, 2]
        for j in range(neighbours.shape[1]):
            v = neighbours[i, j]
            for k in range(ptr[v], ptr[v + 1]):
                f = incident[k]
                a, b, c = faces[f, 0], faces[f, 1], faces[f, 2]
                d = _point_triangle_sq(px, py, pz,
                                       vertices[a, 0], vertices[a, 1], vertices[a, 2],
                                       vertices[b, 0], vertices[b, 1], vertices[b, 2],
                                       vertices[c, 0], vertices[c, 1], vertices[c, 2])
                if d < best:
                    best = d
        out[i] = np.sqrt(best)
    return out


def surface_distances(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray, *,
                      k: int = 8, tree=None) -> np.ndarray:
    """Distance ``(N,)`` float64 from each of ``points`` ``(N, 3)`` to the triangle mesh
    ``(vertices (V, 3), faces (F, 3))``; a mesh without faces gives vertex distances."""
    from scipy.spatial import cKDTree

    points = np.ascontiguousarray(points, np.float64)
    vertices = np.ascontiguousarray(vertices, np.float64)
    if len(vertices) == 0:
        raise ValueError("the predicted mesh has no vertices")
    tree = tree or cKDTree(vertices)
    k = min(k, len(vertices))
    dist, idx = tree.query(points, k=k)
    if len(faces) == 0:
        return np.asarray(dist if k == 1 else dist[:, 0], np.float64)
    idx = np.ascontiguousarray(idx.reshape(len(points), k), np.int64)
    faces = np.ascontiguousarray(faces, np.int64)
    flat = faces.ravel()
    order = np.argsort(flat, kind="stable")
    incident = (order // 3).astype(np.int64)
    ptr = np.zeros(len(vertices) + 1, np.int64)
    np.cumsum(np.bincount(flat, minlength=len(vertices)), out=ptr[1:])
    return _nearest_on_triangles(points, vertices, faces, idx, ptr, incident)


def depth_shift(gt_vertices: np.ndarray, gt_faces: np.ndarray, vertices: np.ndarray,
                faces: np.ndarray, image_size: tuple[int, int]) -> float:
    """The z shift that puts the predicted mesh's z-buffer on the ground truth's (median
    of the differences over pixels both cover; 0 when they share none)."""
    from ..data.voxelize import front_depth

    h, w = image_size
    gt = front_depth(gt_vertices, gt_faces, (h, w))
    pred = front_depth(vertices, faces, (h, w))
    both = np.isfinite(gt) & np.isfinite(pred)
    if not both.any():
        return 0.0
    return float(np.median(gt[both] - pred[both]))


def kabsch(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``R`` (3, 3) and translation ``t`` (3,) minimising
    ``|| R source + t - target ||`` over corresponding rows (no reflection)."""
    cs, ct = source.mean(0), target.mean(0)
    h = (source - cs).T @ (target - ct)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, ct - r @ cs


def icp_rigid(points: np.ndarray, vertices: np.ndarray, *, iterations: int = 30,
              max_points: int = 8000, tree=None) -> tuple[np.ndarray, np.ndarray]:
    """Rigid ICP moving ``points`` ``(N, 3)`` onto the vertex cloud ``vertices``:
    returns ``(R, t)`` with ``points @ R.T + t`` aligned. Correspondences are nearest
    vertices; the farthest 10% are ignored each round (trimmed ICP); at most
    ``max_points`` evenly spread points take part."""
    from scipy.spatial import cKDTree

    tree = tree or cKDTree(vertices)
    if len(points) > max_points:  # an even subsample is plenty to fit 6 parameters
        points = points[np.linspace(0, len(points) - 1, max_points).astype(np.int64)]
    r, t = np.eye(3), np.zeros(3)
    moved = points
    previous = np.inf
    for _ in range(iterations):
        dist, idx = tree.query(moved)
        keep = dist <= np.quantile(dist, 0.9)
        r_step, t_step = kabsch(moved[keep], vertices[idx[keep]])
        r, t = r_step @ r, r_step @ t + t_step
        moved = points @ r.T + t
        err = float(dist[keep].mean())
        if previous - err < 1e-6 * max(err, 1e-12):
            break
        previous = err
    return r, t


def reconstruction_nme(gt_vertices: np.ndarray, gt_faces: np.ndarray,
                       gt_landmarks: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                       image_size: tuple[int, int], *, icp_iterations: int = 30
                       ) -> NMEResult:
    """NME of a predicted mesh against the ground truth, both in photo pixels.

    ``gt_vertices`` ``(V, 3)``, ``gt_faces`` ``(F, 3)``: the ground-truth face mesh;
    ``gt_landmarks`` ``(68, 3)`` its 68 landmarks; ``vertices``/``faces``: the
    prediction; ``image_size`` ``(H, W)``: the photo's size (for the depth alignment).
    """
    from scipy.spatial import cKDTree

    gt_vertices = np.asarray(gt_vertices, np.float64)
    vertices = np.asarray(vertices, np.float64)
    if len(vertices) == 0 or len(faces) == 0:
        raise ValueError("the predicted mesh is empty")
    a, b = OUTER_EYE_CORNERS
    interocular = float(np.linalg.norm(gt_landmarks[a] - gt_landmarks[b]))
    if not interocular > 0:
        raise ValueError("the ground-truth outer eye corners coincide")
    shift = depth_shift(gt_vertices, gt_faces, vertices, faces, image_size)
    aligned = vertices + np.array([0.0, 0.0, shift])
    tree = cKDTree(aligned)
    plain = surface_distances(gt_vertices, aligned, faces, tree=tree).mean() / interocular
    # Move the ground truth onto the prediction (the same rigid fit, inverted), so the
    # prediction's search tree is built once.
    r, t = icp_rigid(gt_vertices, aligned, iterations=icp_iterations, tree=tree)
    icp = surface_distances(gt_vertices @ r.T + t, aligned, faces, tree=tree).mean()
    return NMEResult(depth_aligned=float(plain), icp=float(icp / interocular),
                     interocular=interocular, z_shift=shift)


def posed_mean_face(bfm, pose: np.ndarray, image_height: int) -> np.ndarray:
    """The BFM mean face ``(V, 3)`` placed with the ground-truth ``pose``
    (``Pose_Para``): the baseline every reconstruction should beat."""
    from ..data.bfm import pose_vertices

    return pose_vertices(bfm.vertices(), pose, image_height)


def similarity_fit(source: np.ndarray, target: np.ndarray
                   ) -> tuple[float, np.ndarray, np.ndarray]:
    """Scale ``s``, rotation ``R`` (3, 3) and translation ``t`` (3,) minimising
    ``|| s R source + t - target ||`` over corresponding rows ``(K, 3)`` (Umeyama; no
    reflection)."""
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    cs, ct = source.mean(0), target.mean(0)
    a, b = source - cs, target - ct
    u, sigma, vt = np.linalg.svd(b.T @ a / len(a))
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    r = u @ d @ vt
    scale = float(np.trace(np.diag(sigma) @ d) / (a ** 2).sum(1).mean())
    return scale, r, ct - scale * r @ cs


def landmark_posed_mean_face(bfm, landmarks: np.ndarray) -> np.ndarray:
    """The BFM mean face ``(V, 3)`` in photo pixels, placed by the similarity that best
    maps its 68 keypoints onto ``landmarks`` ``(68, 3)`` photo pixels ``(x, y, z)`` (a
    landmark stage's output): the baseline for a system that estimates its own pose."""
    flip = np.array([1.0, -1.0, 1.0])  # model frame (y up) -> image axes (y down)
    mean = bfm.vertices() * flip
    scale, r, t = similarity_fit(mean[bfm.landmarks], landmarks)
    return scale * mean @ r.T + t
