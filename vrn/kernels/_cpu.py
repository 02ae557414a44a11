"""Numba CPU twin of the marching-cubes kernel.

Three passes, each run on slabs of z-planes in parallel threads, produce exactly the
output of the CUDA twin:

1. ``_pack``: one bit per grid point, ``value > level``, 64 points per word of a row.
2. ``_count``: per point row, the crossed-edge words (x, y, z edges owned by each
   point) and their vertex count; per cube row, its triangle count. Prefix sums over
   the rows (NumPy) give each row's first vertex and first face.
3. ``_emit_vertices``: per point row, its vertices in (x, axis) order;
   ``_emit_faces``: per cube row, its faces in (x, table) order. A face's vertex id is
   found by counting bits: ``row base + vertices of earlier points in the row + lower
   axes of the owner``. Only ``_pack`` and ``_emit_vertices`` read the volume, so only
   they are compiled once per volume dtype.

Vertices are numbered by ``(n, z, y, x, axis)`` and faces by ``(n, z, y, x, triangle)``,
so the output does not depend on the thread count. Vertex positions are computed exactly
as in the CUDA twin (see ``_crossing``).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import config, njit, types
from numba.extending import intrinsic, overload

from ._tables import EDGE_AXIS, EDGE_CORNER, TRIANGLE_COUNT, TRIANGLES

WORD_BITS = 64

# Tables are passed as arguments, not read as globals: Numba freezes global arrays into
# its on-disk cache, which would then outlive a change of the tables.
_EDGE_CORNER = EDGE_CORNER.astype(np.int64)
_EDGE_AXIS = EDGE_AXIS.astype(np.int64)
_TRIANGLES = TRIANGLES.astype(np.int64)
_TRIANGLE_COUNT = TRIANGLE_COUNT.astype(np.int64)
_EDGE_MASK = np.array([sum(1 << int(e) for e in set(TRIANGLES[case, :3 * TRIANGLE_COUNT[case]]))
                       for case in range(256)], dtype=np.int64)


@intrinsic
def _popcount(typingctx, word):
    """Number of set bits of a uint64 (LLVM ``ctpop``)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


@intrinsic
def _trailing_zeros(typingctx, word):
    """Index of the lowest set bit of a non-zero uint64 (LLVM ``cttz``)."""
    if word != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.uint64(types.uint64), codegen


def _to_float32(value, half_table):
    """A voxel as float32; float16 volumes arrive as their uint16 bit patterns."""


@overload(_to_float32)
def _to_float32_impl(value, half_table):
    if value == types.uint16:
        return lambda value, half_table: half_table[value]
    return lambda value, half_table: np.float32(value)


@njit(inline="always")
def _bit(word, index):
    return np.int64((word >> np.uint64(index)) & np.uint64(1))


@njit(inline="always")
def _low_mask(index):
    return (np.uint64(1) << np.uint64(index)) - np.uint64(1)


@njit(inline="always")
def _next_bits(bits, n, z, y, w, n_words):
    """Word w of row (n, z, y) shifted so that bit x holds point x + 1."""
    word = bits[n, z, y, w] >> np.uint64(1)
    if w + 1 < n_words:
        word |= bits[n, z, y, w + 1] << np.uint64(WORD_BITS - 1)
    return word


@njit(inline="always")
def _crossing(index, a, b, level, divisor):
    """Coordinate of the crossing on the edge from ``index`` (value ``a``) to
    ``index + 1`` (value ``b``): ``index + t`` with ``t = (level - a) / (b - a)`` in
    float64 after ``a / divisor`` and ``b / divisor`` in float32, rounded once to
    float32; a NaN ``t`` becomes 0.5."""
    a = np.float64(a / divisor)
    b = np.float64(b / divisor)
    t = (np.float64(level) - a) / (b - a)
    if t != t:
        t = 0.5
    return np.float32(np.float64(index) + t)


@njit(nogil=True, cache=True)
def _pack(planes, volume, half_table, threshold, bits):
    n_volumes, depth, height, width = volume.shape
    n_words = bits.shape[3]
    one = np.uint64(1)
    for plane in range(planes[0], planes[1]):
        n = plane // depth
        z = plane % depth
        for y in range(height):
            row = volume[n, z, y]
            for w in range(n_words):
                x0 = w * WORD_BITS
                word = np.uint64(0)
                if x0 + WORD_BITS <= width:
                    for b in range(WORD_BITS):
                        if _to_float32(row[x0 + b], half_table) > threshold:
                            word |= one << np.uint64(b)
                else:
                    for b in range(width - x0):
                        if _to_float32(row[x0 + b], half_table) > threshold:
                            word |= one << np.uint64(b)
                bits[n, z, y, w] = word


