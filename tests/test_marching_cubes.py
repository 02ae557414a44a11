"""Marching cubes on the CPU: against skimage's classic (Lorensen) table, mesh
invariants, dtypes, edge cases and errors.

What is compared with ``skimage.measure.marching_cubes(..., method='lorensen')``: the
vertex set (within 1e-5), and every cube's polygons with their orientation (the closed
boundary of the cube's triangles). Triangles themselves are not: the classic table
splits quadrilaterals and larger polygons by hand-made choices, while ours are generated
(see ``vrn/kernels/_tables.py``); ``test_triangle_agreement_is_the_polygon_split_only``
shows that every difference is such a split.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.spatial import cKDTree

from vrn.kernels import marching_cubes, marching_cubes_batch, to_host
from vrn.kernels._tables import EDGE_AXIS, EDGE_CORNER, TRIANGLE_COUNT, TRIANGLES, \
    case_polygons

skimage_measure = pytest.importorskip("skimage.measure")


def sphere(shape=(20, 21, 22), centre=(9.6, 10.3, 10.9), radius=7.3) -> np.ndarray:
    """Smooth field, 1 at the centre, 0.5 on the sphere, above the level inside."""
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(np.float64)
    r = np.sqrt((x - centre[2]) ** 2 + (y - centre[1]) ** 2 + (z - centre[0]) ** 2)
    return (1.0 - 0.5 * r / radius).astype(np.float32)


def noisy(seed=0, sigma=0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = sphere() + rng.normal(0.0, sigma, sphere().shape)
    return volume.astype(np.float32)


def random_volume(shape=(12, 13, 14), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


VOLUMES = {"sphere": sphere, "noisy": noisy, "random": random_volume,
           # rows of 64, 65 and 130 points: 64-point words and the cubes across them
           "random-64": lambda: random_volume((3, 4, 64), seed=20),
           "random-65": lambda: random_volume((3, 4, 65), seed=21),
           "random-130": lambda: random_volume((4, 3, 130), seed=22)}


def skimage_mesh(volume, level=0.5):
    """skimage's lorensen mesh with vertices reordered to (x, y, z)."""
    vertices, faces, _, _ = skimage_measure.marching_cubes(volume, level, method="lorensen")
    return vertices[:, ::-1].astype(np.float32), faces


def match_vertices(ours, theirs) -> np.ndarray:
    """Index of our vertex at each of their vertices; asserts a 1e-5 bijection."""
    assert len(ours) == len(theirs)
    distance, index = cKDTree(ours).query(theirs)
    assert distance.max() < 1e-5
    assert len(np.unique(index)) == len(ours)
    return index


def cube_cases(volume, level=0.5) -> np.ndarray:
    """Case index of every cube, ``(D-1, H-1, W-1)``."""
    above = (volume > level).astype(np.int64)
    d, h, w = (s - 1 for s in volume.shape)
    cases = np.zeros((d, h, w), dtype=np.int64)
    for corner in range(8):
        dz, dy, dx = corner >> 2, (corner >> 1) & 1, corner & 1
        cases |= above[dz:dz + d, dy:dy + h, dx:dx + w] << corner
    return cases


def our_polygons(volume, faces):
    """Our faces grouped by polygon: faces come cube by cube in (z, y, x) order and, in
    each cube, polygon by polygon (see ``_tables``)."""
    groups, start = [], 0
    for case in cube_cases(volume).ravel():
        for polygon in case_polygons(int(case)):
            count = len(polygon) - 2
            groups.append(faces[start:start + count])
            start += count
    assert start == len(faces)
    return groups


def boundary(faces) -> set:
    """Directed boundary edges of a set of triangles (interior diagonals cancel)."""
    directed = {(int(f[i]), int(f[(i + 1) % 3])) for f in faces for i in range(3)}
    return {e for e in directed if (e[1], e[0]) not in directed}


