"""Numba-CUDA twin of the marching-cubes kernel.

Three launches per batch of volumes and one host synchronisation (to learn the mesh
sizes before the emit launch writes them):

1. ``_count_kernel``: one block per *segment*, a run of ``threads`` consecutive points of
   one row ``(n, z, y)``. Each thread classifies its point and the point's neighbours in
   the rows ``y + 1`` and ``z + 1`` (``value > threshold``), counts the point's crossed
   edges (+x, +y, +z) and the triangles of the cube whose lowest corner it is, and the
   block stores its two totals and its row's occupancy bits (32 points per word).
2. ``_scan_kernel``: one block turns the segment totals into exclusive prefix sums (the
   first vertex and first face of every segment) and the per-volume offsets.
3. ``_emit_kernel``: each block with work re-reads the occupancy bits of the nine rows
   around it into shared memory, writes its points' vertices at
   ``segment base + vertices of earlier points in the segment``, and its cubes' faces at
   ``segment base + in-block prefix of triangle counts``. A face's vertex id is found by
   counting bits: ``owner's segment base + earlier points' vertices + lower axes``.

Segments are ordered ``(n, z, y, chunk)``, so vertices come out ordered by
``(n, z, y, x, axis)`` and faces by ``(n, z, y, x, triangle)``, exactly as from the CPU
twin (:mod:`._cpu`), and vertex positions are computed by the same floating-point
operations (no multiplications, so no fused multiply-add can change a bit).

The kernels use shared memory, ``syncthreads`` and integer atomics only (no warp
intrinsics), so the Numba CUDA simulator runs the very same code.

Launches: a block is one segment, so its size is capped by what the compiled kernels can
launch on the device (:func:`kernel_limits`: the emit kernel's 71-77 registers per
thread allow 800-896 threads, not 1024). The work runs in the context of the volumes'
own device (:func:`on_device`), and a call's kernels wait on the device for the previous
call's (an event), since they share the cached buffers whatever stream each runs on.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass, field

import numpy as np
from numba import cuda, float32, float64, int32, int64, uint32

from ..cuda_driver import libcuda
from ._checks import check_level, check_volume, classification
from ._tables import EDGE_AXIS, EDGE_CORNER, TRIANGLE_COUNT, TRIANGLES

WORD_BITS = 32
MAX_THREADS = 1024
_MAX_WORDS = MAX_THREADS // WORD_BITS + 1  # words of one segment, plus the next word
_MAX_POINTS = MAX_THREADS + 1  # points of one segment, plus the next point
_SCAN_MAX_THREADS = 1024


def _case_table() -> np.ndarray:
    """``(256, 16)`` int8: column 0 the triangle count, then per triangle corner the
    packed edge ``owner corner << 2 | axis``. Passed as an argument rather than read as
    a global, so an on-disk kernel cache cannot keep an outdated copy."""
    table = np.zeros((256, 16), dtype=np.int8)
    table[:, 0] = TRIANGLE_COUNT
    for case in range(256):
        edges = TRIANGLES[case, :3 * TRIANGLE_COUNT[case]]
        table[case, 1:1 + len(edges)] = EDGE_CORNER[edges] << 2 | EDGE_AXIS[edges]
    return table


CASE_TABLE = _case_table()


@cuda.jit(cache=True)
def _count_kernel(volume, threshold, case_table, bits, seg_vertices, seg_triangles):
    n_volumes, depth, height, width = volume.shape
    threads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    chunk = cuda.blockIdx.x
    y = cuda.blockIdx.y
    n = cuda.blockIdx.z // depth
    z = cuda.blockIdx.z % depth

    # above[r, i]: point (chunk * threads + i) of row r in (y, z), (y+1, z), (y, z+1),
    # (y+1, z+1); index `threads` holds the first point of the next chunk.
    above = cuda.shared.array((4, _MAX_POINTS), int32)
    words = cuda.shared.array(_MAX_WORDS, uint32)
    totals = cuda.shared.array(2, int32)
    if tid < _MAX_WORDS:
        words[tid] = 0
    if tid < 2:
        totals[tid] = 0
    for i in range(tid, threads + 1, threads):
        x = chunk * threads + i
        for r in range(4):
            yy = y + (r & 1)
            zz = z + (r >> 1)
            value = 0
            if x < width and yy < height and zz < depth:
                if float32(volume[n, zz, yy, x]) > threshold:
                    value = 1
            above[r, i] = value
    cuda.syncthreads()

    x = chunk * threads + tid
    vertices = 0
    triangles = 0
    if x < width:
        a = above[0, tid]
        if a:
            cuda.atomic.or_(words, tid // WORD_BITS, uint32(1) << uint32(tid % WORD_BITS))
        if x + 1 < width and a != above[0, tid + 1]:
            vertices += 1
        if y + 1 < height and a != above[1, tid]:
            vertices += 1
        if z + 1 < depth and a != above[2, tid]:
            vertices += 1
        if x + 1 < width and y + 1 < height and z + 1 < depth:
            case = (a | above[0, tid + 1] << 1 | above[1, tid] << 2 | above[1, tid + 1] << 3
                    | above[2, tid] << 4 | above[2, tid + 1] << 5 | above[3, tid] << 6
                    | above[3, tid + 1] << 7)
            triangles = int32(case_table[case, 0])
    if vertices:
        cuda.atomic.add(totals, 0, vertices)
    if triangles:
        cuda.atomic.add(totals, 1, triangles)
    cuda.syncthreads()

    n_chunks = cuda.gridDim.x
    seg = ((n * depth + z) * height + y) * n_chunks + chunk
    if tid == 0:
        seg_vertices[seg] = totals[0]
        seg_triangles[seg] = totals[1]
    word = chunk * (threads // WORD_BITS) + tid
    if tid < threads // WORD_BITS and word < bits.shape[3]:
        bits[n, z, y, word] = words[tid]


@cuda.jit(cache=True)
def _scan_kernel(seg_vertices, seg_triangles, segs_per_volume, seg_vertex_base,
                 seg_face_base, offsets):
    """Exclusive prefix sums of both segment totals, in one block.

    ``offsets[0, n]`` / ``offsets[1, n]``: first vertex / face of volume n; column N
    holds the totals.
    """
    n_segs = seg_vertices.shape[0]
    threads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    span = (n_segs + threads - 1) // threads
    start = tid * span  # no min()/max() in kernels: Numba compiles them as device
    if start > n_segs:  # functions, which compile_ptx cannot do without a GPU
        start = n_segs
    stop = start + span
    if stop > n_segs:
        stop = n_segs

    sums = cuda.shared.array((2, _SCAN_MAX_THREADS), int64)
    v_sum = int64(0)
    f_sum = int64(0)
    for s in range(start, stop):
        v_sum += seg_vertices[s]
        f_sum += seg_triangles[s]
    sums[0, tid] = v_sum
    sums[1, tid] = f_sum
    cuda.syncthreads()
    step = 1
    while step < threads:  # Hillis-Steele inclusive scan of the per-thread sums
        v_add = int64(0)
        f_add = int64(0)
        if tid >= step:
            v_add = sums[0, tid - step]
            f_add = sums[1, tid - step]
        cuda.syncthreads()
        sums[0, tid] += v_add
        sums[1, tid] += f_add
        cuda.syncthreads()
        step *= 2

    v_base = sums[0, tid] - v_sum
    f_base = sums[1, tid] - f_sum
    for s in range(start, stop):
        seg_vertex_base[s] = v_base
        seg_face_base[s] = f_base
        if s % segs_per_volume == 0:
            offsets[0, s // segs_per_volume] = v_base
            offsets[1, s // segs_per_volume] = f_base
        v_base += seg_vertices[s]
        f_base += seg_triangles[s]
    if tid == threads - 1:
        offsets[0, offsets.shape[1] - 1] = sums[0, tid]
        offsets[1, offsets.shape[1] - 1] = sums[1, tid]


# One long kernel on purpose: its phases (load rows, crossed edges, scan, vertices, faces)
# share shared-memory arrays and barriers, and as device functions they would need a CUDA
# driver to compile, so `compile_ptx` could no longer check them on a machine without one.
@cuda.jit(cache=True)
def _emit_kernel(volume, threshold, level, divisor, case_table, bits, seg_vertices,
                 seg_triangles, seg_vertex_base, seg_face_base, offsets, vertices, faces):
    n_volumes, depth, height, width = volume.shape
    threads = cuda.blockDim.x
    tid = cuda.threadIdx.x
    chunk = cuda.blockIdx.x
    y = cuda.blockIdx.y
    n = cuda.blockIdx.z // depth
    z = cuda.blockIdx.z % depth
    n_chunks = cuda.gridDim.x
    seg = ((n * depth + z) * height + y) * n_chunks + chunk
    if seg_vertices[seg] == 0 and seg_triangles[seg] == 0:
        return  # the whole block leaves together

    seg_words = threads // WORD_BITS
    first_word = chunk * seg_words
    n_words = bits.shape[3]
    # row_bits[j + 3 k, i]: word first_word + i of row (y + j, z + k), j, k in 0..2.
    row_bits = cuda.shared.array((9, _MAX_WORDS), int64)
    # edge_bits[r, axis, i], r = j + 2 k (j, k in 0..1): crossed edges owned by the
    # points of word i of row (y + j, z + k); word_prefix[r, i]: their vertices before
    # word i within the segment.
    edge_bits = cuda.shared.array((4, 3, _MAX_WORDS), int64)
    word_prefix = cuda.shared.array((4, _MAX_WORDS), int64)
    face_prefix = cuda.shared.array(MAX_THREADS, int32)

    for i in range(tid, 9 * (seg_words + 1), threads):
        r = i // (seg_words + 1)
        w = i % (seg_words + 1)
        yy = y + r % 3
        zz = z + r // 3
        word = int64(0)
        if yy < height and zz < depth and first_word + w < n_words:
            word = int64(bits[n, zz, yy, first_word + w])
        row_bits[r, w] = word
    cuda.syncthreads()

    for i in range(tid, 4 * (seg_words + 1), threads):
        r = i // (seg_words + 1)
        w = i % (seg_words + 1)
        j = r & 1
        k = r >> 1
        here = row_bits[j + 3 * k, w]
        following = int64(0)
        if w < seg_words:
            following = row_bits[j + 3 * k, w + 1] & 1
        edge_x = (here ^ ((here >> 1) | (following << (WORD_BITS - 1))))
        x0 = (first_word + w) * WORD_BITS  # x of bit 0 of this word
        if x0 + WORD_BITS > width - 1:  # keep x-edges of points x < width - 1 only
            keep = width - 1 - x0
            if keep < 0:
                keep = 0
            edge_x &= (int64(1) << keep) - 1
        edge_y = int64(0)
        if y + j + 1 < height:
            edge_y = here ^ row_bits[j + 1 + 3 * k, w]
        edge_z = int64(0)
        if z + k + 1 < depth:
            edge_z = here ^ row_bits[j + 3 * (k + 1), w]
        edge_bits[r, 0, w] = edge_x
        edge_bits[r, 1, w] = edge_y
        edge_bits[r, 2, w] = edge_z
    cuda.syncthreads()
    if tid < 4:
        total = int64(0)
        for w in range(seg_words + 1):
            word_prefix[tid, w] = total
            total += (cuda.popc(edge_bits[tid, 0, w]) + cuda.popc(edge_bits[tid, 1, w])
                      + cuda.popc(edge_bits[tid, 2, w]))

    x = chunk * threads + tid
    case = 0
    triangles = 0
    if x + 1 < width and y + 1 < height and z + 1 < depth:
        for corner in range(8):
            lx = tid + (corner & 1)
            word = row_bits[((corner >> 1) & 1) + 3 * (corner >> 2), lx // WORD_BITS]
            case |= int32((word >> (lx % WORD_BITS)) & 1) << corner
        triangles = int32(case_table[case, 0])
    face_prefix[tid] = triangles
    cuda.syncthreads()
    step = 1
    while step < threads:  # Hillis-Steele inclusive scan of the triangle counts
        add = int32(0)
        if tid >= step:
            add = face_prefix[tid - step]
        cuda.syncthreads()
        face_prefix[tid] += add
        cuda.syncthreads()
        step *= 2

    first_vertex = offsets[0, n]
    if x < width:
        w = tid // WORD_BITS
        bit = tid % WORD_BITS
        mask = (int64(1) << bit) - 1
        edge_x = edge_bits[0, 0, w]
        edge_y = edge_bits[0, 1, w]
        edge_z = edge_bits[0, 2, w]
        vid = seg_vertex_base[seg] + word_prefix[0, w] + cuda.popc(edge_x & mask) \
            + cuda.popc(edge_y & mask) + cuda.popc(edge_z & mask)
        flags = ((edge_x >> bit) & 1) | ((edge_y >> bit) & 1) << 1 | ((edge_z >> bit) & 1) << 2
        # As _cpu._crossing: a / divisor in float32, t and the sum in float64 (no
        # multiplication, so no fused multiply-add), one rounding to float32.
        a = float64(float32(volume[n, z, y, x]) / divisor)
        for axis in range(3):
            if (flags >> axis) & 1:
                b = float32(volume[n, z + (axis == 2), y + (axis == 1), x + (axis == 0)])
                b = float64(b / divisor)
                t = (float64(level) - a) / (b - a)
                if t != t:
                    t = 0.5
                px = float32(x)
                py = float32(y)
                pz = float32(z)
                if axis == 0:
                    px = float32(float64(x) + t)
                elif axis == 1:
                    py = float32(float64(y) + t)
                else:
                    pz = float32(float64(z) + t)
                vertices[vid, 0] = px
                vertices[vid, 1] = py
                vertices[vid, 2] = pz
                vid += 1

    if triangles:
        fid = seg_face_base[seg] + face_prefix[tid] - triangles
        for k in range(3 * triangles):
            code = int32(case_table[case, 1 + k])
            corner = code >> 2
            axis = code & 3
            j = (corner >> 1) & 1
            kz = corner >> 2
            lx = tid + (corner & 1)  # may be `threads`: first point of the next chunk
            w = lx // WORD_BITS
            bit = lx % WORD_BITS
            mask = (int64(1) << bit) - 1
            r = j + 2 * kz
            edge_x = edge_bits[r, 0, w]
            edge_y = edge_bits[r, 1, w]
            owner_seg = ((n * depth + z + kz) * height + y + j) * n_chunks + chunk
            vid = seg_vertex_base[owner_seg] + word_prefix[r, w] \
                + cuda.popc(edge_x & mask) + cuda.popc(edge_y & mask) \
                + cuda.popc(edge_bits[r, 2, w] & mask)
            if axis >= 1:
                vid += (edge_x >> bit) & 1
            if axis == 2:
                vid += (edge_y >> bit) & 1
            faces[fid + k // 3, k % 3] = vid - first_vertex


def as_device_array(obj):
    """A Numba device array viewing ``obj``, and the stream its producer works on.

    ``obj`` is a Numba device array (its own ``stream``: the meshes made here carry the
    stream they were made on), a CUDA ``torch.Tensor`` (torch's current stream on its
    device), or any other ``__cuda_array_interface__`` object (the interface's stream
    when it names one). Nothing is copied or synchronised. Call it with ``obj``'s device
    current (:func:`on_device`): the view belongs to the current context.
    """
    if type(obj).__module__.startswith("numba.cuda"):
        return obj, obj.stream or 0  # the stream a device array was made for
    if type(obj).__module__.startswith("torch"):
        import torch

        handle = torch.cuda.current_stream(obj.device).cuda_stream
        stream = cuda.external_stream(handle) if handle else 0
    else:
        handle = obj.__cuda_array_interface__.get("stream")
        if handle is None or handle == 1:  # none named, or the legacy default stream
            stream = 0
        elif handle == 2:
            stream = cuda.per_thread_default_stream()
        else:
            stream = cuda.external_stream(handle)
    return cuda.as_cuda_array(obj, sync=False), stream


def add_batch_axis(array):
    """View a ``(D, H, W)`` device array as ``(1, D, H, W)``."""
    if array.is_c_contiguous():
        return array.reshape((1,) + tuple(array.shape))
    if not hasattr(array, "gpu_data"):  # the simulator's arrays: a copy will do
        return cuda.to_device(np.ascontiguousarray(array.copy_to_host())[None])
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    return DeviceNDArray((1,) + tuple(array.shape), (0,) + tuple(array.strides), array.dtype,
                         gpu_data=array.gpu_data)


# --- devices --------------------------------------------------------------------------

_CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL = 9


def current_device_id() -> int:
    """Id of the current CUDA device (0 under the simulator, or without a driver)."""
    try:
        return int(cuda.get_current_device().id)
    except Exception:  # the simulator has no such call; no driver: numba's own errors
        return 0


def array_device_id(obj) -> int | None:
    """The CUDA device whose memory ``obj`` (a CUDA array) is on: a torch tensor's
    device, a Numba device array's context's device, else what the driver says of its
    address; ``None`` when it cannot be told (the simulator)."""
    module = type(obj).__module__
    if module.startswith("torch"):
        return None if obj.device.index is None else int(obj.device.index)
    if module.startswith("numba.cuda"):
        context = getattr(getattr(obj, "gpu_data", None), "context", None)
        device = getattr(context, "device", None)
        return None if device is None else int(device.id)
    try:
        pointer = int(obj.__cuda_array_interface__["data"][0])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return _pointer_device(pointer)


def _pointer_device(pointer: int) -> int | None:
    """The device of a unified device address (``cuPointerGetAttribute``), or ``None``."""
    lib = libcuda() if pointer else None
    if lib is None:
        return None
    ordinal = ctypes.c_int(-1)
    status = lib.cuPointerGetAttribute(ctypes.byref(ordinal),
                                       _CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                       ctypes.c_uint64(pointer))
    return int(ordinal.value) if status == 0 and ordinal.value >= 0 else None


@contextlib.contextmanager
def on_device(device_id: int | None):
    """Make CUDA device ``device_id``'s primary context current for the block (Numba's
    ``cuda.gpus[device_id]``, which torch and TensorRT share); nothing to do for
    ``None`` or for the device already current."""
    if device_id is None or device_id == current_device_id():
        yield
        return
    with cuda.gpus[device_id]:
        yield


# --- launch limits --------------------------------------------------------------------

WARP = 32
REGISTERS_PER_BLOCK = 65536  # the register file one block may use, compute capability 5.0-12.x
_REGISTER_UNIT = 256  # registers are allocated to each warp in units of 256


def register_block_limit(registers_per_thread: int,
                         registers_per_block: int = REGISTERS_PER_BLOCK) -> int:
    """The largest block (whole warps, at most 1024 threads) whose registers fit in
    ``registers_per_block`` at ``registers_per_thread`` each. The emit kernel's 71-77
    registers (ptxas, sm_87 and sm_90) allow 800-896 threads: more fails to launch."""
    per_warp = _ceil_div(max(1, int(registers_per_thread)) * WARP, _REGISTER_UNIT) \
        * _REGISTER_UNIT
    return min(MAX_THREADS, registers_per_block // per_warp * WARP)


@dataclass(frozen=True)
class KernelLimits:
    """The largest blocks the compiled kernels launch with on the current device:
    ``threads`` for the count and emit kernels (one segment), ``scan_threads`` for the
    scan; ``registers``: registers per thread of each (empty under the simulator)."""

    threads: int
    scan_threads: int
    registers: dict = field(default_factory=dict)


_limits: dict = {}


def kernel_limits(volume_type) -> KernelLimits:
    """:class:`KernelLimits` for volumes of Numba type ``volume_type`` (``(N, D, H, W)``
    arrays), from the kernels compiled for it on the current device: each kernel's
    ``max_threads_per_block`` (the driver's limit, which counts its registers) and the
    register file divided by its registers per thread, whichever is smaller."""
    if not hasattr(_emit_kernel, "compile"):  # the simulator's kernels: no registers
        return KernelLimits(MAX_THREADS, _SCAN_MAX_THREADS)
    key = (volume_type, current_device_id())
    if key not in _limits:
        registers, limits = {}, {}
        for name, kernel, argtypes in _launch_types(volume_type):
            compiled = kernel.compile(argtypes)
            registers[name] = int(compiled.regs_per_thread)
            limit = min(int(compiled.max_threads_per_block),
                        register_block_limit(registers[name]))
            limits[name] = limit // WARP * WARP
        _limits[key] = KernelLimits(min(limits["count"], limits["emit"], MAX_THREADS),
                                    min(limits["scan"], _SCAN_MAX_THREADS), registers)
    return _limits[key]


def _launch_types(volume_type) -> list:
    """``(name, kernel, argument types)`` of the three kernels as :meth:`MarchingCubesCUDA.run`
    launches them on volumes of Numba type ``volume_type``."""
    from numba import types

    def array(dtype, ndim):
        return types.Array(dtype, ndim, "C")

    f32, i32, i64 = types.float32, types.int32, types.int64
    table, bits = array(types.int8, 2), array(types.uint32, 4)
    totals = (array(i32, 1), array(i32, 1))
    bases = (array(i64, 1), array(i64, 1), array(i64, 2))
    return [("count", _count_kernel, (volume_type, f32, table, bits) + totals),
            ("scan", _scan_kernel, totals + (i64,) + bases),
            ("emit", _emit_kernel, (volume_type, f32, f32, f32, table, bits) + totals + bases
             + (array(f32, 2), array(i32, 2)))]


def _volume_type(dtype, contiguous: bool = True):
    """The Numba type of ``(N, D, H, W)`` device arrays of ``dtype``."""
    from numba import from_dtype, types

    return types.Array(from_dtype(np.dtype(dtype)), 4, "C" if contiguous else "A")


def _event():
    """A CUDA event for ordering streams (no timing)."""
    try:
        return cuda.event(timing=False)
    except TypeError:  # the simulator's events take no arguments
        return cuda.event()


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class MarchingCubesCUDA:
    """Device buffers for marching cubes on batches of one shape, reused across calls.

    Parameters
    ----------
    shape : tuple of int
        ``(N, D, H, W)``: volumes per batch, depth, rows, columns.
    dtype : numpy dtype
        The volumes' dtype (float32, float16 or uint8); with ``contiguous``, it selects
        the compiled kernels whose limits apply (:func:`kernel_limits`).
    contiguous : bool
        Whether the volumes will be C-contiguous (else strided views).
    threads : int, optional
        Points per segment (threads per block of the count and emit kernels), a multiple
        of 32 up to the compiled kernels' limit on this device (about 800 for the emit
        kernel's registers). Default: ``W`` rounded up to a multiple of 32, at most that
        limit.
    scan_threads : int, optional
        Threads of the single scan block. Default: the segment count rounded up to a
        multiple of 32, at most 1024 (or the scan kernel's limit).

    Notes
    -----
    Calls may come from several streams: each call's kernels wait (on the device, by an
    event) for the previous call's kernels, which read and write the same buffers. The
    host side is not thread-safe: one caller at a time (the module-level entry points
    lock).
    """

    def __init__(self, shape: tuple[int, int, int, int], *, dtype=np.float32,
                 contiguous: bool = True, threads: int | None = None,
                 scan_threads: int | None = None) -> None:
        n_volumes, depth, height, width = (int(s) for s in shape)
        self._volume_key = (np.dtype(dtype), bool(contiguous))
        limits = kernel_limits(_volume_type(dtype, contiguous))
        if threads is None:
            threads = min(limits.threads, _ceil_div(width, WARP) * WARP)
        self._check_threads(threads, limits)
        if height > 65535 or n_volumes * depth > 65535:
            raise ValueError(f"volume batch {shape} is too large for one launch grid "
                             "(H and N * D must be at most 65535)")
        self.shape = (n_volumes, depth, height, width)
        self.threads = threads
        n_chunks = _ceil_div(width, threads)
        self.grid = (n_chunks, height, n_volumes * depth)
        self.segs_per_volume = depth * height * n_chunks
        n_segs = n_volumes * self.segs_per_volume
        if scan_threads is None:
            scan_threads = min(limits.scan_threads, _ceil_div(n_segs, WARP) * WARP)
        if not 1 <= scan_threads <= limits.scan_threads:
            raise ValueError(f"scan_threads must be in [1, {limits.scan_threads}]; "
                             f"got {scan_threads}")
        self.scan_threads = scan_threads
        self.limits = limits
        self.case_table = cuda.to_device(CASE_TABLE)
        self.bits = cuda.device_array((n_volumes, depth, height, _ceil_div(width, WORD_BITS)),
                                      dtype=np.uint32)
        self.seg_vertices = cuda.device_array(n_segs, dtype=np.int32)
        self.seg_triangles = cuda.device_array(n_segs, dtype=np.int32)
        self.seg_vertex_base = cuda.device_array(n_segs, dtype=np.int64)
        self.seg_face_base = cuda.device_array(n_segs, dtype=np.int64)
        self.offsets = cuda.device_array((2, n_volumes + 1), dtype=np.int64)
        self.host_offsets = cuda.pinned_array((2, n_volumes + 1), dtype=np.int64)
        self._vertices = cuda.device_array((0, 3), dtype=np.float32)
        self._faces = cuda.device_array((0, 3), dtype=np.int32)
        self._done = _event()  # recorded after each call's last kernel
        self._recorded = False

    @staticmethod
    def _check_threads(threads, limits: KernelLimits) -> None:
        if not isinstance(threads, (int, np.integer)) or isinstance(threads, bool) \
                or threads % WORD_BITS or not WORD_BITS <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be a multiple of {WORD_BITS} in "
                             f"[{WORD_BITS}, {MAX_THREADS}]; got {threads!r}")
        if threads > limits.threads:
            used = ", ".join(f"{name} {n}" for name, n in limits.registers.items())
            raise ValueError(f"threads={threads} is more than the compiled kernels can launch "
                             f"per block on this device ({limits.threads}; registers per "
                             f"thread: {used or 'unknown'})")

    def __call__(self, volume, level: float = 0.5, *, stream=None):
        """Mesh a ``(D, H, W)`` CUDA array (for ``N == 1``), or a ``(N, D, H, W)`` one.

        As :func:`vrn.kernels.marching_cubes` (or ``marching_cubes_batch`` for 4-D
        input), but the results are views into this object's buffers, valid until its
        next call: no allocation once the buffers have grown to the mesh size.
        """
        ndim = len(volume.shape)
        meshes = marching_cubes_cuda(volume, level, stream, ndim if ndim == 3 else 4,
                                      workspace=self, reuse_output=True)
        return meshes[0] if ndim == 3 else meshes

    def run(self, volumes, threshold: float, level: float, divisor: float, *, stream=0,
            reuse_output: bool = False) -> list[tuple[object, object]]:
        """Mesh each volume of ``volumes`` (a ``(N, D, H, W)`` device array).

        ``threshold``, ``level`` and ``divisor`` are as in
        :func:`vrn.kernels._cpu.marching_cubes_cpu`. Returns one ``(vertices, faces)``
        pair of device arrays per volume, views into two arrays shared by the batch. With
        ``reuse_output`` they live in this object's buffers and are overwritten by the
        next call; otherwise they are freshly allocated.
        """
        if tuple(volumes.shape) != self.shape:
            raise ValueError(f"volumes have shape {tuple(volumes.shape)}; this workspace "
                             f"was made for {self.shape}")
        key = (np.dtype(volumes.dtype), bool(volumes.is_c_contiguous()))
        if key != self._volume_key:  # other compiled kernels: check their limits too
            self._check_threads(self.threads, kernel_limits(_volume_type(*key)))
        threshold, level, divisor = np.float32(threshold), np.float32(level), np.float32(divisor)
        if self._recorded:  # the last call's kernels (any stream) are done with our buffers
            self._done.wait(stream)
        _count_kernel[self.grid, self.threads, stream](
            volumes, threshold, self.case_table, self.bits, self.seg_vertices,
            self.seg_triangles)
        _scan_kernel[1, self.scan_threads, stream](
            self.seg_vertices, self.seg_triangles, self.segs_per_volume,
            self.seg_vertex_base, self.seg_face_base, self.offsets)
        # The one host synchronisation: the mesh sizes.
        if isinstance(stream, int):  # the legacy default stream: the copy blocks
            self.offsets.copy_to_host(self.host_offsets)
        else:
            self.offsets.copy_to_host(self.host_offsets, stream=stream)
            stream.synchronize()
        vertex_offsets = [int(v) for v in self.host_offsets[0]]
        face_offsets = [int(f) for f in self.host_offsets[1]]
        n_vertices, n_faces = vertex_offsets[-1], face_offsets[-1]
        if reuse_output:
            if self._vertices.shape[0] < n_vertices:
                self._vertices = cuda.device_array((n_vertices + n_vertices // 4, 3),
                                                   dtype=np.float32)
            if self._faces.shape[0] < n_faces:
                self._faces = cuda.device_array((n_faces + n_faces // 4, 3), dtype=np.int32)
            vertices, faces = self._vertices, self._faces
        else:
            vertices = cuda.device_array((n_vertices, 3), dtype=np.float32, stream=stream)
            faces = cuda.device_array((n_faces, 3), dtype=np.int32, stream=stream)
        if n_vertices:
            _emit_kernel[self.grid, self.threads, stream](
                volumes, threshold, level, divisor, self.case_table, self.bits,
                self.seg_vertices, self.seg_triangles, self.seg_vertex_base,
                self.seg_face_base, self.offsets, vertices, faces)
        self._done.record(stream)
        self._recorded = True
        meshes = []
        for n in range(self.shape[0]):
            mesh = (vertices[vertex_offsets[n]:vertex_offsets[n + 1]],
                    faces[face_offsets[n]:face_offsets[n + 1]])
            for array in mesh:  # later kernels and copies follow this stream by default
                array.stream = stream
            meshes.append(mesh)
        return meshes


_workspaces: dict = {}
_workspaces_lock = threading.Lock()


def marching_cubes_cuda(volumes, level, stream, ndim: int, workspace=None,
                        reuse_output: bool = False) -> list:
    """The CUDA path of :func:`vrn.kernels.marching_cubes` (``ndim`` 3) and
    ``marching_cubes_batch`` (``ndim`` 4), in the context of the volumes' own device:
    one cached :class:`MarchingCubesCUDA` per shape, dtype, layout and device, or
    ``workspace``."""
    with on_device(array_device_id(volumes)):
        device_volumes, default_stream = as_device_array(volumes)
        check_volume(device_volumes.shape, device_volumes.dtype, ndim)
        level = check_level(level)
        if ndim == 3:
            device_volumes = add_batch_axis(device_volumes)
        if stream is None:
            stream = default_stream
        threshold, level, divisor = classification(device_volumes.dtype, level)
        if workspace is not None:
            return workspace.run(device_volumes, threshold, level, divisor, stream=stream,
                                 reuse_output=reuse_output)
        dtype, contiguous = np.dtype(device_volumes.dtype), device_volumes.is_c_contiguous()
        key = (tuple(device_volumes.shape), dtype, contiguous, current_device_id())
        with _workspaces_lock:
            workspace = _workspaces.get(key)
            if workspace is None:
                workspace = _workspaces[key] = MarchingCubesCUDA(
                    device_volumes.shape, dtype=dtype, contiguous=contiguous)
            return workspace.run(device_volumes, threshold, level, divisor, stream=stream)