@njit(nogil=True, cache=True)
def _count(planes, bits, width, triangle_count, edge_x, edge_y, edge_z, word_prefix,
           row_vertices, row_triangles):
    n_volumes, depth, height, n_words = bits.shape
    last_word = (width - 2) // WORD_BITS       # word holding x = width - 2 (last x-edge)
    last_bits = (width - 2) % WORD_BITS + 1    # points of that word with an x-edge
    for plane in range(planes[0], planes[1]):
        n = plane // depth
        z = plane % depth
        for y in range(height):
            total = np.uint64(0)
            for w in range(n_words):
                here = bits[n, z, y, w]
                ex = np.uint64(0)
                if w < last_word:
                    ex = here ^ _next_bits(bits, n, z, y, w, n_words)
                elif w == last_word:
                    ex = (here ^ _next_bits(bits, n, z, y, w, n_words)) & _low_mask(last_bits)
                ey = here ^ bits[n, z, y + 1, w] if y + 1 < height else np.uint64(0)
                ez = here ^ bits[n, z + 1, y, w] if z + 1 < depth else np.uint64(0)
                edge_x[n, z, y, w] = ex
                edge_y[n, z, y, w] = ey
                edge_z[n, z, y, w] = ez
                word_prefix[n, z, y, w] = total
                total += _popcount(ex) + _popcount(ey) + _popcount(ez)
            row_vertices[n, z, y] = total
            triangles = 0
            if y + 1 < height and z + 1 < depth:
                for w in range(last_word + 1):
                    active, c0, c1, c2, c3, c4, c5, c6, c7 = _cube_words(
                        bits, n, z, y, w, n_words, last_word, last_bits)
                    while active:
                        bit = _trailing_zeros(active)
                        active &= active - np.uint64(1)
                        triangles += triangle_count[_cube_case(bit, c0, c1, c2, c3, c4, c5,
                                                               c6, c7)]
            row_triangles[n, z, y] = triangles


@njit(inline="always")
def _cube_words(bits, n, z, y, w, n_words, last_word, last_bits):
    """Corner words of cube row (n, z, y), word w, and the word of its active cubes.

    Bit b of corner word ``c`` is corner ``c`` of the cube whose lowest corner is
    (w * 64 + b, y, z); a cube is active when its corners are not all on one side.
    """
    c0 = bits[n, z, y, w]
    c1 = _next_bits(bits, n, z, y, w, n_words)
    c2 = bits[n, z, y + 1, w]
    c3 = _next_bits(bits, n, z, y + 1, w, n_words)
    c4 = bits[n, z + 1, y, w]
    c5 = _next_bits(bits, n, z + 1, y, w, n_words)
    c6 = bits[n, z + 1, y + 1, w]
    c7 = _next_bits(bits, n, z + 1, y + 1, w, n_words)
    active = (c0 ^ c1) | (c0 ^ c2) | (c0 ^ c3) | (c0 ^ c4) | (c0 ^ c5) | (c0 ^ c6) | (c0 ^ c7)
    if w == last_word:
        active &= _low_mask(last_bits)
    return active, c0, c1, c2, c3, c4, c5, c6, c7


@njit(inline="always")
def _cube_case(bit, c0, c1, c2, c3, c4, c5, c6, c7):
    """Case index of the cube at bit ``bit`` of the corner words."""
    return (_bit(c0, bit) | _bit(c1, bit) << 1 | _bit(c2, bit) << 2 | _bit(c3, bit) << 3
            | _bit(c4, bit) << 4 | _bit(c5, bit) << 5 | _bit(c6, bit) << 6
            | _bit(c7, bit) << 7)


@njit(inline="always")
def _first_vertex(edge_x, edge_y, edge_z, word_prefix, row_base, n, z, y, x):
    """Id (within volume n) of the first vertex owned by grid point (x, y, z), and the
    point's edge flags (bit 0: x-edge, bit 1: y-edge, bit 2: z-edge)."""
    w = x // WORD_BITS
    bit = x % WORD_BITS
    mask = _low_mask(bit)
    ex = edge_x[n, z, y, w]
    ey = edge_y[n, z, y, w]
    ez = edge_z[n, z, y, w]
    first = row_base[n, z, y] + np.int64(word_prefix[n, z, y, w]) + np.int64(
        _popcount(ex & mask) + _popcount(ey & mask) + _popcount(ez & mask))
    return first, _bit(ex, bit) | _bit(ey, bit) << 1 | _bit(ez, bit) << 2


