"""The CUDA twins (marching cubes and mesh ops) against the CPU twins, bit for bit.

The kernels run under the Numba CUDA simulator, in a subprocess so that
``NUMBA_ENABLE_CUDASIM`` does not leak into other tests: the checks below are collected
by this file's ``__main__``, run there, and reported back as JSON. The simulator runs
the very kernels that run on hardware, at a few milliseconds per thread, so the volumes
are tiny. A second test type-checks the kernels with ``numba.cuda.compile_ptx`` for a
Jetson Orin (compute capability 8.7) and an H100 (9.0) where NVVM is installed, and a
third reads their register counts from ``ptxas`` where it is installed.

Issue 15's kernel findings: the block size is capped from the compiled kernels' limits
and ``threads`` is validated (finding 6: ``threads_capped_by_the_kernel_limits`` and the
``ptxas`` test); a volume is meshed in its own device's context (finding 5:
``work_runs_on_the_volumes_device``); a call's kernels wait for the previous call's on
the device, whatever stream each runs on (finding 8: ``calls_are_ordered_on_the_device``;
the simulator runs everything in order, so the race itself cannot show here, only that
the event is recorded after the last kernel and waited on before the first).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
CHECKS = {}


def check(function):
    CHECKS[function.__name__] = function
    return function


def _assert_same(gpu_meshes, cpu_meshes):
    from vrn.kernels import to_host

    assert len(gpu_meshes) == len(cpu_meshes)
    for (vertices, faces), (cpu_vertices, cpu_faces) in zip(gpu_meshes, cpu_meshes):
        vertices, faces = to_host(vertices, faces)
        assert vertices.dtype == np.float32 and faces.dtype == np.int32
        assert vertices.shape == cpu_vertices.shape and faces.shape == cpu_faces.shape
        assert np.array_equal(vertices, cpu_vertices)
        assert np.array_equal(faces, cpu_faces)


@check
def batch_with_two_segments_per_row():
    """Width 40 in segments of 32 points: cubes whose +x corner starts the next
    segment; a batch of two (one empty); a scan block smaller than the segment count."""
    from numba import cuda

    from vrn.kernels import MarchingCubesCUDA, marching_cubes_batch
    from vrn.kernels._checks import classification

    volumes = np.random.default_rng(0).random((2, 2, 3, 40)).astype(np.float32)
    volumes[1] = 0.0
    workspace = MarchingCubesCUDA(volumes.shape, threads=32, scan_threads=4)
    meshes = workspace.run(cuda.to_device(volumes), *classification(np.float32, 0.5))
    _assert_same(meshes, marching_cubes_batch(volumes, 0.5))
    assert len(meshes[0][1]) > 50 and len(meshes[1][1]) == 0


@check
def public_entry_points_and_dtypes():
    """marching_cubes on device arrays: uint8 with the exact cut, float16 with NaN and
    infinities, a non-contiguous view, a full volume."""
    from numba import cuda

    from vrn.kernels import marching_cubes

    rng = np.random.default_rng(1)
    raw = rng.integers(120, 136, size=(2, 2, 32), dtype=np.uint8)  # around 127.5
    _assert_same([marching_cubes(cuda.to_device(raw), 0.5)], [marching_cubes(raw, 0.5)])

    half = rng.random((2, 2, 32)).astype(np.float16)
    half[0, 1, 3:6] = [np.nan, np.inf, -np.inf]
    _assert_same([marching_cubes(cuda.to_device(half))], [marching_cubes(half)])

    wide = rng.random((2, 2, 64)).astype(np.float32)
    view = cuda.to_device(wide)[:, :, ::2]
    _assert_same([marching_cubes(view)], [marching_cubes(wide[:, :, ::2])])

    vertices, faces = marching_cubes(cuda.to_device(np.ones((2, 2, 32), np.float32)))
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)


@check
def workspace_reuses_its_buffers():
    from numba import cuda

    from vrn.kernels import MarchingCubesCUDA, marching_cubes

    rng = np.random.default_rng(2)
    workspace = MarchingCubesCUDA((1, 2, 3, 32))
    big = rng.random((2, 3, 32)).astype(np.float32)
    small = big.copy()
    small[:, :, 8:] = 0.0
    first = workspace(cuda.to_device(big))
    _assert_same([first], [marching_cubes(big)])
    buffers = workspace._vertices, workspace._faces
    second = workspace(cuda.to_device(small))
    _assert_same([second], [marching_cubes(small)])
    assert workspace._vertices is buffers[0] and workspace._faces is buffers[1]


@check
def mesh_ops_match_the_cpu():
    from numba import cuda

    from vrn.kernels import to_host, transform_vertices, vertex_colors

    rng = np.random.default_rng(3)
    vertices = np.concatenate([rng.uniform(-2, 12, (40, 3)),
                               [[0, 0, 0], [9, 7, 1], [9.5, 7.5, 0.5], [np.nan, 3, 0],
                                [2, np.nan, 0], [np.inf, -np.inf, 0]]]).astype(np.float32)
    crop = rng.random((3, 8, 10)).astype(np.float32)
    angle = 0.3
    crop_to_photo = np.array([[1.7 * np.cos(angle), -1.7 * np.sin(angle), 120.25],
                              [1.7 * np.sin(angle), 1.7 * np.cos(angle), -33.5]])
    gpu_vertices = cuda.to_device(vertices)
    moved = transform_vertices(gpu_vertices, crop_to_photo, z_scale=0.5)
    assert np.array_equal(to_host(moved, moved)[0],
                          transform_vertices(vertices, crop_to_photo, z_scale=0.5),
                          equal_nan=True)
    for gpu_crop in (crop, cuda.to_device(crop)):
        colors = vertex_colors(gpu_crop, gpu_vertices)
        assert np.array_equal(colors.copy_to_host(), vertex_colors(crop, vertices))


@check
def threads_capped_by_the_kernel_limits():
    """A compiled emit kernel of 74 registers per thread launches at most 800 threads
    (finding 6): the workspace caps its default block there and refuses more. Stand-in
    limits (64 threads) make the cap bite on a simulator-sized volume, which still
    meshes exactly as on the CPU, in two segments per row."""
    from numba import cuda

    from vrn.kernels import _cuda, marching_cubes

    real = _cuda.kernel_limits
    _cuda.kernel_limits = lambda volume_type: _cuda.KernelLimits(
        64, 1024, {"count": 40, "emit": 74})
    try:
        volume = np.random.default_rng(4).random((2, 2, 100)).astype(np.float32)
        workspace = _cuda.MarchingCubesCUDA((1, 2, 2, 100))
        assert workspace.threads == 64 and workspace.grid[0] == 2
        _assert_same([workspace(cuda.to_device(volume))], [marching_cubes(volume)])
        try:
            _cuda.MarchingCubesCUDA((1, 2, 2, 100), threads=128)
        except ValueError as error:
            assert "emit 74" in str(error) and "64" in str(error), error
        else:
            raise AssertionError("threads=128 accepted past the 64-thread limit")
        for bad in (48, 0, 2048, 64.0, True):
            try:
                _cuda.MarchingCubesCUDA((1, 2, 2, 100), threads=bad)
            except ValueError:
                continue
            raise AssertionError(f"threads={bad!r} accepted")
    finally:
        _cuda.kernel_limits = real
    assert _cuda.register_block_limit(74) == 800 and _cuda.register_block_limit(72) == 896
    assert _cuda.register_block_limit(40) == 1024


@check
def work_runs_on_the_volumes_device():
    """Finding 5: marching cubes and the mesh ops run in the context of the device the
    volume is on (a stand-in device list records which one is entered), and the cached
    workspace is that device's."""
    from numba import cuda

    from vrn.kernels import _cuda, _mesh_ops_cuda, marching_cubes, transform_vertices

    entered = []
    current = [0]

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            entered.append(self.index)
            current.append(self.index)

        def __exit__(self, *exc):
            current.pop()

    class Devices:
        def __getitem__(self, index):
            return Device(index)

    saved = (cuda.gpus, _cuda.array_device_id, _mesh_ops_cuda.array_device_id,
             _cuda.current_device_id)
    cuda.gpus = Devices()
    _cuda.array_device_id = _mesh_ops_cuda.array_device_id = lambda obj: 1
    _cuda.current_device_id = lambda: current[-1]
    try:
        volume = np.random.default_rng(5).random((2, 2, 32)).astype(np.float32)
        vertices, faces = marching_cubes(cuda.to_device(volume))
        transform_vertices(vertices, np.array([[1.0, 0, 0], [0, 1.0, 0]]))
    finally:
        (cuda.gpus, _cuda.array_device_id, _mesh_ops_cuda.array_device_id,
         _cuda.current_device_id) = saved
    assert entered == [1, 1], entered
    assert any(key[-1] == 1 for key in _cuda._workspaces), list(_cuda._workspaces)
    _assert_same([(vertices, faces)], [marching_cubes(volume)])


