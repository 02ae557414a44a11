"""Marching cubes on the CPU, side by side in one process:
``python benchmarks/bench_marching_cubes.py [--repeats 9] [--json out.json]``.

Runs ``vrn.kernels.marching_cubes`` (Numba, on all cores, and on one thread),
``skimage.measure.marching_cubes`` (``lorensen`` and the default ``lewiner``),
PyMCubes and VTK's ``vtkFlyingEdges3D`` (each only when it imports) on the same
``(D, H, W) = (200, 192, 192)`` float32 volumes: the default model's output for the
sample photo (``--no-network`` leaves it out), a VRN-shaped volume (a face slab in the
front part of the depth range, as the network makes it), a face-like volume filled from
a back plane, and the same with Gaussian noise. Each figure is the median wall time of
``--repeats`` runs after a warm-up run (which also compiles or loads our kernels); the
implementations take turns run by run, so that a change in the machine's load hits all
of them alike. Ratios are ``their time / our time``. The mesh sizes are printed beside
the times as a check that everyone meshed the same surface.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from vrn.bench.isosurface import (OURS, SKIMAGE_LORENSEN, available_implementations,
                                   face_like_volume, noisy_volume, vrn_shaped_volume)
from vrn.metrics import repeat, summarize

LEVEL = 0.5
OURS_ONE_THREAD = "vrn (numba cpu, 1 thread)"
GOAL_VS_LORENSEN = 8.0  # on the VRN-shaped volume
SCHEMA = "vrn-marching-cubes/2"


def _counting(run):
    """``run(volume, level) -> (vertices, faces)`` as ``volume -> (V, F)``."""
    def count(volume):
        vertices, faces = run(volume, LEVEL)
        return len(vertices), len(faces)

    return count


def time_runs(runners: dict, volume, repeats: int) -> dict:
    """Wall and process CPU milliseconds (medians) of ``repeats`` runs of each runner
    after a warm-up run each (which compiles our kernels), the runners taking turns.
    On a busy machine the CPU time of a single-threaded implementation is the steadier
    figure; for a multi-threaded one it adds up its threads."""
    timed = {name: repeat(partial(run, volume), runs=1) for name, run in runners.items()}
    for _ in range(repeats - 1):
        for name, run in runners.items():
            again = repeat(partial(run, volume), runs=1, warmup=0)
            timed[name].wall_ms += again.wall_ms
            timed[name].cpu_ms += again.cpu_ms
    out = {}
    for name, timing in timed.items():
        wall, sizes = timing.summary(), timing.result
        out[name] = {"median_ms": round(wall["p50"], 3), "min_ms": round(wall["min"], 3),
                     "cpu_ms": round(summarize(timing.cpu_ms)["p50"], 3), "runs": wall["n"],
                     "vertices": int(sizes[0]), "faces": int(sizes[1])}
    return out


def one_thread(run):
    """``run`` with our kernels on one thread (the threads are restored after)."""
    from vrn.kernels import _cpu

    def single(volume, level):
        before = _cpu._threads
        _cpu.set_threads(1)
        try:
            return run(volume, level)
        finally:
            _cpu.set_threads(before)

    return single


def network_volume():
    """The default model's output ``(D, H, W)`` float32 for the sample photo's face (on
    PyTorch, as ``vrn-bench``'s reference does)."""
    from vrn.runtime.backends import create_backend
    from vrn.runtime.pipeline import sample_face_crops

    crops, landmarks = sample_face_crops()
    return create_backend("torch", device="cpu").infer(crops[:1], landmarks[:1])[0]


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
                        "<date>-<machine>-marching-cubes.json in this folder")
    parser.add_argument("--no-agreement", action="store_true",
                        help="skip the triangle comparison with skimage")
    parser.add_argument("--no-network", action="store_true",
                        help="leave out the default model's output for the sample photo")
    args = parser.parse_args(argv)
    if args.threads:  # read by vrn.kernels at each call
        from vrn.kernels import _cpu

        _cpu.set_threads(args.threads)

    volumes = {}
    if not args.no_network:
        volumes["network output (default model, sample photo)"] = network_volume()
    volumes |= {"VRN-shaped": vrn_shaped_volume(), "face-like": face_like_volume(),
                "noisy": noisy_volume()}
    results: dict = {"schema": SCHEMA, "volumes": {}, "unavailable": {}}
    runners, results["unavailable"] = available_implementations()
    runners = {OURS: runners[OURS], OURS_ONE_THREAD: one_thread(runners[OURS]),
               **{name: run for name, run in runners.items() if name != OURS}}
    runners = {name: _counting(run) for name, run in runners.items()}
    for volume_name, volume in volumes.items():
        print(f"\n{volume_name} volume {volume.shape} float32, level {LEVEL}")
        print(f"  {'implementation':<26} {'median ms':>10} {'min ms':>9} {'cpu ms':>9} "
              f"{'x ours':>7} {'vertices':>9} {'faces':>9}")
        timings = time_runs(runners, volume, args.repeats)
        ours = timings[OURS]["median_ms"]
        for name, timing in timings.items():
            timing["ratio_to_ours"] = round(timing["median_ms"] / ours, 2)
            print(f"  {name:<26} {timing['median_ms']:>10.2f} {timing['min_ms']:>9.2f} "
                  f"{timing['cpu_ms']:>9.2f} {timing['ratio_to_ours']:>7.2f} "
                  f"{timing['vertices']:>9} {timing['faces']:>9}")
        entry = {"shape": list(volume.shape), "timings": timings}
        if not args.no_agreement and SKIMAGE_LORENSEN in runners:
            entry["agreement_with_skimage_lorensen"] = agreement = triangle_agreement(volume)
            print(f"  vs {SKIMAGE_LORENSEN}: same vertices within "
                  f"{agreement['max_vertex_distance']:.1e}, "
                  f"{100 * agreement['identical_triangles']:.1f}% identical triangles")
        results["volumes"][volume_name] = entry
    for name, reason in results["unavailable"].items():
        print(f"not run: {name} ({reason})")
    lorensen = results["volumes"]["VRN-shaped"]["timings"].get(SKIMAGE_LORENSEN)
    if lorensen is not None:
        value = lorensen["ratio_to_ours"]
        results["goal"] = {"name": f"ours vs {SKIMAGE_LORENSEN} on the VRN-shaped volume",
                           "target": GOAL_VS_LORENSEN, "value": value,
                           "met": value >= GOAL_VS_LORENSEN}
        verdict = "met" if results["goal"]["met"] else "NOT met"
        print(f"\ngoal: ours {value:.1f}x faster than {SKIMAGE_LORENSEN} on the VRN-shaped "
              f"volume (target {GOAL_VS_LORENSEN:g}x): {verdict}")
    from vrn.bench.system import machine_name
    from vrn.bench.system import system_info as bench_system

    results["system"] = system_info()
    results["machine"] = machine_name(bench_system())
    results["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["settings"] = {"repeats": args.repeats, "level": LEVEL}
    print(f"our threads {results['system']['vrn_kernel_threads']}, load average "
          f"{', '.join(f'{v:.1f}' for v in results['system']['load_average'])}")
    if args.json:
        from vrn.atomic import write_text_atomic

        path = args.json
        if path.is_dir():
            path = path / f"{results['date'][:10]}-{results['machine']}-marching-cubes.json"
        write_text_atomic(path, json.dumps(results, indent=2) + "\n")
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
