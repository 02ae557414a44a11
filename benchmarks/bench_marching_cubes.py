"""Marching cubes on the CPU, side by side in one process:
``python benchmarks/bench_marching_cubes.py [--repeats 9] [--json out.json]``.

Runs ``vrn.kernels.marching_cubes`` (Numba, slabs of z-planes on all cores),
``skimage.measure.marching_cubes`` (``lorensen`` and the default ``lewiner``),
PyMCubes and VTK's ``vtkFlyingEdges3D`` (each only when it imports) on the same
``(D, H, W) = (200, 192, 192)`` float32 volumes: a smooth face-like occupancy volume and
the same with Gaussian noise. Each figure is the median wall time of ``--repeats`` runs
after a warm-up run (which also compiles or loads our kernels). Ratios are
``their time / our time``. The mesh sizes are printed beside the times as a check that
everyone meshed the same surface.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

SHAPE = (200, 192, 192)
LEVEL = 0.5


def face_like_volume(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A smooth stand-in for a VRN output: ``(D, H, W)`` float32 occupancy in [0, 1],
    1 between a back plane and a face-shaped front surface (head ellipse, nose, brows,
    lips), with sigmoid edges about 1.5 voxels wide."""
    depth, height, width = shape
    d = np.arange(depth, dtype=np.float32)[:, None, None]
    y = (np.arange(height, dtype=np.float32)[:, None] - height * 0.52) / (height * 0.42)
    x = (np.arange(width, dtype=np.float32)[None, :] - width * 0.5) / (width * 0.33)
    r2 = x ** 2 + y ** 2
    front = depth * (0.3 + 0.35 * np.sqrt(np.clip(1 - r2, 0, 1)))
    front += depth * 0.1 * np.exp(-(x ** 2 / 0.02 + (y - 0.05) ** 2 / 0.06))  # nose
    front += depth * 0.02 * np.exp(-((np.abs(x) - 0.35) ** 2 + (y + 0.3) ** 2) / 0.01)  # brows
    front -= depth * 0.03 * np.exp(-((np.abs(x) - 0.35) ** 2 + (y + 0.15) ** 2) / 0.008)  # eyes
    front += depth * 0.015 * np.exp(-(x ** 2 / 0.03 + (y - 0.45) ** 2 / 0.003))  # lips
    back = depth * 0.2

    def sigmoid(t):
        return 1 / (1 + np.exp(-np.clip(t, -50, 50)))

    inside = sigmoid((1 - np.sqrt(r2)) / 0.01)
    volume = sigmoid((front[None] - d) / 1.5) * sigmoid((d - back) / 1.5) * inside[None]
    return volume.astype(np.float32)


def noisy_volume(shape: tuple[int, int, int] = SHAPE, sigma: float = 0.1,
                 seed: int = 0) -> np.ndarray:
    """:func:`face_like_volume` plus Gaussian noise, clipped to [0, 1]."""
    noise = np.random.default_rng(seed).normal(0, sigma, shape).astype(np.float32)
    return np.clip(face_like_volume(shape) + noise, 0, 1).astype(np.float32)


def _ours():
    from vrn.kernels import marching_cubes

    def run(volume):
        vertices, faces = marching_cubes(volume, LEVEL)
        return len(vertices), len(faces)

    return run


def _skimage(method):
    from skimage.measure import marching_cubes

    def run(volume):
        vertices, faces, _, _ = marching_cubes(volume, LEVEL, method=method)
        return len(vertices), len(faces)

    return run


def _pymcubes():
    import mcubes

    def run(volume):
        vertices, faces = mcubes.marching_cubes(volume, LEVEL)
        return len(vertices), len(faces)

    return run


def _vtk_flying_edges():
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkFiltersCore import vtkFlyingEdges3D

    def run(volume):
        image = vtkImageData()
        image.SetDimensions(volume.shape[2], volume.shape[1], volume.shape[0])
        image.GetPointData().SetScalars(numpy_to_vtk(volume.ravel(), deep=False))
        flying_edges = vtkFlyingEdges3D()
        flying_edges.SetInputData(image)
        flying_edges.SetValue(0, LEVEL)
        flying_edges.ComputeNormalsOff()
        flying_edges.ComputeGradientsOff()
        flying_edges.ComputeScalarsOff()
        flying_edges.Update()
        output = flying_edges.GetOutput()
        return output.GetNumberOfPoints(), output.GetNumberOfPolys()

    return run


IMPLEMENTATIONS = {
    "vrn (numba cpu)": _ours,
    "skimage lorensen": lambda: _skimage("lorensen"),
    "skimage lewiner": lambda: _skimage("lewiner"),
    "pymcubes": _pymcubes,
    "vtk flying edges": _vtk_flying_edges,
}
OURS = "vrn (numba cpu)"