@pytest.mark.parametrize("name", list(VOLUMES))
def test_vertices_and_polygons_match_skimage(name):
    volume = VOLUMES[name]()
    vertices, faces = marching_cubes(volume, 0.5)
    sk_vertices, sk_faces = skimage_mesh(volume)
    sk_faces = match_vertices(vertices, sk_vertices)[sk_faces]
    assert len(faces) == len(sk_faces)

    # Give each of skimage's triangles to the one polygon of ours holding its 3 vertices.
    polygons = our_polygons(volume, faces)
    owner_of = {}
    for p, polygon in enumerate(polygons):
        for v in np.unique(polygon):
            owner_of.setdefault(int(v), set()).add(p)
    theirs = [[] for _ in polygons]
    for face in sk_faces:
        owners = set.intersection(*(owner_of[int(v)] for v in face))
        assert len(owners) == 1, f"skimage triangle {face} fits {len(owners)} polygons"
        theirs[owners.pop()].append(face)
    for polygon, their_faces in zip(polygons, theirs):
        assert boundary(polygon) == boundary(their_faces)


def test_polygons_match_skimage_in_every_case():
    """All 256 corner configurations, one 2x2x2 volume each."""
    rng = np.random.default_rng(2)
    volumes = np.empty((256, 2, 2, 2), dtype=np.float32)
    for case in range(256):
        for corner in range(8):
            offset = rng.uniform(0.05, 0.45)
            volumes[case, corner >> 2, (corner >> 1) & 1, corner & 1] = \
                0.5 + offset if (case >> corner) & 1 else 0.5 - offset
    meshes = marching_cubes_batch(volumes, 0.5)
    assert len(meshes[0][1]) == len(meshes[255][1]) == 0
    for case in range(1, 255):
        vertices, faces = meshes[case]
        assert len(faces) == TRIANGLE_COUNT[case]
        sk_vertices, sk_faces = skimage_mesh(volumes[case])
        sk_faces = match_vertices(vertices, sk_vertices)[sk_faces]
        assert boundary(faces) == boundary(sk_faces), f"case {case}"


def test_triangle_agreement_is_the_polygon_split_only():
    """Where a triangle differs from skimage's, it lies in one of our quadrilaterals or
    larger polygons; triangles that are whole polygons agree everywhere."""
    volume = noisy(seed=3)
    vertices, faces = marching_cubes(volume, 0.5)
    sk_vertices, sk_faces = skimage_mesh(volume)
    sk_faces = match_vertices(vertices, sk_vertices)[sk_faces]
    theirs = Counter(frozenset(map(int, f)) for f in sk_faces)
    lone, split = 0, 0
    for polygon in our_polygons(volume, faces):
        if len(polygon) == 1:
            lone += 1
            assert theirs[frozenset(map(int, polygon[0]))] == 1
        else:
            split += len(polygon)
    assert lone > 100 and split > 100


def test_mesh_invariants_and_orientation():
    for volume in (noisy(seed=4), random_volume(seed=5), random_volume((4, 5, 131), 23)):
        vertices, faces = marching_cubes(volume, 0.5)
        assert vertices.dtype == np.float32 and faces.dtype == np.int32
        assert vertices.shape[1] == 3 and faces.shape[1] == 3
        assert len(np.unique(vertices, axis=0)) == len(vertices)  # no duplicates
        assert np.array_equal(np.unique(faces), np.arange(len(vertices)))  # all used
        assert all(len(set(f)) == 3 for f in faces.tolist())
        directed = Counter((int(f[i]), int(f[(i + 1) % 3])) for f in faces for i in range(3))
        assert max(directed.values()) == 1  # consistent orientation
        undirected = Counter(tuple(sorted(e)) for e in directed.elements())
        assert max(undirected.values()) <= 2  # manifold edges
        # Closed except at the volume's border.
        upper = np.array(volume.shape[::-1], dtype=np.float32) - 1
        for a, b in (e for e, n in undirected.items() if n == 1):
            on_border = [np.any((vertices[v] == 0) | (vertices[v] == upper)) for v in (a, b)]
            assert all(on_border)
        # Every vertex lies on a grid edge: two integer coordinates.
        assert np.all((vertices == np.round(vertices)).sum(axis=1) >= 2)

    # Counter-clockwise seen from below: on a sphere that is high inside, the normals
    # point outward and the enclosed volume comes out positive.
    vertices, faces = marching_cubes(sphere(), 0.5)
    v0, v1, v2 = (vertices[faces[:, i]].astype(np.float64) for i in range(3))
    normals = np.cross(v1 - v0, v2 - v0)
    outward = (v0 + v1 + v2) / 3 - np.array([10.9, 10.3, 9.6])
    assert np.all(np.einsum("ij,ij->i", normals, outward) > 0)
    enclosed = np.einsum("ij,ij->i", v0, np.cross(v1, v2)).sum() / 6
    assert enclosed == pytest.approx(4 / 3 * np.pi * 7.3 ** 3, rel=0.03)


