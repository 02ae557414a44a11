"""``vrn-live --headless`` frame rate and latency, every backend side by side in one
process: ``python benchmarks/bench_live.py [--frames 120] [--rounds 3]
[--backends onnxruntime,torch] [--detect-every 5[,10,...]] [--thread-options]
[--weights PATH] [--json out.json]``.

Each backend runs the live loop (capture, tracker with detection every 5 frames and the
landmarks followed in between, crop, network, marching cubes, colours;
:func:`vrn.runtime.live.run_live`, exactly what ``vrn-live --headless`` runs) over the
same clip: the bundled sample photo turned and moved in every frame
(:func:`vrn.bench.video.moving_face_video`), pipelined (the network of frame n + 1
beside the mesh of frame n, the default on the CPU) and sequential, under the process's
thread budget (:mod:`vrn.runtime.threads`, as ``vrn-live`` sets it). The
configurations take turns, round after round, so that a change in the machine's load
hits all of them alike. Reported per configuration: frames per second, latency from
capture to mesh and per-stage p50 and p90 (each the median over the rounds), the load
average before and after, and the system block of ``vrn-bench``.

``--detect-every`` with several values runs every configuration at each of these
detection intervals, taking turns with the rest.

``--thread-options`` adds ONNX Runtime runs under other thread budgets (ONNX Runtime's
threads spinning, OpenCV on one thread, the network on one thread, every core for the
marching cubes beside the network), also taking turns with the rest: how the defaults
were chosen.

Latency for a video file counts the time a frame waits in the capture slot while the
frame before it is processed (a file is read as fast as it is consumed); a camera's
frames wait less, as the grabber keeps only the newest.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from vrn.runtime.threads import (ThreadBudget, configure_threads, default_budget,
                                 prefer_passive_openmp)

SCHEMA = "vrn-live-bench/2"


@dataclass
class Config:
    """One configuration: a backend, pipelined or not, under a thread budget."""

    name: str
    backend: str
    pipelined: bool
    budget: ThreadBudget
    detect_every: int = 5
    reconstructor: object = None
    summaries: list = field(default_factory=list)
    loads: list = field(default_factory=list)


def configurations(backends: list[str], thread_options: bool) -> list[Config]:
    """The configurations to measure: per backend pipelined and sequential under the
    default budget; with ``thread_options``, ONNX Runtime pipelined under the others."""
    base = default_budget()
    configs = []
    for backend in backends:
        configs += [Config(f"{backend} pipelined", backend, True, base),
                    Config(f"{backend} sequential", backend, False, base)]
    if thread_options and "onnxruntime" in backends:
        cores = base.cores
        for label, budget in (
                ("ORT threads spinning", base.replace(onnxruntime_spinning=True)),
                ("OpenCV on 1 thread", base.replace(opencv=1)),
                ("network on 1 thread", base.replace(onnxruntime=1)),
                (f"marching cubes on {cores} threads beside the network",
                 base.replace(kernels_beside_network=cores))):
            if budget != base:
                configs.append(Config(f"onnxruntime pipelined, {label}", "onnxruntime",
                                      True, budget))
    return configs


def build(config: Config, weights: str | None) -> None:
    """The configuration's reconstructor, made under its budget (ONNX Runtime sessions
    take their threads and spinning when they are made)."""
    from vrn.runtime.pipeline import Reconstructor

    configure_threads(config.budget)
    config.reconstructor = Reconstructor(weights, backend=config.backend)
    config.reconstructor.warmup()


def run_once(config: Config, video: Path) -> None:
    from vrn.bench.system import load_average
    from vrn.runtime.capture import FrameGrabber
    from vrn.runtime.live import run_live

    configure_threads(config.budget)
    before = load_average()
    config.summaries.append(run_live(config.reconstructor, FrameGrabber(video),
                                     headless=True, out=io.StringIO(),
                                     pipelined=config.pipelined,
                                     detect_every=config.detect_every))
    config.loads.append([before, load_average()])


def result(config: Config) -> dict:
    """The configuration's figures: medians over its rounds of each round's FPS and of
    each stage's p50 and p90."""
    stages = {}
    for stage in config.summaries[0]["stages_ms"]:
        rounds = [s["stages_ms"][stage] for s in config.summaries if stage in s["stages_ms"]]
        stages[stage] = {q: round(statistics.median(r[q] for r in rounds), 3)
                         for q in ("p50", "p90")}
    fps = [s["fps"] for s in config.summaries]
    return {"name": config.name, "backend": config.reconstructor.backend.describe(),
            "pipelined": config.pipelined, "detect_every": config.detect_every,
            "budget": config.budget.as_dict(),
            "fps": round(statistics.median(fps), 2), "fps_rounds": fps,
            "latency_ms": stages.get("latency"),
            "frames": config.summaries[0]["frames"],
            "frames_with_faces": config.summaries[0]["frames_with_faces"],
            "stages_ms": {k: v for k, v in stages.items() if k != "latency"},
            "load_average": config.loads}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--rounds", type=int, default=3, help="runs of the clip per configuration")
    p.add_argument("--backends", default="onnxruntime,torch")
    p.add_argument("--detect-every", default="5", metavar="K[,K...]",
                   help="detection intervals to compare (default 5, vrn-live's)")
    p.add_argument("--thread-options", action="store_true",
                   help="also ONNX Runtime under other thread budgets")
    p.add_argument("--weights", default=None, help="default: the package model")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    prefer_passive_openmp()  # as vrn-live does, before torch loads

    from vrn.bench.system import machine_name, system_info
    from vrn.bench.video import moving_face_video

    configs = configurations([b.strip() for b in args.backends.split(",")],
                             args.thread_options)
    intervals = [int(k) for k in args.detect_every.split(",")]
    configs = [dataclasses.replace(
        c, name=f"{c.name}, detect every {k}" if len(intervals) > 1 else c.name,
        detect_every=k, summaries=[], loads=[]) for c in configs for k in intervals]
    for config in configs:
        build(config, args.weights)
    system = system_info()
    with tempfile.TemporaryDirectory() as tmp:
        video = moving_face_video(Path(tmp) / "moving_face.avi", frames=args.frames)
        for _ in range(args.rounds):
            for config in configs:
                run_once(config, video)
    results = [result(c) for c in configs]
    for r in results:
        stages = " ".join(f"{k} {v['p50']:.1f}" for k, v in r["stages_ms"].items())
        latency = r["latency_ms"] or {"p50": 0.0, "p90": 0.0}
        print(f"{r['name']}: {r['fps']:.1f} FPS (rounds {r['fps_rounds']}), latency p50 "
              f"{latency['p50']:.0f} ms p90 {latency['p90']:.0f} ms "
              f"({r['frames_with_faces']}/{r['frames']} frames with a face); p50 ms: "
              f"{stages}")
    print(f"backends: {'; '.join(sorted({r['backend'] for r in results}))}")
    if args.json:
        from vrn.atomic import write_text_atomic

        doc = {"schema": SCHEMA, "benchmark": "vrn-live --headless",
               "machine": machine_name(system),
               "clip": {"frames": args.frames, "size": 512, "rounds": args.rounds},
               "system": system, "results": results}
        write_text_atomic(args.json, json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
