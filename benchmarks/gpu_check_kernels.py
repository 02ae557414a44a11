"""GPU check of the mesh kernels (``vrn.kernels``): ``python benchmarks/gpu_check_kernels.py``.

On full-size volumes (a face-like one, a noisy one and, inside ``gpu_check.py``, the
model's own), the CUDA twins must give exactly the CPU twins' output for float32,
float16 and uint8 volumes, for a batch, for a torch tensor on a side stream, and for a
volume wider than the emit kernel's registers allow in one block (the block size is then
capped from the compiled kernel's register count). Then CUDA events time one frame: the
three marching-cubes launches (count, scan, emit) each, and the whole call including its
host synchronisation, against the goals in ``docs/reference.md`` (under 0.2 ms on an
H100-class GPU, under 2 ms on a Jetson Orin); and the mesh finishing kernels (photo
transform and vertex colours).

Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same code runs on tiny
volumes (:data:`SIMULATOR_SHAPE` windows of each volume around its surface),
so that a plumbing error shows on any machine before it reaches a GPU host; its timings
mean nothing there.

:func:`check_marching_cubes` follows ``gpu_check.py``'s contract (a dict with
``status``, ``detail`` and the figures); run alone, this script prints them and writes
``benchmarks/results/<date>-gpu-check-kernels-<gpu>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vrn.bench.isosurface import SHAPE, face_like_volume, noisy_volume
from vrn.metrics import repeat

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_MS = {"h100": 0.2, "orin": 2.0}
SIMULATOR_SHAPE = (2, 3, 32)  # (D, H, W): one 32-thread block per row, 6 blocks
WIDE_SHAPE = (3, 4, 1000)  # wider than the emit kernel's register-limited block


def simulated() -> bool:
    """Whether numba.cuda is the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def surface_window(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A contiguous ``shape`` window of ``volume`` ``(D, H, W)`` around its centre
    column's first crossing of 0.5 (so the window holds surface), float32."""
    depth, height, width = volume.shape
    d, h, w = (min(a, b) for a, b in zip(shape, volume.shape))
    column = volume[:, height // 2, width // 2] > 0.5
    flips = np.nonzero(column[1:] != column[:-1])[0]
    z = int(flips[0]) if len(flips) else depth // 2
    z0 = min(max(z + 1 - d // 2, 0), depth - d)  # z and z + 1 straddle the crossing
    y0, x0 = (height - h) // 2, (width - w) // 2
    return np.ascontiguousarray(volume[z0:z0 + d, y0:y0 + h, x0:x0 + w], dtype=np.float32)


def _same_mesh(gpu_mesh, cpu_mesh) -> bool:
    from vrn.kernels import to_host

    vertices, faces = to_host(*gpu_mesh)
    return (vertices.shape == cpu_mesh[0].shape and faces.shape == cpu_mesh[1].shape
            and np.array_equal(vertices, cpu_mesh[0]) and np.array_equal(faces, cpu_mesh[1]))


def _variants(volume: np.ndarray) -> dict:
    return {"float32": volume, "float16": volume.astype(np.float16),
            "uint8": np.round(volume * 255).astype(np.uint8)}


def _event_ms(cuda, stream, fn, repeats: int) -> dict:
    """Median and min GPU milliseconds of ``fn()`` between two events on ``stream``."""
    fn()
    samples = []
    for _ in range(repeats):
        start, end = cuda.event(), cuda.event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return {"p50_ms": round(statistics.median(samples), 4), "min_ms": round(min(samples), 4)}


def _wall_ms(fn, repeats: int) -> dict:
    """Median and min wall milliseconds of ``fn()`` after one warm-up call."""
    stats = repeat(fn, runs=repeats).summary()
    return {"p50_ms": round(stats["p50"], 4), "min_ms": round(stats["min"], 4)}


def _time_frame(cuda, volume: np.ndarray, repeats: int) -> dict:
    """CUDA-event times of the three launches of one frame, and of the whole call."""
    from vrn.kernels import MarchingCubesCUDA
    from vrn.kernels._checks import classification
    from vrn.kernels._cuda import _count_kernel, _emit_kernel, _scan_kernel

    stream = cuda.stream()
    device_volume = cuda.to_device(volume[None], stream=stream)
    workspace = MarchingCubesCUDA(device_volume.shape)
    threshold, level, divisor = (np.float32(v) for v in classification(volume.dtype, 0.5))
    vertices, faces = workspace.run(device_volume, threshold, level, divisor, stream=stream,
                                    reuse_output=True)[0]
    ws = workspace
    count = _event_ms(cuda, stream, lambda: _count_kernel[ws.grid, ws.threads, stream](
        device_volume, threshold, ws.case_table, ws.bits, ws.seg_vertices,
        ws.seg_triangles), repeats)
    scan = _event_ms(cuda, stream, lambda: _scan_kernel[1, ws.scan_threads, stream](
        ws.seg_vertices, ws.seg_triangles, ws.segs_per_volume, ws.seg_vertex_base,
        ws.seg_face_base, ws.offsets), repeats)
    emit = _event_ms(cuda, stream, lambda: _emit_kernel[ws.grid, ws.threads, stream](
        device_volume, threshold, level, divisor, ws.case_table, ws.bits, ws.seg_vertices,
        ws.seg_triangles, ws.seg_vertex_base, ws.seg_face_base, ws.offsets, ws._vertices,
        ws._faces), repeats)
    whole = _event_ms(cuda, stream, lambda: workspace(device_volume, stream=stream), repeats)
    wall = _wall_ms(lambda: workspace(device_volume, stream=stream), repeats)
    kernels = count["p50_ms"] + scan["p50_ms"] + emit["p50_ms"]
    return {"vertices": int(vertices.shape[0]), "faces": int(faces.shape[0]),
            "count": count, "scan": scan, "emit": emit, "kernels_p50_ms": round(kernels, 4),
            "call_events": whole, "call_wall": wall, "threads": ws.threads,
            "scan_threads": ws.scan_threads, "block_limit": ws.limits.threads,
            "registers_per_thread": ws.limits.registers}


def _time_mesh_ops(cuda, volume: np.ndarray, repeats: int) -> dict:
    from vrn.kernels import marching_cubes, to_host, transform_vertices, vertex_colors

    stream = 0
    vertices, _ = marching_cubes(cuda.to_device(volume))
    size = volume.shape[1]
    crop = np.random.default_rng(0).random((3, size, size)).astype(np.float32)
    device_crop = cuda.to_device(crop)
    crop_to_photo = np.array([[1.7, -0.3, 120.25], [0.3, 1.7, -33.5]])
    host_vertices = to_host(vertices, vertices)[0]
    same = (np.array_equal(transform_vertices(vertices, crop_to_photo).copy_to_host(),
                           transform_vertices(host_vertices, crop_to_photo))
            and np.array_equal(vertex_colors(device_crop, vertices).copy_to_host(),
                               vertex_colors(crop, host_vertices)))
    moved = cuda.device_array(vertices.shape, dtype=np.float32)
    colors = cuda.device_array(vertices.shape, dtype=np.uint8)
    transform = _event_ms(cuda, stream, lambda: transform_vertices(
        vertices, crop_to_photo, out=moved), repeats)
    coloring = _event_ms(cuda, stream, lambda: vertex_colors(
        device_crop, vertices, out=colors), repeats)
    return {"same_as_cpu": bool(same), "transform": transform, "colors": coloring}


def _torch_side_stream(volume: np.ndarray):
    """marching_cubes on a CUDA torch tensor produced on a side stream (the kernels must
    follow torch's current stream), or None without torch CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from vrn.kernels import marching_cubes

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        tensor = torch.from_numpy(volume).cuda(non_blocking=False) * 1.0  # made on `side`
        mesh = marching_cubes(tensor)
    return _same_mesh(mesh, marching_cubes(volume))


def check_marching_cubes(ctx=None, *, shape: tuple[int, int, int] | None = None,
                         repeats: int | None = None) -> dict:
    """GPU marching cubes and mesh ops against their CPU twins, and their GPU times.
    ``shape`` (default: the full size, :data:`SIMULATOR_SHAPE` under the simulator) and
    ``repeats`` (default: 50, 2 under the simulator) size the run."""
    try:
        from numba import cuda
    except ImportError as error:
        return {"status": "skip", "detail": f"numba.cuda does not import ({error})"}
    if not cuda.is_available():
        return {"status": "skip", "detail": "no CUDA device for numba"}
    from vrn.kernels import marching_cubes, marching_cubes_batch

    tiny = simulated()
    shape = tuple(shape or (SIMULATOR_SHAPE if tiny else SHAPE))
    repeats = repeats or (1 if tiny else 50)
    if tiny:  # windows of the full-size volumes, around their surface
        volumes = {"face-like": surface_window(face_like_volume(SHAPE), shape),
                   "noisy": surface_window(noisy_volume(SHAPE), shape)}
    else:
        volumes = {"face-like": face_like_volume(shape), "noisy": noisy_volume(shape)}
    if ctx is not None and hasattr(ctx, "reference"):
        try:  # the model's own volumes for the sample photo's crops
            model_volumes = ctx.reference()
            for i, volume in enumerate(model_volumes[:1] if tiny else model_volumes):
                volumes[f"model-{i}"] = (surface_window(volume, shape) if tiny else
                                         np.ascontiguousarray(volume, dtype=np.float32))
        except Exception as error:  # the model check reports its own failures
            volumes["model"] = None
            model_error = f"{type(error).__name__}: {error}"
    comparisons = {}
    for name, volume in volumes.items():
        if volume is None:
            comparisons[name] = f"not run ({model_error})"
            continue
        for dtype, variant in _variants(volume).items():
            if tiny and name.startswith("model") and dtype != "float32":
                continue  # the simulator is slow: every dtype on the synthetic volumes
            same = _same_mesh(marching_cubes(cuda.to_device(variant)), marching_cubes(variant))
            comparisons[f"{name}/{dtype}"] = same
    batch = np.stack([volumes["face-like"], volumes["noisy"]])
    comparisons["batch-of-2"] = all(
        _same_mesh(g, c) for g, c in zip(marching_cubes_batch(cuda.to_device(batch)),
                                        marching_cubes_batch(batch)))
    torch_same = None if tiny else _torch_side_stream(volumes["noisy"])
    if torch_same is not None:
        comparisons["torch-side-stream"] = torch_same
    if not tiny:  # a block capped by the emit kernel's registers (a second segment)
        wide = noisy_volume(WIDE_SHAPE)
        comparisons["wide-capped-block"] = _same_mesh(marching_cubes(cuda.to_device(wide)),
                                                      marching_cubes(wide))

    timing = {name: _time_frame(cuda, volumes[name], repeats)
              for name in (("face-like",) if tiny else ("face-like", "noisy"))}
    mesh_ops = _time_mesh_ops(cuda, volumes["face-like"], repeats)
    failed = [k for k, v in comparisons.items() if v is False]
    if not mesh_ops["same_as_cpu"]:
        failed.append("mesh-ops")
    face = timing["face-like"]
    detail = (f"GPU == CPU on {sum(v is True for v in comparisons.values())} of "
              f"{len(comparisons)} volume/dtype cases"
              + (f" (differ: {', '.join(failed)})" if failed else "")
              + f"; face-like frame: kernels {face['kernels_p50_ms']:.3f} ms (count "
              f"{face['count']['p50_ms']:.3f}, scan {face['scan']['p50_ms']:.3f}, emit "
              f"{face['emit']['p50_ms']:.3f}), whole call {face['call_wall']['p50_ms']:.3f}"
              f" ms wall; mesh ops {mesh_ops['transform']['p50_ms']:.3f} + "
              f"{mesh_ops['colors']['p50_ms']:.3f} ms")
    if tiny:
        detail += " (Numba CUDA simulator: tiny volumes, timings meaningless)"
    return {"status": "fail" if failed else "pass", "detail": detail,
            "comparisons": comparisons, "timing": timing, "mesh_ops": mesh_ops,
            "goals_ms": GOAL_MS, "shape": list(shape), "simulator": tiny}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from vrn.atomic import write_text_atomic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = check_marching_cubes()
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"{'marching_cubes':<26} {result['status']:<5} {result['detail']}")
    gpu = "no-gpu"
    try:
        from numba import cuda

        if cuda.is_available():
            name = cuda.get_current_device().name
            gpu = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # the name is only for the file name
        pass
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stamp}-gpu-check-kernels-{slug}.json"
    system = {"python": platform.python_version(), "gpu": gpu}
    write_text_atomic(path, json.dumps({"system": system, "checks": {"marching_cubes": result}},
                                       indent=2, default=str) + "\n")
    print(f"results: {path}")
    return 0 if result["status"] != "fail" else 1


if __name__ == "__main__":
    sys.exit(main())