def test_deterministic():
    volume = noisy(seed=6)
    first = marching_cubes(volume, 0.5)
    second = marching_cubes(volume.copy(), 0.5)
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


def test_vertex_order_and_positions_follow_the_spec():
    """Vertices by owner (z, y, x) then axis; t = (level - a) / (b - a) in float64."""
    volume = random_volume((4, 5, 6), seed=7)
    vertices, _ = marching_cubes(volume, 0.5)
    expected = []
    above = volume > 0.5
    level = 0.5
    for z, y, x in np.ndindex(volume.shape):
        for axis, (dz, dy, dx) in enumerate([(0, 0, 1), (0, 1, 0), (1, 0, 0)]):
            z1, y1, x1 = z + dz, y + dy, x + dx
            if z1 < volume.shape[0] and y1 < volume.shape[1] and x1 < volume.shape[2] \
                    and above[z, y, x] != above[z1, y1, x1]:
                a, b = float(volume[z, y, x]), float(volume[z1, y1, x1])
                position = np.array([x, y, z], dtype=np.float64)
                position[axis] += (level - a) / (b - a)
                expected.append(position.astype(np.float32))
    assert np.array_equal(vertices, np.array(expected, dtype=np.float32))


def test_tables_are_consistent():
    assert TRIANGLE_COUNT[0] == TRIANGLE_COUNT[255] == 0
    assert TRIANGLE_COUNT.max() == 5
    for case in range(256):
        edges = set(TRIANGLES[case, :3 * TRIANGLE_COUNT[case]].tolist())
        # exactly the crossed edges
        crossed = {e for e in range(12)
                   if ((case >> int(EDGE_CORNER[e])) & 1)
                   != ((case >> (int(EDGE_CORNER[e]) | 1 << int(EDGE_AXIS[e]))) & 1)}
        assert edges == crossed
        # polygons cover the crossed edges once each
        assert sorted(e for p in case_polygons(case) for e in p) == sorted(crossed)


def test_uint8_and_float16_equal_float32_of_the_same_values():
    rng = np.random.default_rng(8)
    raw = rng.integers(0, 256, size=(9, 10, 11), dtype=np.uint8)
    raw[2:5, 3:6, 4:7] = 128  # 128/255 > 0.5 > 127/255: the exact cut matters
    raw[5, 5, 5] = 127
    for level in (0.5, 0.2, 128 / 255):
        expected = marching_cubes(raw.astype(np.float32) / np.float32(255), level)
        got = marching_cubes(raw, level)
        assert len(got[0]) > 0
        for a, b in zip(got, expected):
            assert np.array_equal(a, b)
    half = noisy(seed=9).astype(np.float16)
    half[0, 0, :3] = [np.inf, -np.inf, 6e-8]  # infinities and a subnormal
    for a, b in zip(marching_cubes(half), marching_cubes(half.astype(np.float32))):
        assert np.array_equal(a, b)


def test_values_at_the_level_count_as_below():
    volume = np.zeros((3, 3, 3), dtype=np.float32)
    volume[1, 1, 1] = 0.5
    vertices, faces = marching_cubes(volume, 0.5)
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)
    volume[1, 1, 1] = 1.0
    volume[1, 1, 2] = 0.5  # the vertex on that edge sits on the 0.5 voxel
    vertices, faces = marching_cubes(volume, 0.5)
    assert len(vertices) == 6 and len(faces) == 8
    assert [2.0, 1.0, 1.0] in vertices.tolist()


