"""Marching-cubes lookup tables, generated at import from the geometry of the cube.

Nothing here is pasted from another implementation: the 256 cases are derived from
three rules.

1. **Polygons.** On every face of the cube the surface crosses the edges whose two
   corners lie on opposite sides of the level. A face with two crossings gets one
   segment. A face with four crossings (the ambiguous face: above and below corners
   alternate) gets two segments, each cutting off one *above* corner, so the below
   corners stay connected across the face. This is how the classic 256-case table
   (Lorensen and Cline 1987) resolves it as ``skimage.measure.marching_cubes(...,
   method='lorensen')`` indexes it, and since neighbouring cubes then agree on every
   shared face, meshes are closed. The segments chain into closed cycles, one polygon
   (3 to 7 corners) per cycle.
2. **Orientation.** Each polygon winds counter-clockwise seen from the side of the
   values below the level: its right-hand normal ``(v1 - v0) x (v2 - v0)`` in the
   ``(x, y, z)`` frame points toward lower values.
3. **Triangulation.** Each polygon is split by the triangulation whose diagonals are
   shortest in total, with the crossings at the edge midpoints, among those with no
   diagonal inside a cube face (the neighbouring cube could draw the same one there);
   ties go to the first candidate in a fixed order. The classic table's splits follow
   the cube's symmetry class by class, but for self-symmetric cases it picks one of the
   equivalent splits with no rule (and the same polygon is split differently depending
   on the other pieces in the cube), so no generated table reproduces it without
   per-case data copied from it. Our triangles therefore differ from its triangles
   inside such polygons, while the vertices, the polygons and their orientation are
   the same.

Numbering. Corner ``i`` of the cube whose lowest corner is grid point ``(x, y, z)`` sits
at ``(x + dx, y + dy, z + dz)`` with ``i = dx | dy << 1 | dz << 2``. A case index has bit
``i`` set when corner ``i`` is *above* the level (``value > level``). Edge ``e`` joins
its owner corner ``EDGE_CORNER[e]`` (the lower end) to the next corner along axis
``EDGE_AXIS[e]`` (0 = x, 1 = y, 2 = z); edges are ordered by owner corner, then axis, so
the order of edges within one owner matches the order of that grid point's vertices.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["CORNER_OFFSETS", "EDGE_AXIS", "EDGE_CORNER", "MAX_TRIANGLES", "TRIANGLES",
           "TRIANGLE_COUNT", "case_polygons"]

MAX_TRIANGLES = 5

CORNER_OFFSETS = np.array([(i & 1, (i >> 1) & 1, (i >> 2) & 1) for i in range(8)],
                          dtype=np.int8)
"""``(8, 3)`` int8: ``(dx, dy, dz)`` of each cube corner."""

_EDGES = [(corner, axis) for corner in range(8) for axis in range(3)
          if not (corner >> axis) & 1]
EDGE_CORNER = np.array([corner for corner, _ in _EDGES], dtype=np.int8)
"""``(12,)`` int8: the lower corner of each edge, which owns the edge's vertex."""
EDGE_AXIS = np.array([axis for _, axis in _EDGES], dtype=np.int8)
"""``(12,)`` int8: the axis of each edge (0 = x, 1 = y, 2 = z)."""

_EDGE_INDEX = {}
for _e, (_corner, _axis) in enumerate(_EDGES):
    _EDGE_INDEX[frozenset((_corner, _corner | (1 << _axis)))] = _e


Point = tuple[float, float, float]


def _faces() -> list[tuple[Point, tuple[int, int, int, int]]]:
    """The six faces as (outward normal, four corners in cyclic order)."""
    faces = []
    for axis, side in itertools.product(range(3), (0, 1)):
        u, v = [a for a in range(3) if a != axis]
        ring = [(0, 0), (1, 0), (1, 1), (0, 1)]
        corners = tuple((side << axis) | (bu << u) | (bv << v) for bu, bv in ring)
        normal = tuple(float(side * 2 - 1) if a == axis else 0.0 for a in range(3))
        faces.append((normal, corners))
    return faces


_FACES = _faces()
_CORNER_POINTS = [tuple(float(c) for c in offset) for offset in CORNER_OFFSETS]


def _edge_midpoint(edge: int) -> Point:
    corner, axis = int(EDGE_CORNER[edge]), int(EDGE_AXIS[edge])
    return tuple(c + (0.5 if a == axis else 0.0) for a, c in enumerate(_CORNER_POINTS[corner]))


def _mean(points: list[Point]) -> Point:
    return tuple(sum(p[a] for p in points) / len(points) for a in range(3))


def _orientation(a: Point, b: Point, c: Point, normal: Point) -> float:
    """``((b - a) x (c - a)) . normal``: positive when a, b, c turn counter-clockwise
    seen from the side ``normal`` points to."""
    u = [b[i] - a[i] for i in range(3)]
    w = [c[i] - a[i] for i in range(3)]
    cross = (u[1] * w[2] - u[2] * w[1], u[2] * w[0] - u[0] * w[2], u[0] * w[1] - u[1] * w[0])
    return sum(cross[i] * normal[i] for i in range(3))