@check
def calls_are_ordered_on_the_device():
    """Finding 8: the cached buffers serve calls from any stream, so each call's first
    kernel waits (an event) for the previous call's last one."""
    from numba import cuda

    from vrn.kernels import _cuda

    log = []

    class Event:
        def record(self, stream=0):
            log.append(("record", stream))

        def wait(self, stream=0):
            log.append(("wait", stream))

    class Logged:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, config):
            launch = self.kernel[config]

            def run(*args):
                log.append((self.name, config[2]))
                return launch(*args)
            return run

    saved = _cuda._event, _cuda._count_kernel, _cuda._emit_kernel
    _cuda._event = Event
    _cuda._count_kernel = Logged("count", saved[1])
    _cuda._emit_kernel = Logged("emit", saved[2])
    try:
        volume = np.random.default_rng(6).random((1, 2, 2, 32)).astype(np.float32)
        workspace = _cuda.MarchingCubesCUDA(volume.shape)
        first, second = cuda.stream(), cuda.stream()
        threshold, level, divisor = 0.5, 0.5, 1.0
        workspace.run(cuda.to_device(volume), threshold, level, divisor, stream=first)
        workspace.run(cuda.to_device(volume), threshold, level, divisor, stream=second)
    finally:
        _cuda._event, _cuda._count_kernel, _cuda._emit_kernel = saved
    assert log == [("count", first), ("emit", first), ("record", first),
                   ("wait", second), ("count", second), ("emit", second),
                   ("record", second)], log