def test_nan_is_below_the_level():
    volume = noisy(seed=10)
    volume[volume > 0.9] = np.nan  # holes inside the sphere
    volume[0, 0, 0] = np.nan
    vertices, faces = marching_cubes(volume, 0.5)
    assert np.isfinite(vertices).all()
    # Same mesh as with -inf there, except that an edge to a NaN voxel gets its vertex
    # at the midpoint.
    as_minus_inf = np.where(np.isnan(volume), -np.inf, volume).astype(np.float32)
    other_vertices, other_faces = marching_cubes(as_minus_inf, 0.5)
    assert np.array_equal(faces, other_faces)
    moved = np.any(vertices != other_vertices, axis=1)
    assert moved.sum() > 10
    assert np.all(np.sort(vertices[moved] % 1, axis=1)[:, 2] == 0.5)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_empty_and_full_volumes(fill):
    for dtype in (np.float32, np.float16, np.uint8):
        volume = np.full((5, 6, 7), fill * (255 if dtype == np.uint8 else 1), dtype=dtype)
        vertices, faces = marching_cubes(volume, 0.5)
        assert vertices.shape == (0, 3) and vertices.dtype == np.float32
        assert faces.shape == (0, 3) and faces.dtype == np.int32


def test_non_contiguous_and_array_like_input():
    volume = noisy(seed=11)
    view = np.transpose(volume, (0, 2, 1))[:, ::-1, 1:]
    assert not view.flags.c_contiguous
    for a, b in zip(marching_cubes(view), marching_cubes(np.ascontiguousarray(view))):
        assert np.array_equal(a, b)
    torch = pytest.importorskip("torch")
    small = random_volume((3, 3, 3), seed=12)
    for a, b in zip(marching_cubes(torch.from_numpy(small)), marching_cubes(small)):
        assert np.array_equal(a, b)
    with pytest.raises(TypeError, match="float64"):  # nested lists become float64
        marching_cubes(small.tolist())


def test_batch_equals_single_volumes():
    volumes = np.stack([noisy(seed=s) for s in (13, 14, 15)])
    volumes[1] = 0.0  # an empty one in the middle
    meshes = marching_cubes_batch(volumes, 0.5)
    assert len(meshes) == 3
    for volume, (vertices, faces) in zip(volumes, meshes):
        single = marching_cubes(volume, 0.5)
        assert np.array_equal(vertices, single[0]) and np.array_equal(faces, single[1])


def uneven_volumes() -> dict:
    """Volumes whose surface fills only part of the depth range, so that slabs of equal
    depth would get unequal work: face slabs as the network makes them (and filled from
    a back plane), and planes all above or all below the level next to each other (the
    planes the count pass skips), rows across two words included."""
    from vrn.bench.isosurface import face_like_volume, vrn_shaped_volume

    steps = np.zeros((12, 9, 70), np.float32)
    steps[3:6] = 1.0              # three full planes: a surface on each side of them
    steps[7, 2:4, 5:66] = 1.0     # a lone block in one plane
    steps[10:] = 1.0              # full up to the last plane
    return {"vrn-shaped": vrn_shaped_volume((30, 26, 70)),
            "face-like": face_like_volume((30, 26, 70)), "steps": steps}


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_multithreaded_output_equals_single_threaded(monkeypatch, threads):
    """Small volumes normally stay on one thread: with the slab threshold lowered they
    split into ``threads`` slabs and shares of rows, and the mesh must not change by a
    single bit."""
    from vrn.kernels import _cpu

    volumes = {name: make() for name, make in VOLUMES.items()} | uneven_volumes()
    batch = np.stack([noisy(seed=s) for s in range(3)])
    single = {name: marching_cubes(v, 0.5) for name, v in volumes.items()}
    single_batch = marching_cubes_batch(batch, 0.5)
    monkeypatch.setattr(_cpu, "_MIN_POINTS_PER_SLAB", 1)
    monkeypatch.setattr(_cpu, "cpu_threads", lambda: threads)
    assert len(_cpu._slabs(20, 21 * 22)) == threads
    for name, volume in volumes.items():
        (v1, f1), (v2, f2) = single[name], marching_cubes(volume, 0.5)
        assert np.array_equal(v1, v2) and np.array_equal(f1, f2), name
    for (v1, f1), (v2, f2) in zip(single_batch, marching_cubes_batch(batch, 0.5)):
        assert np.array_equal(v1, v2) and np.array_equal(f1, f2)