@njit(nogil=True, cache=True)
def _emit_vertices(planes, volume, half_table, level, divisor, edge_x, edge_y, edge_z,
                   row_base, volume_vertex_base, vertices):
    """Vertices of every point row, numbered (x, axis) from the row's base."""
    n_volumes, depth, height, n_words = edge_x.shape
    for plane in range(planes[0], planes[1]):
        n = plane // depth
        z = plane % depth
        for y in range(height):
            vid = volume_vertex_base[n] + row_base[n, z, y]
            row = volume[n, z, y]
            for w in range(n_words):
                ex = edge_x[n, z, y, w]
                ey = edge_y[n, z, y, w]
                ez = edge_z[n, z, y, w]
                owners = ex | ey | ez
                while owners:
                    bit = _trailing_zeros(owners)
                    owners &= owners - np.uint64(1)
                    x = w * WORD_BITS + np.int64(bit)
                    a = _to_float32(row[x], half_table)
                    if _bit(ex, bit):
                        b = _to_float32(row[x + 1], half_table)
                        vertices[vid, 0] = _crossing(x, a, b, level, divisor)
                        vertices[vid, 1] = np.float32(y)
                        vertices[vid, 2] = np.float32(z)
                        vid += 1
                    if _bit(ey, bit):
                        b = _to_float32(volume[n, z, y + 1, x], half_table)
                        vertices[vid, 0] = np.float32(x)
                        vertices[vid, 1] = _crossing(y, a, b, level, divisor)
                        vertices[vid, 2] = np.float32(z)
                        vid += 1
                    if _bit(ez, bit):
                        b = _to_float32(volume[n, z + 1, y, x], half_table)
                        vertices[vid, 0] = np.float32(x)
                        vertices[vid, 1] = np.float32(y)
                        vertices[vid, 2] = _crossing(z, a, b, level, divisor)
                        vid += 1


@njit(nogil=True, cache=True)
def _emit_faces(planes, bits, width, triangle_count, triangle_edges, edge_mask, edge_corner,
                edge_axis, edge_x, edge_y, edge_z, word_prefix, row_base, row_face_base,
                face_ids):
    """Faces of every cube row, numbered (x, triangle) from the row's base; ``face_ids``
    is the flat ``(3 F,)`` view of the faces."""
    n_volumes, depth, height, n_words = bits.shape
    last_word = (width - 2) // WORD_BITS
    last_bits = (width - 2) % WORD_BITS + 1
    edge_ids = np.empty(12, dtype=np.int64)
    for plane in range(planes[0], planes[1]):
        n = plane // depth
        z = plane % depth
        if z == depth - 1:
            continue
        for y in range(height - 1):
            fid = 3 * row_face_base[n, z, y]
            for w in range(last_word + 1):
                active, c0, c1, c2, c3, c4, c5, c6, c7 = _cube_words(
                    bits, n, z, y, w, n_words, last_word, last_bits)
                while active:
                    bit = _trailing_zeros(active)
                    active &= active - np.uint64(1)
                    x = w * WORD_BITS + np.int64(bit)
                    case = _cube_case(bit, c0, c1, c2, c3, c4, c5, c6, c7)
                    # Ids of the crossed edges; edges come grouped by owner corner.
                    crossed = edge_mask[case]
                    owner = -1
                    first = 0
                    flags = 0
                    while crossed:
                        edge = np.int64(_trailing_zeros(np.uint64(crossed)))
                        crossed &= crossed - 1
                        corner = edge_corner[edge]
                        if corner != owner:
                            owner = corner
                            first, flags = _first_vertex(
                                edge_x, edge_y, edge_z, word_prefix, row_base, n,
                                z + (corner >> 2), y + ((corner >> 1) & 1), x + (corner & 1))
                        axis = edge_axis[edge]
                        edge_ids[edge] = first + (flags & 1 if axis >= 1 else 0) + (
                            (flags >> 1) & 1 if axis == 2 else 0)
                    count = 3 * triangle_count[case]
                    for k in range(count):
                        face_ids[fid + k] = edge_ids[triangle_edges[case, k]]
                    fid += count


_HALF_TABLE = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16) \
    .astype(np.float32)
_NO_HALF_TABLE = np.zeros(1, dtype=np.float32)


# Slabs of z-planes run on a pool of Python threads (the kernels release the GIL), not
# in Numba parallel regions: OpenMP workers that spin while they wait lost a factor of
# three to other processes on a busy 2-core machine, and Python threads simply block.
_MIN_POINTS_PER_SLAB = 1 << 18
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def cpu_threads() -> int:
    """Worker threads for the CPU kernels: ``NUMBA_NUM_THREADS`` (default: the cores)."""
    return max(1, int(config.NUMBA_NUM_THREADS))