def _face_segments(case: int) -> dict[int, int]:
    """Directed segments ``start edge -> end edge`` of the surface on the cube's faces."""
    below = [not (case >> i) & 1 for i in range(8)]
    following: dict[int, int] = {}
    for normal, corners in _FACES:
        edges = [_EDGE_INDEX[frozenset((corners[k], corners[(k + 1) % 4]))]
                 for k in range(4)]  # edges[k] joins corners[k] and corners[k + 1]
        crossed = [k for k in range(4) if below[corners[k]] != below[corners[(k + 1) % 4]]]
        segments = []
        if len(crossed) == 2:
            below_point = _mean([_CORNER_POINTS[c] for c in corners if below[c]])
            segments.append((edges[crossed[0]], edges[crossed[1]], below_point))
        elif len(crossed) == 4:
            centre = _mean([_CORNER_POINTS[c] for c in corners])
            for k in range(4):
                if not below[corners[k]]:
                    segments.append((edges[k - 1], edges[k], centre))
        for start, end, below_point in segments:
            # Seen from outside the face, the below side lies left of the direction.
            if _orientation(_edge_midpoint(start), _edge_midpoint(end), below_point,
                            normal) < 0:
                start, end = end, start
            assert start not in following
            following[start] = end
    return following


def case_polygons(case: int) -> list[list[int]]:
    """The surface polygons of one case: cycles of edge indices, counter-clockwise seen
    from below the level, each starting at its lowest edge index, ordered by that index."""
    following = _face_segments(case)
    polygons, seen = [], set()
    for start in sorted(following):
        if start in seen:
            continue
        polygon = [start]
        seen.add(start)
        edge = following[start]
        while edge != start:
            polygon.append(edge)
            seen.add(edge)
            edge = following[edge]
        polygons.append(polygon)
    return polygons


def _edge_faces(edge: int) -> frozenset[int]:
    """The two faces (indices into ``_FACES``) that contain an edge."""
    corner, axis = int(EDGE_CORNER[edge]), int(EDGE_AXIS[edge])
    ends = {corner, corner | (1 << axis)}
    return frozenset(f for f, (_, corners) in enumerate(_FACES) if ends <= set(corners))


_MIDPOINTS = [tuple(float(c) for c in _edge_midpoint(e)) for e in range(12)]
_EDGE_FACES = [_edge_faces(e) for e in range(12)]


def _diagonal_length(a: int, b: int) -> float:
    """Length of a diagonal between the crossings on edges a and b; infinite when both
    edges lie on one face, since the diagonal would lie in that face, where the
    neighbouring cube may draw the same segment or triangle."""
    if _EDGE_FACES[a] & _EDGE_FACES[b]:
        return math.inf
    return math.dist(_MIDPOINTS[a], _MIDPOINTS[b])


def _triangulate(polygon: list[int]) -> list[tuple[int, int, int]]:
    """Minimum total diagonal length triangulation of a cycle (keeps its winding)."""
    n = len(polygon)

    def length(i: int, j: int) -> float:
        if (j - i) % n in (1, n - 1):
            return 0.0
        return _diagonal_length(polygon[i], polygon[j])

    # cost[i][j]: best triangulation of the sub-polygon i..j (i < j), split at k.
    cost = [[0.0] * n for _ in range(n)]
    split = [[-1] * n for _ in range(n)]
    for span in range(2, n):
        for i in range(n - span):
            j = i + span
            best = None
            for k in range(i + 1, j):
                c = cost[i][k] + cost[k][j] + length(i, k) + length(k, j)
                if best is None or c < best - 1e-9:
                    best, split[i][j] = c, k
            cost[i][j] = best
    triangles = []

    def emit(i: int, j: int) -> None:
        if j - i < 2:
            return
        k = split[i][j]
        triangles.append((polygon[i], polygon[k], polygon[j]))
        emit(i, k)
        emit(k, j)

    assert math.isfinite(cost[0][n - 1]), polygon
    emit(0, n - 1)
    return triangles


def _build_triangle_table() -> tuple[np.ndarray, np.ndarray]:
    table = np.full((256, 3 * MAX_TRIANGLES + 1), -1, dtype=np.int8)
    counts = np.zeros(256, dtype=np.int8)
    for case in range(256):
        triangles = [t for polygon in case_polygons(case) for t in _triangulate(polygon)]
        assert len(triangles) <= MAX_TRIANGLES
        counts[case] = len(triangles)
        if triangles:
            table[case, :3 * len(triangles)] = np.array(triangles).ravel()
    return table, counts


TRIANGLES, TRIANGLE_COUNT = _build_triangle_table()
"""``TRIANGLES``: ``(256, 16)`` int8, per case the edge indices of its triangles, three
per triangle, padded with -1. ``TRIANGLE_COUNT``: ``(256,)`` int8 triangles per case."""
