"""Numba CPU twin of the marching-cubes kernel.

Three passes produce exactly the output of the CUDA twin:

1. ``_pack``: one bit per grid point, ``value > level``, 64 points per word of a row,
   and per z-plane whether its points are all below, all above or mixed.
2. ``_count``: per point row, the crossed-edge words (x, y, z edges owned by each
   point) and their vertex count; per cube row, its triangle count. A plane whose points
   lie all on one side, as do those of the next plane, has neither and is skipped
   without reading its words. Prefix sums over the rows (NumPy) give each row's first
   vertex and first face.
3. ``_emit_vertices``: per point row, its vertices in (x, axis) order;
   ``_emit_faces``: per cube row, its faces in (x, table) order. A face's vertex id is
   found by counting bits: ``row base + vertices of earlier points in the row + lower
   axes of the owner``. Rows without vertices or faces are skipped. Only ``_pack`` and
   ``_emit_vertices`` read the volume, so only they are compiled once per volume dtype.

Vertices are numbered by ``(n, z, y, x, axis)`` and faces by ``(n, z, y, x, triangle)``,
so the output does not depend on the thread count or on how the work is split. Vertex
positions are computed exactly as in the CUDA twin (see ``_crossing``).

Threads (:func:`marching_cubes_cpu`): ``_pack`` runs on slabs of equally many z-planes
(its work is the same on every plane); ``_count`` on slabs of equally many planes that
are not skipped; the two emit passes, together, on ranges of rows that hold equal shares
of the vertices and of the triangles, cut where the count pass's prefix sums cross them.
A face fills only part of the depth range, so slabs of equal depth would leave one
thread with most of the surface.

The helpers take words, never arrays: Numba increments and decrements an array's
reference count (atomically) for each call that passes it, which cost more than the
bit arithmetic here and made the threads fight over one cache line.
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
def _shifted(word, next_word):
    """A row's word shifted so that bit x holds point x + 1: the next word's first point
    moves into bit 63."""
    return (word >> np.uint64(1)) | (next_word << np.uint64(WORD_BITS - 1))


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


# Per z-plane, from _pack: every point below the level, every point above, or both kinds.
BELOW, ABOVE, MIXED = 0, 1, 2


@njit(nogil=True, cache=True)
def _pack(planes, volume, half_table, threshold, bits, plane_state):
    n_volumes, depth, height, width = volume.shape
    n_words = bits.shape[3]
    one = np.uint64(1)
    full = ~np.uint64(0)
    tail = width - (n_words - 1) * WORD_BITS  # points in a row's last word, 1 to 64
    tail_full = full if tail == WORD_BITS else _low_mask(tail)
    for plane in range(planes[0], planes[1]):
        n = plane // depth
        z = plane % depth
        any_above = np.uint64(0)
        all_above = True
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
                any_above |= word
                if word != (full if w + 1 < n_words else tail_full):
                    all_above = False
        plane_state[plane] = ABOVE if all_above else (MIXED if any_above else BELOW)


@njit(inline="always")
def _cube_words(a0, a1, b0, b1, c0, c1, d0, d1, valid):
    """Corner words of one word of a cube row, and the word of its active cubes, from
    words w (``*0``) and w + 1 (``*1``, 0 past the row's end) of the four point rows
    (y, z), (y + 1, z), (y, z + 1) and (y + 1, z + 1) as ``a``, ``b``, ``c``, ``d``.

    Bit b of corner word ``k`` is corner ``k`` of the cube whose lowest corner is
    (w * 64 + b, y, z); a cube is active when its corners are not all on one side, and
    only the cubes in ``valid`` count.
    """
    k0 = a0
    k1 = _shifted(a0, a1)
    k2 = b0
    k3 = _shifted(b0, b1)
    k4 = c0
    k5 = _shifted(c0, c1)
    k6 = d0
    k7 = _shifted(d0, d1)
    active = ((k0 ^ k1) | (k0 ^ k2) | (k0 ^ k3) | (k0 ^ k4) | (k0 ^ k5) | (k0 ^ k6)
              | (k0 ^ k7)) & valid
    return active, k0, k1, k2, k3, k4, k5, k6, k7


@njit(inline="always")
def _cube_words_at(bits, n, z, y, w, last_word, last_valid):
    """:func:`_cube_words` of word ``w`` of the cube row (y, z) of volume ``n`` of the
    packed ``bits`` ``(N, D, H, words)``; past the row's last word the next words are 0,
    and in its last word only the cubes in ``last_valid`` count."""
    zero = np.uint64(0)
    more = w + 1 < bits.shape[3]
    return _cube_words(
        bits[n, z, y, w], bits[n, z, y, w + 1] if more else zero,
        bits[n, z, y + 1, w], bits[n, z, y + 1, w + 1] if more else zero,
        bits[n, z + 1, y, w], bits[n, z + 1, y, w + 1] if more else zero,
        bits[n, z + 1, y + 1, w], bits[n, z + 1, y + 1, w + 1] if more else zero,
        last_valid if w == last_word else ~zero)


@njit(inline="always")
def _cube_case(bit, c0, c1, c2, c3, c4, c5, c6, c7):
    """Case index of the cube at bit ``bit`` of the corner words."""
    return (_bit(c0, bit) | _bit(c1, bit) << 1 | _bit(c2, bit) << 2 | _bit(c3, bit) << 3
            | _bit(c4, bit) << 4 | _bit(c5, bit) << 5 | _bit(c6, bit) << 6
            | _bit(c7, bit) << 7)


@njit(nogil=True, cache=True)
def _count(planes, bits, width, plane_state, triangle_count, edge_x, edge_y, edge_z,
           word_prefix, row_vertices, row_triangles):
    """Edge words, vertex and triangle counts of the rows of ``planes``. A skipped
    plane's rows get zero counts and no edge words: nothing reads those (a crossed
    edge's owner always lies in a plane that is not skipped)."""
    n_volumes, depth, height, n_words = bits.shape
    last_word = (width - 2) // WORD_BITS              # word holding x = width - 2
    last_valid = _low_mask((width - 2) % WORD_BITS + 1)  # its points with an x-edge
    zero = np.uint64(0)
    for plane in range(planes[0], planes[1]):
        n = plane // depth
        z = plane % depth
        last_plane = z + 1 == depth
        state = plane_state[plane]
        if state != MIXED and (last_plane or plane_state[plane + 1] == state):
            for y in range(height):
                row_vertices[n, z, y] = 0
                row_triangles[n, z, y] = 0
            continue
        for y in range(height):
            last_row = y + 1 == height
            total = zero
            for w in range(n_words):
                here = bits[n, z, y, w]
                ex = zero
                if w <= last_word:
                    ex = here ^ _shifted(here, bits[n, z, y, w + 1] if w + 1 < n_words
                                         else zero)
                    if w == last_word:
                        ex &= last_valid
                ey = zero if last_row else here ^ bits[n, z, y + 1, w]
                ez = zero if last_plane else here ^ bits[n, z + 1, y, w]
                edge_x[n, z, y, w] = ex
                edge_y[n, z, y, w] = ey
                edge_z[n, z, y, w] = ez
                word_prefix[n, z, y, w] = total
                total += _popcount(ex) + _popcount(ey) + _popcount(ez)
            row_vertices[n, z, y] = np.int64(total)
            triangles = 0
            if not (last_row or last_plane):
                for w in range(last_word + 1):
                    active, c0, c1, c2, c3, c4, c5, c6, c7 = _cube_words_at(
                        bits, n, z, y, w, last_word, last_valid)
                    while active:
                        bit = _trailing_zeros(active)
                        active &= active - np.uint64(1)
                        triangles += triangle_count[_cube_case(bit, c0, c1, c2, c3, c4, c5,
                                                               c6, c7)]
            row_triangles[n, z, y] = triangles


@njit(nogil=True, cache=True)
def _emit_vertices(rows, volume, half_table, level, divisor, edge_x, edge_y, edge_z,
                   row_base, row_vertices, volume_vertex_base, vertices):
    """Vertices of the point rows ``rows`` (``[start, stop)`` over the flattened
    ``(n, z, y)``), numbered (x, axis) from each row's base."""
    n_volumes, depth, height, n_words = edge_x.shape
    for r in range(rows[0], rows[1]):
        plane = r // height
        y = r - plane * height
        n = plane // depth
        z = plane - n * depth
        if row_vertices[n, z, y] == 0:
            continue
        vid = volume_vertex_base[n] + row_base[n, z, y]
        for w in range(n_words):
            ex = edge_x[n, z, y, w]
            ey = edge_y[n, z, y, w]
            ez = edge_z[n, z, y, w]
            owners = ex | ey | ez
            while owners:
                bit = _trailing_zeros(owners)
                owners &= owners - np.uint64(1)
                x = w * WORD_BITS + np.int64(bit)
                a = _to_float32(volume[n, z, y, x], half_table)
                if _bit(ex, bit):
                    b = _to_float32(volume[n, z, y, x + 1], half_table)
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
def _emit_faces(rows, bits, width, triangle_count, triangle_edges, edge_mask, edge_corner,
                edge_axis, edge_x, edge_y, edge_z, word_prefix, row_base, row_triangles,
                row_face_base, face_ids):
    """Faces of the cube rows ``rows`` (``[start, stop)`` over the flattened
    ``(n, z, y)``), numbered (x, triangle) from each row's base; ``face_ids`` is the
    flat ``(3 F,)`` view of the faces."""
    n_volumes, depth, height, n_words = bits.shape
    last_word = (width - 2) // WORD_BITS
    last_valid = _low_mask((width - 2) % WORD_BITS + 1)
    edge_ids = np.empty(12, dtype=np.int64)
    # For the four point rows of a cube row, k = dy + 2 dz: their edge words w and the id
    # of their first vertex in word w.
    word_x = np.empty(4, dtype=np.uint64)
    word_y = np.empty(4, dtype=np.uint64)
    word_z = np.empty(4, dtype=np.uint64)
    word_base = np.empty(4, dtype=np.int64)
    for r in range(rows[0], rows[1]):
        plane = r // height
        y = r - plane * height
        n = plane // depth
        z = plane - n * depth
        if row_triangles[n, z, y] == 0:  # also every row of the last plane, and last rows
            continue
        fid = 3 * row_face_base[n, z, y]
        for w in range(last_word + 1):
            active, c0, c1, c2, c3, c4, c5, c6, c7 = _cube_words_at(
                bits, n, z, y, w, last_word, last_valid)
            if not active:
                continue
            for k in range(4):
                py = y + (k & 1)
                pz = z + (k >> 1)
                word_x[k] = edge_x[n, pz, py, w]
                word_y[k] = edge_y[n, pz, py, w]
                word_z[k] = edge_z[n, pz, py, w]
                word_base[k] = row_base[n, pz, py] + np.int64(word_prefix[n, pz, py, w])
            while active:
                bit = _trailing_zeros(active)
                active &= active - np.uint64(1)
                case = _cube_case(bit, c0, c1, c2, c3, c4, c5, c6, c7)
                # Ids of the crossed edges; edges come grouped by owner corner. An owner's
                # first vertex id: its word's first, its row's earlier points' vertices,
                # then its lower axes (flags: bit 0 x-edge, bit 1 y-edge).
                crossed = edge_mask[case]
                owner = -1
                first = np.int64(0)
                flags = np.int64(0)
                while crossed:
                    edge = np.int64(_trailing_zeros(np.uint64(crossed)))
                    crossed &= crossed - 1
                    corner = edge_corner[edge]
                    if corner != owner:
                        owner = corner
                        k = corner >> 1
                        at = np.int64(bit) + (corner & 1)
                        if at < WORD_BITS:
                            ex = word_x[k]
                            ey = word_y[k]
                            below = _low_mask(at)
                            first = word_base[k] + np.int64(
                                _popcount(ex & below) + _popcount(ey & below)
                                + _popcount(word_z[k] & below))
                            flags = _bit(ex, at) | _bit(ey, at) << 1
                        else:  # the first point of the next word
                            py = y + (k & 1)
                            pz = z + (k >> 1)
                            first = row_base[n, pz, py] + np.int64(
                                word_prefix[n, pz, py, w + 1])
                            flags = (_bit(edge_x[n, pz, py, w + 1], 0)
                                     | _bit(edge_y[n, pz, py, w + 1], 0) << 1)
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


# Slabs and row ranges run on a pool of Python threads (the kernels release the GIL),
# not in Numba parallel regions: OpenMP workers that spin while they wait lost a factor
# of three to other processes on a busy 2-core machine, and Python threads simply block.
# The calling thread takes the first share itself.
_MIN_POINTS_PER_SLAB = 1 << 18
# Emitting one vertex or triangle costs about as much as packing this many points: a
# mesh is split over threads only when each share is worth a slab.
_POINTS_PER_MESH_ITEM = 64
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()
_threads: int | None = None  # set_threads; None: NUMBA_NUM_THREADS
_local = threading.local()  # set_threads(..., this_thread=True)


def set_threads(threads: int | None, *, this_thread: bool = False) -> None:
    """Use ``threads`` worker threads (the calling thread included) from now on;
    ``None`` goes back to ``NUMBA_NUM_THREADS``. With ``this_thread``, only for calls
    made from the calling thread, over the process-wide setting (``None`` drops it).
    :func:`vrn.runtime.threads.configure_threads` sets the process-wide count with the
    rest of the process's thread budget."""
    global _threads
    threads = None if threads is None else max(1, int(threads))
    if this_thread:
        _local.threads = threads
    else:
        _threads = threads


def cpu_threads() -> int:
    """Worker threads for the CPU kernels: as :func:`set_threads` said (for this thread,
    else for the process), else ``NUMBA_NUM_THREADS`` (default: the logical cores)."""
    return (getattr(_local, "threads", None) or _threads
            or max(1, int(config.NUMBA_NUM_THREADS)))


def _slabs(n_planes: int, points_per_plane: int) -> list[np.ndarray]:
    """Split planes into contiguous ``[start, stop)`` slabs, one per worker thread, with
    at least ``_MIN_POINTS_PER_SLAB`` points each (small volumes stay on one thread)."""
    count = min(cpu_threads(), n_planes,
                max(1, n_planes * points_per_plane // _MIN_POINTS_PER_SLAB))
    edges = np.linspace(0, n_planes, count + 1).round().astype(np.int64)
    return [edges[i:i + 2].copy() for i in range(count)]


def _balanced(weights: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split ``range(len(weights))`` into ``max(parts, 1)`` contiguous ``[start, stop)``
    ranges whose ``weights`` (non-negative) add up to about the same; ranges may be
    empty (all but the first, when every weight is 0)."""
    size = len(weights)
    cumulative = np.cumsum(weights, dtype=np.float64)
    if parts <= 1 or size == 0 or cumulative[-1] <= 0:
        cuts = np.full(max(parts, 1) - 1, size)
    else:
        targets = cumulative[-1] * np.arange(1, parts) / parts
        cuts = np.minimum(np.searchsorted(cumulative, targets, side="left") + 1, size)
    edges = np.concatenate(([0], cuts, [size])).astype(np.int64)
    return [edges[i:i + 2].copy() for i in range(len(edges) - 1)]


def _run(kernel, slabs: list, *args) -> None:
    """Run ``kernel(slab, *args)`` for every slab (the first on this thread) and wait for
    all of them."""
    global _pool, _pool_size
    if len(slabs) == 1:
        kernel(slabs[0], *args)
        return
    with _pool_lock:
        if _pool_size < len(slabs) - 1:
            _pool = ThreadPoolExecutor(max_workers=len(slabs) - 1,
                                       thread_name_prefix="vrn-kernels")
            _pool_size = len(slabs) - 1
        pool = _pool
    futures = [pool.submit(kernel, slab, *args) for slab in slabs[1:]]
    try:
        kernel(slabs[0], *args)
    finally:
        for future in futures:
            future.result()


def _emit(ranges, vertex_args, face_args) -> None:
    """One thread's share of both emit passes: ``ranges`` is (vertex rows, face rows)."""
    _emit_vertices(ranges[0], *vertex_args)
    _emit_faces(ranges[1], *face_args)


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
    n_planes = n_volumes * depth
    bits = np.empty((n_volumes, depth, height, n_words), dtype=np.uint64)
    edge_x = np.empty_like(bits)
    edge_y = np.empty_like(bits)
    edge_z = np.empty_like(bits)
    word_prefix = np.empty_like(bits)
    plane_state = np.empty(n_planes, dtype=np.uint8)
    row_vertices = np.empty((n_volumes, depth, height), dtype=np.int64)
    row_triangles = np.empty((n_volumes, depth, height), dtype=np.int64)
    threshold, level, divisor = np.float32(threshold), np.float32(level), np.float32(divisor)
    slabs = _slabs(n_planes, height * width)

    _run(_pack, slabs, volumes, half_table, threshold, bits, plane_state)
    _run(_count, _balanced(_counted_planes(plane_state, depth), len(slabs)), bits, width,
         plane_state, _TRIANGLE_COUNT, edge_x, edge_y, edge_z, word_prefix, row_vertices,
         row_triangles)

    # Exclusive prefix sums: within each volume for vertex ids, over the batch for faces.
    flat_vertices = row_vertices.reshape(-1)
    flat_triangles = row_triangles.reshape(-1)
    per_volume = flat_vertices.reshape(n_volumes, -1)
    row_base = (np.cumsum(per_volume, axis=1) - per_volume).reshape(row_vertices.shape)
    volume_vertex_base = np.concatenate(([0], np.cumsum(per_volume.sum(axis=1))))
    row_face_base = (np.cumsum(flat_triangles) - flat_triangles).reshape(row_triangles.shape)
    volume_faces = flat_triangles.reshape(n_volumes, -1).sum(axis=1)
    volume_face_base = np.concatenate(([0], np.cumsum(volume_faces)))

    vertices = np.empty((int(volume_vertex_base[-1]), 3), dtype=np.float32)
    faces = np.empty((int(volume_face_base[-1]), 3), dtype=np.int32)
    parts = min(len(slabs), max(1, (len(vertices) + len(faces)) * _POINTS_PER_MESH_ITEM
                                // _MIN_POINTS_PER_SLAB))
    shares = list(zip(_balanced(flat_vertices, parts), _balanced(flat_triangles, parts)))
    _run(_emit, shares,
         (volumes, half_table, level, divisor, edge_x, edge_y, edge_z, row_base,
          row_vertices, volume_vertex_base, vertices),
         (bits, width, _TRIANGLE_COUNT, _TRIANGLES, _EDGE_MASK, _EDGE_CORNER, _EDGE_AXIS,
          edge_x, edge_y, edge_z, word_prefix, row_base, row_triangles, row_face_base,
          faces.reshape(-1)))
    return [(vertices[volume_vertex_base[n]:volume_vertex_base[n + 1]],
             faces[volume_face_base[n]:volume_face_base[n + 1]]) for n in range(n_volumes)]


def _counted_planes(plane_state: np.ndarray, depth: int) -> np.ndarray:
    """1 for each plane ``_count`` works on, 0 for each it skips (all its points, and
    all the next plane's, on one side)."""
    state = plane_state.reshape(-1, depth)
    same_as_next = np.ones(state.shape, dtype=bool)
    same_as_next[:, :-1] = state[:, 1:] == state[:, :-1]
    return (~((state != MIXED) & same_as_next)).ravel().astype(np.int64)