def _run_checks() -> dict:
    results = {}
    for name, function in CHECKS.items():
        try:
            function()
            results[name] = "ok"
        except Exception:  # report every failure, keep running the others
            results[name] = traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def simulator_results() -> dict:
    if SIMULATED:
        pytest.skip("already inside the simulator")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    root = Path(__file__).resolve().parents[1]
    process = subprocess.run([sys.executable, __file__], env=env, cwd=root,
                             capture_output=True, text=True, timeout=600)
    lines = process.stdout.strip().splitlines()
    assert process.returncode == 0 and lines, process.stdout[-3000:] + process.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_cuda_twin_under_simulator(simulator_results, name):
    assert simulator_results[name] == "ok", simulator_results[name]


def _signatures(all_dtypes: bool):
    """(module, kernel, argument types) for every kernel; the marching-cubes kernels for
    float32 volumes, or for every volume dtype and a strided layout."""
    from numba import types

    from vrn.kernels import _cuda, _mesh_ops_cuda

    def array(dtype, ndim, layout="C"):
        return types.Array(dtype, ndim, layout)

    f32, i32, i64, f64 = types.float32, types.int32, types.int64, types.float64
    table, bits = array(types.int8, 2), array(types.uint32, 4)
    segments = (array(i32, 1), array(i32, 1), array(i64, 1), array(i64, 1), array(i64, 2))
    volumes = [array(types.float32, 4)]
    if all_dtypes:
        volumes += [array(types.float16, 4), array(types.uint8, 4),
                    array(types.float32, 4, "A")]
    for volume in volumes:
        yield _cuda, "_count_kernel", (volume, f32, table, bits) + segments[:2]
        yield _cuda, "_emit_kernel", (volume, f32, f32, f32, table, bits) + segments + (
            array(f32, 2), array(i32, 2))
    yield _cuda, "_scan_kernel", segments[:2] + (i64,) + segments[2:]
    yield _mesh_ops_cuda, "_transform_kernel", (array(f32, 2),) + (f64,) * 6 + (
        f32, array(f32, 2))
    yield _mesh_ops_cuda, "_colors_kernel", (array(f32, 3), array(f32, 2),
                                             array(types.uint8, 2))


