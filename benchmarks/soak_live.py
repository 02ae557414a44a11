"""Memory soak of ``vrn-live --headless``: does its resident memory stay flat over a long
run? ``python benchmarks/soak_live.py [--frames 3000] [--source 0|VIDEO]
[--backend onnxruntime] [--modes plain,record] [--json out.json] [--plot out.png]``.

Each mode runs ``python -m vrn.cli.live --headless --max-frames N`` in its own process:
``plain``, and ``record`` with ``--record`` and ``--save-meshes`` into a temporary folder
(deleted afterwards). The process's resident memory (``VmRSS`` in ``/proc/<pid>/status``)
is sampled every ``--interval`` seconds. Warm-up (loading the model and the first 10% of
the frames, as the headless stats lines report them) is dropped; the rest is cut into
``--window``-second windows and the median of each window is taken. A mode is **flat**
when (max window median - min window median) / min window median <= 5%.

Without ``--source`` the clip is :func:`vrn.bench.video.moving_face_video` (the bundled
sample photo turned and moved a little in every frame), N frames long, written to a
temporary folder.
Written: the JSON (default ``benchmarks/results/<date>-<machine>-soak.json``) with every
sample, and a PNG beside it of memory against time for each mode (matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vrn.atomic import atomic_path, write_text_atomic
from vrn.bench.system import load_average, machine_name, system_info
from vrn.bench.video import moving_face_video

MODES = ("plain", "record")
WARMUP_FRACTION = 0.10
FLAT_TOLERANCE = 0.05
_PROGRESS = re.compile(r"^\[vrn-live\] frame (\d+) \|")
_SUMMARY = re.compile(r"^\[vrn-live\] (\d+) frames \(.*?: ([\d.]+) FPS")


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (``VmRSS``), ``None`` once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_mode(mode: str, source: str, frames: int, backend: str, weights: str | None,
             interval_s: float, scratch: Path) -> dict:
    """Run ``vrn-live`` once and sample its memory; returns the raw run."""
    command = [sys.executable, "-m", "vrn.cli.live", "--source", source, "--headless",
               "--max-frames", str(frames), "--backend", backend, "--stats-interval", "1"]
    if weights:
        command += ["--weights", weights]
    if mode == "record":
        command += ["--record", str(scratch / "soak.mp4"),
                    "--save-meshes", str(scratch / "meshes")]
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples = []
    while proc.poll() is None:
        rss = rss_mib(proc.pid)
        if rss is not None:
            samples.append([round(time.perf_counter() - start, 2), round(rss, 1)])
        time.sleep(interval_s)
    reader.join(timeout=5.0)
    progress = [(t, int(m.group(1))) for t, line in lines if (m := _PROGRESS.match(line))]
    summary = [(t, int(m.group(1)), float(m.group(2)))
               for t, line in lines if (m := _SUMMARY.match(line))]
    return {"command": command[1:], "returncode": proc.returncode,
            "wall_s": round(time.perf_counter() - start, 2), "samples": samples,
            "progress": [[round(t, 2), n] for t, n in progress],
            "frames": summary[0][1] if summary else None,
            "fps": summary[0][2] if summary else None,
            "loop_end_s": round(summary[0][0], 2) if summary else None,
            "output_tail": [line for _, line in lines[-15:]]}


def analyse(run: dict, frames: int, window_s: float) -> dict:
    """Warm-up cut, window medians, spread and verdict of one run (added to ``run``)."""
    samples = run["samples"]
    end = run["loop_end_s"] or (samples[-1][0] if samples else 0.0)
    warm = next((t for t, n in run["progress"] if n >= WARMUP_FRACTION * frames), None)
    if warm is None:  # no stats lines: the first 10% of the sampled time
        first = samples[0][0] if samples else 0.0
        warm = first + WARMUP_FRACTION * (end - first)
    steady = [(t, r) for t, r in samples if warm <= t <= end]
    windows = []
    n = max(1, math.ceil((end - warm) / window_s))
    for k in range(n):
        lo, hi = warm + k * window_s, min(warm + (k + 1) * window_s, end)
        values = [r for t, r in steady if lo <= t < hi or (k == n - 1 and t == hi)]
        if values and (hi - lo >= window_s / 2 or not windows):  # a short tail is noise
            windows.append({"start_s": round(lo, 2), "end_s": round(hi, 2),
                            "median_mib": round(statistics.median(values), 1)})
    medians = [w["median_mib"] for w in windows]
    spread = (max(medians) - min(medians)) / min(medians) if medians else None
    run.update(warmup_end_s=round(warm, 2), windows=windows,
               peak_mib=max((r for _, r in samples), default=None),
               spread=round(spread, 4) if spread is not None else None,
               flat=spread is not None and spread <= FLAT_TOLERANCE)
    return run


def plot(doc: dict, path: Path) -> Path:
    """Memory against time, one line per mode, window medians as steps."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
    colors = plt.get_cmap("tab10").colors
    for k, (mode, run) in enumerate(doc["modes"].items()):
        c = colors[k % len(colors)]
        t, r = zip(*run["samples"]) if run["samples"] else ((), ())
        verdict = "flat" if run["flat"] else "NOT flat"
        spread = f"{100 * run['spread']:.1f}%" if run["spread"] is not None else "?"
        ax.plot(t, r, color=c, lw=0.8, alpha=0.6,
                label=f"{mode}: spread {spread} after warm-up ({verdict})")
        for w in run["windows"]:
            ax.hlines(w["median_mib"], w["start_s"], w["end_s"], color=c, lw=2.2)
        ax.axvline(run["warmup_end_s"], color=c, ls=":", lw=1)
    ax.set_xlabel("time since start (s); dotted: end of warm-up; thick: window medians")
    ax.set_ylabel("resident memory (MiB)")
    s = doc["settings"]
    ax.set_title(f"vrn-live --headless memory soak: {doc['machine']}, {doc['date']}, "
                 f"{s['frames']} frames, {s['backend']}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=3000)
    p.add_argument("--source", help="camera index or video file (default: a synthetic "
                                    "clip of the sample photo, --frames long)")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--weights", default=None, help="default: the package model")
    p.add_argument("--modes", default=",".join(MODES), help="plain, record or both")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    p.add_argument("--window", type=float, default=20.0, help="seconds per median window")
    p.add_argument("--json", metavar="PATH",
                   help="default: benchmarks/results/<date>-<machine>-soak.json")
    p.add_argument("--plot", metavar="PATH", help="default: the JSON path with .png")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")

    system = system_info()
    machine = machine_name(system)
    date = datetime.date.today().isoformat()
    results = Path(__file__).parent / "results"
    json_path = Path(args.json or results / f"{date}-{machine}-soak.json")
    plot_path = Path(args.plot) if args.plot else json_path.with_suffix(".png")
    doc = {"benchmark": "vrn-live --headless memory soak", "machine": machine, "date": date,
           "settings": {"frames": args.frames, "source": args.source or "synthetic",
                        "backend": args.backend, "weights": args.weights,
                        "interval_s": args.interval, "window_s": args.window,
                        "warmup_fraction": WARMUP_FRACTION,
                        "flat_tolerance": FLAT_TOLERANCE},
           "system": system, "modes": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="vrn-soak-") as tmp:
        source = args.source
        if source is None:
            source = str(moving_face_video(Path(tmp) / "soak.avi", frames=args.frames))
        for mode in modes:
            with tempfile.TemporaryDirectory(prefix=f"{mode}-", dir=tmp) as scratch:
                before = load_average()
                run = run_mode(mode, source, args.frames, args.backend, args.weights,
                               args.interval, Path(scratch))
                run["load_average_before"], run["load_average_after"] = before, load_average()
            doc["modes"][mode] = analyse(run, args.frames, args.window)
            medians = " ".join(f"{w['median_mib']:.0f}" for w in run["windows"])
            spread = f"{100 * run['spread']:.1f}%" if run["spread"] is not None else "?"
            print(f"{mode}: {run['frames']} frames at {run['fps']} FPS; window medians "
                  f"(MiB, {args.window:g} s each after warm-up): {medians}; spread {spread}: "
                  f"{'flat' if run['flat'] else 'NOT flat'} within 5%", flush=True)
            if run["returncode"] != 0:
                failed = True
                print(f"{mode}: vrn-live exited {run['returncode']}:\n  "
                      + "\n  ".join(run["output_tail"]), file=sys.stderr)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json_path, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {json_path}")
    try:
        print(f"wrote {plot(doc, plot_path)}")
    except ImportError:
        print("no plot: needs matplotlib (pip install vrn-edge[bench])", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
