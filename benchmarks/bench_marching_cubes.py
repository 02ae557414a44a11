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
import sys
from datetime import datetime, timezone
from pathlib import Path

from vrn.bench.isosurface import (OURS, available_implementations, face_like_volume,
                                   noisy_volume)
from vrn.metrics import repeat, summarize

LEVEL = 0.5


def _counting(run):
    """``run(volume, level) -> (vertices, faces)`` as ``volume -> (V, F)``."""
    def count(volume):
        vertices, faces = run(volume, LEVEL)
        return len(vertices), len(faces)

    return count


def time_runs(run, volume, repeats: int) -> dict:
    """Wall and process CPU milliseconds (medians) of ``repeats`` runs after a warm-up.
    On a busy machine the CPU time of a single-threaded implementation is the steadier
    figure; for a multi-threaded one it adds up its threads."""
    timed = repeat(lambda: run(volume), runs=repeats)  # the warm-up compiles our kernels
    wall, sizes = timed.summary(), timed.result
    return {"median_ms": round(wall["p50"], 3), "min_ms": round(wall["min"], 3),
            "cpu_ms": round(summarize(timed.cpu_ms)["p50"], 3), "runs": wall["n"],
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
    runners, results["unavailable"] = available_implementations()
    runners = {name: _counting(run) for name, run in runners.items()}
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