def _slabs(n_planes: int, points_per_plane: int) -> list[np.ndarray]:
    """Split planes into contiguous ``[start, stop)`` slabs, one per worker thread, with
    at least ``_MIN_POINTS_PER_SLAB`` points each (small volumes stay on one thread)."""
    count = min(cpu_threads(), n_planes,
                max(1, n_planes * points_per_plane // _MIN_POINTS_PER_SLAB))
    edges = np.linspace(0, n_planes, count + 1).round().astype(np.int64)
    return [edges[i:i + 2].copy() for i in range(count)]


def _run(kernel, slabs: list[np.ndarray], *args) -> None:
    """Run ``kernel(slab, *args)`` for every slab and wait for all of them."""
    global _pool, _pool_size
    if len(slabs) == 1:
        kernel(slabs[0], *args)
        return
    with _pool_lock:
        if _pool_size < len(slabs):
            _pool = ThreadPoolExecutor(max_workers=len(slabs),
                                       thread_name_prefix="vrn-kernels")
            _pool_size = len(slabs)
        pool = _pool
    for future in [pool.submit(kernel, slab, *args) for slab in slabs]:
        future.result()


def marching_cubes_cpu(volumes: np.ndarray, threshold: float, level: float,
                       divisor: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run the three passes on ``volumes`` ``(N, D, H, W)`` (float32, uint8, or float16).

    ``threshold`` classifies a raw voxel value ``v`` as above the level when
    ``float32(v) > threshold``; ``level`` and ``divisor`` place vertices at
    ``t = (level - a / divisor) / (b / divisor - a / divisor)``. Returns one
    ``(vertices (V, 3) float32, faces (F, 3) int32)`` pair per volume; they are views
    into two arrays shared by the batch.
    """
    if volumes.dtype == np.float16:
        volumes, half_table = volumes.view(np.uint16), _HALF_TABLE
    else:
        half_table = _NO_HALF_TABLE
    n_volumes, depth, height, width = volumes.shape
    n_words = -(-width // WORD_BITS)
    bits = np.empty((n_volumes, depth, height, n_words), dtype=np.uint64)
    edge_x = np.empty_like(bits)
    edge_y = np.empty_like(bits)
    edge_z = np.empty_like(bits)
    word_prefix = np.empty_like(bits)
    row_vertices = np.empty((n_volumes, depth, height), dtype=np.uint64)
    row_triangles = np.empty((n_volumes, depth, height), dtype=np.int64)
    threshold, level, divisor = np.float32(threshold), np.float32(level), np.float32(divisor)
    slabs = _slabs(n_volumes * depth, height * width)

    _run(_pack, slabs, volumes, half_table, threshold, bits)
    _run(_count, slabs, bits, width, _TRIANGLE_COUNT, edge_x, edge_y, edge_z, word_prefix,
         row_vertices, row_triangles)

    # Exclusive prefix sums: within each volume for vertex ids, over the batch for faces.
    row_vertices = row_vertices.astype(np.int64).reshape(n_volumes, -1)
    row_base = np.cumsum(row_vertices, axis=1) - row_vertices
    volume_vertices = row_vertices.sum(axis=1)
    volume_vertex_base = np.concatenate(([0], np.cumsum(volume_vertices)))
    flat_triangles = row_triangles.ravel()
    row_face_base = np.cumsum(flat_triangles) - flat_triangles
    volume_faces = row_triangles.reshape(n_volumes, -1).sum(axis=1)
    volume_face_base = np.concatenate(([0], np.cumsum(volume_faces)))

    vertices = np.empty((int(volume_vertex_base[-1]), 3), dtype=np.float32)
    faces = np.empty((int(volume_face_base[-1]), 3), dtype=np.int32)
    row_base = row_base.reshape(n_volumes, depth, height)
    _run(_emit_vertices, slabs, volumes, half_table, level, divisor, edge_x, edge_y, edge_z,
         row_base, volume_vertex_base, vertices)
    _run(_emit_faces, slabs, bits, width, _TRIANGLE_COUNT, _TRIANGLES, _EDGE_MASK,
         _EDGE_CORNER, _EDGE_AXIS, edge_x, edge_y, edge_z, word_prefix, row_base,
         row_face_base.reshape(n_volumes, depth, height), faces.reshape(-1))
    return [(vertices[volume_vertex_base[n]:volume_vertex_base[n + 1]],
             faces[volume_face_base[n]:volume_face_base[n + 1]]) for n in range(n_volumes)]