def time_runs(run, volume, repeats: int) -> dict:
    """Wall and process CPU milliseconds (medians) of ``repeats`` runs after a warm-up.
    On a busy machine the CPU time of a single-threaded implementation is the steadier
    figure; for a multi-threaded one it adds up its threads."""
    sizes = run(volume)  # warm-up: compiles or loads cached kernels
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run(volume)
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return {"median_ms": round(statistics.median(wall), 3), "min_ms": round(min(wall), 3),
            "cpu_ms": round(statistics.median(cpu), 3), "runs": len(wall),
            "vertices": int(sizes[0]), "faces": int(sizes[1])}


def triangle_agreement(volume) -> dict:
    """How our mesh compares with skimage's lorensen mesh: vertex count, face count and
    the share of identical triangles (the rest are other splits of the same polygons;
    see ``tests/test_marching_cubes.py``)."""
    from scipy.spatial import cKDTree
    from skimage.measure import marching_cubes as sk_marching_cubes

    from vrn.kernels import marching_cubes

    vertices, faces = marching_cubes(volume, LEVEL)
    sk_vertices, sk_faces, _, _ = sk_marching_cubes(volume, LEVEL, method="lorensen")
    distance, index = cKDTree(vertices).query(sk_vertices[:, ::-1])
    ours = {frozenset(f) for f in faces.tolist()}
    theirs = {frozenset(f) for f in index[sk_faces].tolist()}
    return {"vertices": [len(vertices), len(sk_vertices)],
            "faces": [len(faces), len(sk_faces)],
            "max_vertex_distance": float(distance.max()),
            "identical_triangles": round(len(ours & theirs) / max(len(theirs), 1), 4)}


def system_info() -> dict:
    import numba

    from vrn.kernels._cpu import cpu_threads

    info = {"python": platform.python_version(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "numba": numba.__version__, "vrn_kernel_threads": cpu_threads(),
            "load_average": os.getloadavg()}
    for module in ("skimage", "mcubes", "vtk"):
        try:
            info[module] = getattr(__import__(module), "__version__", "unknown")
        except ImportError:
            info[module] = None
    try:
        from vtkmodules.vtkCommonCore import vtkSMPTools, vtkVersion

        info["vtk"] = vtkVersion.GetVTKVersion()
        info["vtk_smp_backend"] = vtkSMPTools.GetBackend()
        info["vtk_threads"] = vtkSMPTools.GetEstimatedNumberOfThreads()
    except ImportError:
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="timed runs per figure")
    parser.add_argument("--threads", type=int,
                        help="worker threads of our kernels (default: NUMBA_NUM_THREADS, "
                             "else all cores)")
    parser.add_argument("--json", type=Path, help="write the results to this file, or to "
                        "<date>-marching-cubes.json in this folder")
    parser.add_argument("--no-agreement", action="store_true",
                        help="skip the triangle comparison with skimage")
    args = parser.parse_args(argv)
    if args.threads:  # read by vrn.kernels at each call, through numba.config
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
        if "numba" in sys.modules:
            sys.modules["numba"].config.reload_config()

    volumes = {"face-like": face_like_volume(), "noisy": noisy_volume()}
    results: dict = {"volumes": {}, "unavailable": {}}
    runners = {}
    for name, factory in IMPLEMENTATIONS.items():
        try:
            runners[name] = factory()
        except ImportError as error:
            results["unavailable"][name] = str(error)
    for volume_name, volume in volumes.items():
        print(f"\n{volume_name} volume {volume.shape} float32, level {LEVEL}")
        print(f"  {'implementation':<18} {'median ms':>10} {'min ms':>9} {'cpu ms':>9} "
              f"{'x ours':>7} {'vertices':>9} {'faces':>9}")
        timings = {name: time_runs(run, volume, args.repeats) for name, run in runners.items()}
        ours = timings[OURS]["median_ms"]
        for name, timing in timings.items():
            timing["ratio_to_ours"] = round(timing["median_ms"] / ours, 2)
            print(f"  {name:<18} {timing['median_ms']:>10.2f} {timing['min_ms']:>9.2f} "
                  f"{timing['cpu_ms']:>9.2f} {timing['ratio_to_ours']:>7.2f} "
                  f"{timing['vertices']:>9} {timing['faces']:>9}")
        entry = {"shape": list(volume.shape), "timings": timings}
        if not args.no_agreement and "skimage lorensen" in runners:
            entry["agreement_with_skimage_lorensen"] = agreement = triangle_agreement(volume)
            print(f"  vs skimage lorensen: same vertices within "
                  f"{agreement['max_vertex_distance']:.1e}, "
                  f"{100 * agreement['identical_triangles']:.1f}% identical triangles")
        results["volumes"][volume_name] = entry
    for name, reason in results["unavailable"].items():
        print(f"not run: {name} ({reason})")
    results["system"] = system_info()
    results["settings"] = {"repeats": args.repeats, "level": LEVEL}
    print(f"\nour threads {results['system']['vrn_kernel_threads']}, load average "
          f"{', '.join(f'{v:.1f}' for v in results['system']['load_average'])}")
    if args.json:
        from vrn.atomic import write_text_atomic

        path = args.json
        if path.is_dir():
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
            path = path / f"{stamp}-marching-cubes.json"
        write_text_atomic(path, json.dumps(results, indent=2) + "\n")
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