@pytest.mark.parametrize("cc", [(8, 7), (9, 0)], ids=["orin-8.7", "hopper-9.0"])
def test_kernels_compile_to_ptx(cc):
    if SIMULATED:
        pytest.skip("compile_ptx needs the real CUDA target")
    try:
        from numba import cuda
        from numba.cuda.cudadrv.error import NvvmSupportError

        import vrn.kernels._mesh_ops_cuda  # noqa: F401  (imports numba.cuda)
    except ImportError as error:
        pytest.skip(f"numba.cuda is not available: {error}")

    def probe(a):
        a[0] = 1.0

    try:
        cuda.compile_ptx(probe, "void(float32[::1])", cc=cc)
    except (NvvmSupportError, FileNotFoundError) as error:
        pytest.skip(f"NVVM (CUDA toolkit) not usable: {error}")
    except RuntimeError as error:
        if "libdevice" not in str(error):
            raise
        pytest.skip(f"libdevice (CUDA toolkit) not found: {error}")

    for module, name, signature in _signatures(all_dtypes=cc == (8, 7)):
        ptx, _ = cuda.compile_ptx(getattr(module, name).py_func, signature, cc=cc)
        assert f".target sm_{cc[0]}{cc[1]}" in ptx


def test_emit_kernel_registers_cap_the_block(tmp_path):
    """Finding 6 with the real compiler: ptxas counts the emit kernel's registers per
    thread (71-77 for sm_87 and sm_90), and the cap they imply is below 1024 threads
    (the old default for wide volumes); the count kernel fits 1024."""
    import re
    import shutil

    if SIMULATED:
        pytest.skip("compile_ptx needs the real CUDA target")
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not installed")
    try:
        from numba import cuda

        from vrn.kernels import _cuda
    except ImportError as error:
        pytest.skip(f"numba.cuda is not available: {error}")
    from numba import types

    volume = types.Array(types.float32, 4, "C")
    registers = {}
    for name, kernel, signature in _cuda._launch_types(volume):
        try:
            ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(8, 7))
        except Exception as error:  # no NVVM or libdevice
            pytest.skip(f"compile_ptx unusable here: {error}")
        source = tmp_path / f"{name}.ptx"
        source.write_text(ptx)
        done = subprocess.run([ptxas, "-v", "-arch=sm_87", str(source), "-o",
                               str(tmp_path / f"{name}.cubin")], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        registers[name] = int(re.findall(r"Used (\d+) registers", done.stderr)[-1])
    assert 60 <= registers["emit"] <= 96, registers
    assert _cuda.register_block_limit(registers["emit"]) < _cuda.MAX_THREADS
    assert _cuda.register_block_limit(registers["count"]) == _cuda.MAX_THREADS
    assert _cuda.register_block_limit(registers["scan"]) == _cuda.MAX_THREADS


def test_kernel_limits_come_from_the_compiled_kernels(monkeypatch):
    """Finding 6: the limits are each compiled kernel's own (``max_threads_per_block``
    and its registers), the smaller of count and emit for a segment."""
    if SIMULATED:
        pytest.skip("outside the simulator only")
    try:
        from vrn.kernels import _cuda
    except ImportError as error:
        pytest.skip(f"numba.cuda is not available: {error}")

    class Compiled:
        def __init__(self, regs, most):
            self.regs_per_thread, self.max_threads_per_block = regs, most

    class Kernel:
        def __init__(self, regs, most):
            self.compiled, self.signatures = Compiled(regs, most), []

        def compile(self, signature):
            self.signatures.append(signature)
            return self.compiled

    kernels = {"_count_kernel": Kernel(40, 1024), "_scan_kernel": Kernel(44, 1024),
               "_emit_kernel": Kernel(74, 832)}
    for name, kernel in kernels.items():
        monkeypatch.setattr(_cuda, name, kernel)
    monkeypatch.setattr(_cuda, "_limits", {})
    limits = _cuda.kernel_limits(_cuda._volume_type(np.float16))
    assert limits.threads == 800  # the emit kernel's registers: 25 warps
    assert limits.scan_threads == 1024
    assert limits.registers == {"count": 40, "scan": 44, "emit": 74}
    assert kernels["_emit_kernel"].signatures[0][0] == _cuda._volume_type(np.float16)
    kernels["_emit_kernel"].compiled = Compiled(64, 512)  # the driver's word wins
    monkeypatch.setattr(_cuda, "_limits", {})
    assert _cuda.kernel_limits(_cuda._volume_type(np.float32)).threads == 512


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(_run_checks()))
