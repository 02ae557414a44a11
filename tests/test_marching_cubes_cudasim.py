"""The CUDA twins (marching cubes and mesh ops) against the CPU twins, bit for bit.

The kernels run under the Numba CUDA simulator, in a subprocess so that
``NUMBA_ENABLE_CUDASIM`` does not leak into other tests: the checks below are collected
by this file's ``__main__``, run there, and reported back as JSON. The simulator runs
the very kernels that run on hardware, at a few milliseconds per thread, so the volumes
are tiny. A second test type-checks the kernels with ``numba.cuda.compile_ptx`` for a
Jetson Orin (compute capability 8.7) and an H100 (9.0) where NVVM is installed.
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
                               [[0, 0, 0], [9, 7, 1], [9.5, 7.5, 0.5]]]).astype(np.float32)
    crop = rng.random((3, 8, 10)).astype(np.float32)
    angle = 0.3
    crop_to_photo = np.array([[1.7 * np.cos(angle), -1.7 * np.sin(angle), 120.25],
                              [1.7 * np.sin(angle), 1.7 * np.cos(angle), -33.5]])
    gpu_vertices = cuda.to_device(vertices)
    moved = transform_vertices(gpu_vertices, crop_to_photo, z_scale=0.5)
    assert np.array_equal(to_host(moved, moved)[0],
                          transform_vertices(vertices, crop_to_photo, z_scale=0.5))
    for gpu_crop in (crop, cuda.to_device(crop)):
        colors = vertex_colors(gpu_crop, gpu_vertices)
        assert np.array_equal(colors.copy_to_host(), vertex_colors(crop, vertices))


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


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(_run_checks()))
