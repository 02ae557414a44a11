"""Sections of ``benchmarks/RESULTS.md`` for the result files of the other benchmark
scripts: ``benchmarks/bench_live.py`` (the live loop's frame rate and latency) and
``benchmarks/bench_marching_cubes.py`` (our marching cubes beside the references).

Every number comes from the files; none is typed here. Files of other tools (or of
older versions of these scripts with another layout) give no section and are only
listed by :func:`vrn.bench.report.write_results_md`.
"""

from __future__ import annotations

from .markdown import fmt_ms, table

LIVE_SCHEMA = "vrn-live-bench/2"
MARCHING_CUBES_SCHEMA = "vrn-marching-cubes/2"
LIVE_STAGES = ("landmarks", "crop", "infer", "isosurface", "colour")


def _load(pairs: list) -> str:
    """The 1-minute load averages before and after each round, as ``a-b``."""
    values = [v[0] for pair in pairs for v in pair if v]
    return f"{min(values):.1f}-{max(values):.1f}" if values else "-"


def live_section(name: str, doc: dict, h: str = "##") -> list[str]:
    """The section of a ``bench_live.py`` file: one row per configuration."""
    system = doc.get("system", {})
    date = (system.get("date") or "")[:10]
    clip = doc["clip"]
    rows = []
    for r in doc["results"]:
        latency = r.get("latency_ms") or {}
        stages = r["stages_ms"]
        rows.append([r["name"], f"{r['fps']:.1f}", " / ".join(f"{x:.1f}" for x in r["fps_rounds"]),
                     fmt_ms(latency.get("p50")), fmt_ms(latency.get("p90"))]
                    + [fmt_ms(stages.get(s, {}).get("p50")) for s in LIVE_STAGES]
                    + [_load(r.get("load_average", []))])
    backends = sorted({r["backend"] for r in doc["results"]})
    threads = system.get("threads", {})
    return [f"{h} vrn-live --headless: {doc['machine']}, {date}", "",
            f"`benchmarks/bench_live.py`, file [{name}](results/{name}): the live loop over "
            f"a {clip['frames']}-frame clip of the sample photo turned and moved "
            f"({clip['size']}x{clip['size']}), {clip['rounds']} rounds, the configurations "
            "taking turns. FPS: the median over the rounds (each round's figure after it). "
            "Latency: capture to mesh (for a video file, including the wait in the capture "
            "slot while the frame before is processed). Stage times: p50 ms, medians over "
            "the rounds. Load: the 1-minute load average over the rounds (2 cores: above "
            "about 0.5, other processes took CPU time).", ""] + table(
        ["configuration", "FPS", "rounds", "latency p50", "latency p90"]
        + [f"{s} p50" for s in LIVE_STAGES] + ["load"], rows) + [
        f"Backends: {'; '.join(backends)}. Threads at the start: "
        + ", ".join(f"{k} {v}" for k, v in threads.items()) + ".", ""]


def marching_cubes_section(name: str, doc: dict, h: str = "##") -> list[str]:
    """The section of a ``bench_marching_cubes.py`` file: every implementation on
    every volume."""
    system = doc["system"]
    rows = []
    for volume, entry in doc["volumes"].items():
        for impl, t in entry["timings"].items():
            rows.append([volume, impl, fmt_ms(t["median_ms"]), fmt_ms(t["min_ms"]),
                         fmt_ms(t["cpu_ms"]), f"{t['faces']:,}", f"{t['ratio_to_ours']:.2f}x"])
    out = [f"{h} Marching cubes: {doc['machine']}, {doc['date'][:10]}", "",
           f"`benchmarks/bench_marching_cubes.py`, file [{name}](results/{name}): "
           f"{doc['settings']['repeats']} runs each after a warm-up, the implementations "
           "taking turns; wall ms (median, min) and process CPU ms (median); `x ours`: how "
           "many times longer than ours (all cores) the implementation takes. Load average "
           f"at the end: {', '.join(f'{v:.1f}' for v in system['load_average'])}.", ""]
    out += table(["volume", "implementation", "median", "min", "cpu", "triangles", "x ours"],
                  rows)
    goal = doc.get("goal")
    if goal:
        out += [f"Goal: {goal['name']} >= {goal['target']:g}x: {goal['value']:.1f}x, "
                f"{'met' if goal['met'] else '**not met**'}.", ""]
    if doc.get("unavailable"):
        out += ["Not run: " + "; ".join(f"{k}: {v}" for k, v in doc["unavailable"].items())
                + ".", ""]
    return out


def script_section(name: str, doc) -> list[str] | None:
    """The section for one file of the other scripts, or ``None`` for a file this
    module does not render."""
    if not isinstance(doc, dict):
        return None
    if doc.get("schema") == LIVE_SCHEMA:
        return live_section(name, doc)
    if doc.get("schema") == MARCHING_CUBES_SCHEMA:
        return marching_cubes_section(name, doc)
    return None
