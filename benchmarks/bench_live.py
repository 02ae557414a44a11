"""``vrn-live --headless`` frame rate, every backend side by side in one process:
``python benchmarks/bench_live.py [--frames 120] [--backends onnxruntime,torch]
[--weights PATH] [--json out.json]``.

Each backend runs the live loop (capture, tracker with detection every 5 frames,
crop, network, marching cubes, colours; :func:`vrn.runtime.live.run_live`, exactly what
``vrn-live --headless`` runs) over the same clip: the bundled sample photo turned and
moved in every frame (:func:`vrn.bench.video.moving_face_video`). Reported: frames per
second over the whole clip, per-stage p50 and p90, the load average before and after
(a busy machine gives lower figures), and the system block of ``vrn-bench``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from vrn.atomic import write_text_atomic
from vrn.bench.system import load_average, machine_name, system_info
from vrn.bench.video import moving_face_video


def measure(backend: str, video: Path, weights: str | None) -> dict:
    from vrn.runtime.capture import FrameGrabber
    from vrn.runtime.live import run_live
    from vrn.runtime.pipeline import Reconstructor

    rec = Reconstructor(weights, backend=backend)
    rec.warmup()
    before = load_average()
    summary = run_live(rec, FrameGrabber(video), headless=True, out=io.StringIO())
    return {"backend": rec.backend.describe(), "fps": summary["fps"],
            "frames": summary["frames"], "frames_with_faces": summary["frames_with_faces"],
            "stages_ms": {k: {"p50": v["p50"], "p90": v["p90"]}
                          for k, v in summary["stages_ms"].items()},
            "load_average_before": before, "load_average_after": load_average()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--backends", default="onnxruntime,torch")
    p.add_argument("--weights", default=None, help="default: the package model")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)

    system = system_info()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        video = moving_face_video(Path(tmp) / "moving_face.avi", frames=args.frames)
        for backend in args.backends.split(","):
            r = measure(backend.strip(), video, args.weights)
            results.append(r)
            stages = " ".join(f"{k} {v['p50']:.1f}" for k, v in r["stages_ms"].items())
            print(f"{r['backend']}: {r['fps']:.1f} FPS ({r['frames_with_faces']}/{r['frames']} "
                  f"frames with a face); p50 ms: {stages}; load "
                  f"{r['load_average_before']} -> {r['load_average_after']}")
    if args.json:
        doc = {"benchmark": "vrn-live --headless", "machine": machine_name(system),
               "clip": {"frames": args.frames, "size": 512}, "system": system,
               "results": results}
        write_text_atomic(args.json, json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