def test_emit_work_is_split_by_the_count_pass_sums(monkeypatch):
    """Each thread's share of the emit passes holds about the same number of vertices
    and of triangles, however unevenly they lie over the depth (a face in the front part
    of the range), and the shares cover every row once."""
    from vrn.bench.isosurface import vrn_shaped_volume
    from vrn.kernels import _cpu

    shares = []
    emit = _cpu._emit

    def recording_emit(ranges, vertex_args, face_args):
        shares.append(ranges)
        emit(ranges, vertex_args, face_args)

    monkeypatch.setattr(_cpu, "_emit", recording_emit)
    monkeypatch.setattr(_cpu, "_MIN_POINTS_PER_SLAB", 1)
    monkeypatch.setattr(_cpu, "cpu_threads", lambda: 4)
    volume = vrn_shaped_volume((100, 96, 96))
    vertices, faces = marching_cubes(volume, 0.5)
    assert len(shares) == 4
    above = volume > 0.5
    assert above[:40].sum() == 0     # the surface lies in the front part only
    rows = 100 * 96
    for axis in (0, 1):                # vertex rows, then face rows
        edges = [(int(r[axis][0]), int(r[axis][1])) for r in sorted(shares, key=lambda r:
                                                                     int(r[axis][0]))]
        assert edges[0][0] == 0 and edges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    # Per-row counts rebuilt from the mesh (a vertex's row is its owner point's, the
    # floor of its coordinates): every share within a row's worth of a quarter.
    vertex_rows = np.bincount((vertices[:, 2].astype(int) * 96 + vertices[:, 1].astype(int)),
                              minlength=rows)
    for ranges in shares:
        start, stop = int(ranges[0][0]), int(ranges[0][1])
        share = vertex_rows[start:stop].sum()
        assert abs(share - len(vertices) / 4) <= vertex_rows.max(), (start, stop)


def test_balanced_split_and_skipped_planes():
    from vrn.kernels._cpu import ABOVE, BELOW, MIXED, _balanced, _counted_planes

    weights = np.array([0, 0, 5, 5, 0, 10, 0, 0], np.int64)
    ranges = _balanced(weights, 2)
    assert [list(r) for r in ranges] == [[0, 4], [4, 8]]          # 10 and 10
    assert [list(r) for r in _balanced(weights, 1)] == [[0, 8]]
    assert [list(r) for r in _balanced(np.zeros(3, np.int64), 3)] == [[0, 3], [3, 3], [3, 3]]
    assert [list(r) for r in _balanced(np.zeros(0, np.int64), 2)] == [[0, 0], [0, 0]]
    # A plane is skipped when it and the next plane lie wholly on one side (the last
    # plane of each volume needs itself only); two volumes of four planes.
    state = np.array([BELOW, BELOW, ABOVE, ABOVE, MIXED, BELOW, BELOW, ABOVE], np.uint8)
    assert list(_counted_planes(state, 4)) == [0, 1, 0, 0, 1, 0, 1, 0]


def test_to_host_passes_numpy_through():
    vertices, faces = marching_cubes(sphere(), 0.5)
    host = to_host(vertices, faces)
    assert host[0] is vertices and host[1] is faces


@pytest.mark.parametrize("volume, level, error, match", [
    (np.zeros((4, 4), np.float32), 0.5, ValueError, "3-D"),
    (np.zeros((2, 4, 4, 4), np.float32), 0.5, ValueError, "3-D"),
    (np.zeros((1, 4, 4), np.float32), 0.5, ValueError, "at least 2 x 2 x 2"),
    (np.zeros((4, 4, 4), np.float64), 0.5, TypeError, "float64"),
    (np.zeros((4, 4, 4), np.int16), 0.5, TypeError, "int16"),
    (np.zeros((4, 4, 4), bool), 0.5, TypeError, "bool"),
    (np.zeros((4, 4, 4), np.float32), float("nan"), ValueError, "finite"),
    (np.zeros((4, 4, 4), np.float32), 1e39, ValueError, "finite"),
    (np.zeros((4, 4, 4), np.float32), "0.5", ValueError, "real number"),
    (np.zeros((4, 4, 4), np.float32), None, ValueError, "real number"),
])
def test_bad_input_is_rejected(volume, level, error, match):
    with pytest.raises(error, match=match):
        marching_cubes(volume, level)


def test_batch_wants_four_dimensions():
    with pytest.raises(ValueError, match=r"4-D \(N, D, H, W\)"):
        marching_cubes_batch(np.zeros((4, 4, 4), np.float32))
