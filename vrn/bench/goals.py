"""What a ``vrn-bench`` report's figures mean: speed-ups against PyTorch eager fp32,
which runs pass the IoU check, and the project's performance goals with whether each
is met."""

from __future__ import annotations

from ..metrics import MIN_IOU, ratio
from .plan import REFERENCE_PRECISION

# Speed-up ratios, and per-frame milliseconds on an H100-class GPU.
GOAL_ORT_VS_TORCH = 1.25
GOAL_FASTEST_CPU = 2.0
GOAL_MC_VS_SKIMAGE = 8.0  # against skimage's lorensen method, the same table as ours
GOAL_TORCH_FP16_MS = 5.0
GOAL_TRT_FP16_MS = 2.0


def find_run(runs: list[dict], backend: str, device: str, precision: str,
             batch: int) -> dict | None:
    """The run of that configuration and batch in ``runs``, or ``None``."""
    for run in runs:
        if (run["backend"], run["device"], run["precision"], run["batch"]) == \
                (backend, device, precision, batch):
            return run
    return None


def speedups(report: dict) -> list[dict]:
    """Each run against PyTorch eager fp32 on the same device and batch, as ratios of
    medians (``reference p50 / run p50``; medians shrug off the spikes a shared machine
    adds): the network alone (``inference``), the network inside the pipeline
    (``inference_in_pipeline``) and the whole frame (``end_to_end``)."""
    out = []
    for run in report["runs"]:
        if run["reference"]:
            continue
        ref = find_run(report["runs"], "torch", run["device"], REFERENCE_PRECISION,
                       run["batch"])
        if ref is None:
            continue
        out.append({"label": run["label"], "reference": ref["label"],
                    "inference": ratio(ref["infer_only"]["p50"], run["infer_only"]["p50"]),
                    "inference_in_pipeline": ratio(ref["stages"]["infer"]["p50"],
                                                   run["stages"]["infer"]["p50"]),
                    "end_to_end": ratio(ref["end_to_end"]["p50"], run["end_to_end"]["p50"])})
    return out


def passes_validation(report: dict, run: dict) -> bool:
    """Whether ``run``'s configuration reached the IoU threshold against fp32 (the
    PyTorch fp32 references pass by definition)."""
    if run["reference"]:
        return True
    for entry in report["validation"]:
        if (entry["backend"], entry["device"], entry["precision"]) == \
                (run["backend"], run["device"], run["precision"]):
            return entry["passed"]
    return False


def _goal(name, target, value, *, higher_is_better=True, note="") -> dict:
    met = None if value is None else (value >= target if higher_is_better else value < target)
    return {"name": name, "target": target, "value": value, "met": met,
            "comparison": ">=" if higher_is_better else "<", "note": note}


def _cpu_goals(report: dict, full: bool) -> list[dict]:
    """ONNX Runtime vs PyTorch, and the fastest validated CPU configuration."""
    runs, model = report["runs"], report["model"]
    torch_cpu = find_run(runs, "torch", "cpu", REFERENCE_PRECISION, 1)
    ort_cpu = find_run(runs, "onnxruntime", "cpu", "fp32", 1)
    value = (ratio(torch_cpu["infer_only"]["p50"], ort_cpu["infer_only"]["p50"])
             if torch_cpu and ort_cpu else None)
    out = [_goal("ONNX Runtime CPU fp32 vs PyTorch eager CPU fp32, network alone, batch 1 "
                 "(medians)", GOAL_ORT_VS_TORCH, value,
                 note="" if full else "the goal is set for the full model; this run measured "
                 f"{model['architecture']} with {model['parameters']:,} parameters")]
    cpu_runs = [r for r in runs if r["device"] == "cpu" and r["batch"] == 1
                and passes_validation(report, r)]
    name = (f"fastest CPU configuration (IoU >= {MIN_IOU}) vs PyTorch eager CPU fp32, "
            "network alone, batch 1 (medians)")
    if torch_cpu and cpu_runs:
        best = min(cpu_runs, key=lambda r: r["infer_only"]["p50"])
        out.append(_goal(name, GOAL_FASTEST_CPU,
                         ratio(torch_cpu["infer_only"]["p50"], best["infer_only"]["p50"]),
                         note=f"fastest: {best['label']}"))
    else:
        out.append(_goal(name, GOAL_FASTEST_CPU, None))
    return out


def goals(report: dict) -> list[dict]:
    """The project's goals, each with the measured value (``None`` when not measured
    here) and whether it is met."""
    from .isosurface import SKIMAGE_LORENSEN
    from .models import full_config

    out = _cpu_goals(report, full=report["model"]["config"] == full_config())
    iso = report["references"].get("isosurface", {})
    for entry in iso.get("volumes", []):
        triangles = entry["implementations"][iso["ours"]]["triangles"]
        out.append(_goal(f"our CPU marching cubes vs {SKIMAGE_LORENSEN} ({entry['volume']})",
                         GOAL_MC_VS_SKIMAGE, entry["slower_than_ours"].get(SKIMAGE_LORENSEN),
                         note=f"{SKIMAGE_LORENSEN}: the classic table, as ours; "
                              f"{triangles:,} triangles"))
    for backend, target in (("torch", GOAL_TORCH_FP16_MS), ("tensorrt", GOAL_TRT_FP16_MS)):
        run = find_run(report["runs"], backend, "cuda", "fp16", 1)
        out.append(_goal(f"{backend} CUDA fp16 crop-to-mesh-on-host latency, batch 1 (ms)",
                         target, run["crop_to_mesh"]["mean"] if run else None,
                         higher_is_better=False,
                         note="H100-class GPU goal"
                              + ("" if run else "; not measured: no such run here")))
    return out
