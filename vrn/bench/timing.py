"""How ``vrn-bench`` times: the pipeline frame by frame, the networks alone
(interleaved), a CUDA backend with CUDA events, and the isosurface references.

Every function returns millisecond samples (or their :func:`vrn.metrics.summarize`
stats); none decides what is fast enough (that is :mod:`vrn.bench.goals`).
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np

from ..errors import NoFaceError
from ..metrics import ratio, repeat

FRAME_STAGES = ("decode", "detect", "landmarks", "crop", "infer", "isosurface", "colour",
                "render")
CROP_TO_MESH = ("crop", "infer", "isosurface", "colour")
GPU_PHASES = ("h2d", "compute", "d2h", "with_transfers")
SETTLE_S = 0.02  # pause before each interleaved call: idle thread pools stop spinning
MIN_ISOSURFACE_RUNS = 3


def time_pipeline(reconstructor, source, *, batch: int, frames: int, warmup: int,
                  tick=None) -> dict:
    """Run ``warmup + frames`` frames of ``source`` (a
    :class:`~vrn.bench.source.FrameSource`) through decode, detect, the reconstructor on
    ``batch`` copies of the face (landmarks through colour), and render; return
    per-frame millisecond samples ``{stage: [ms, ...]}`` for :data:`FRAME_STAGES`,
    ``"crop_to_mesh"`` and ``"end_to_end"``, plus the mesh size and how many frames had
    no detection (their previous box was reused, as a tracker would)."""
    from ..runtime.render import overlay
    from ..runtime.timing import StageTimer

    samples: dict[str, list[float]] = {s: [] for s in FRAME_STAGES}
    samples["crop_to_mesh"], samples["end_to_end"] = [], []
    last_box, missed, mesh = None, 0, None
    for index in range(warmup + frames):
        timer = StageTimer()
        start = time.perf_counter()
        with timer("decode"):
            frame = source.read()
        with timer("detect"):
            boxes = reconstructor.detector(frame)
        if boxes:
            last_box = boxes[0]
        elif last_box is None:
            raise NoFaceError(f"{source.path}: no face found in the first frame")
        else:
            missed += index >= warmup
        result = reconstructor(frame, boxes=[last_box] * batch)
        with timer("render"):
            overlay(frame, [face.mesh for face in result.faces])
        total_ms = (time.perf_counter() - start) * 1e3
        if tick is not None:
            tick()
        if index < warmup:
            continue
        stage_ms = {**result.timings_ms, **timer.ms}  # our detect replaces the no-op one
        for stage in FRAME_STAGES:
            samples[stage].append(stage_ms.get(stage, 0.0))
        samples["crop_to_mesh"].append(sum(result.timings_ms.get(s, 0.0) for s in CROP_TO_MESH))
        samples["end_to_end"].append(total_ms)
        mesh = result.faces[0].mesh
    return {"samples": samples, "missed_detections": missed,
            "mesh": {"vertices": len(mesh.vertices), "faces": len(mesh.faces)}}


def time_inference(backends: dict, inputs: dict, *, frames: int, warmup: int) -> dict:
    """The networks alone: each ``backends[key].infer(batch, landmarks)``, with
    ``inputs[key] = (batch (N, 3, S, S) float32, landmarks (N, 68, 3) float32 crop
    pixels)`` (NumPy in, NumPy out, so host transfers are included on a GPU), called once
    per round, the keys in turn, for ``warmup + frames`` rounds. Interleaving spreads any
    change in the machine's load over every backend alike, so their ratios stay fair on a
    shared machine; a pause of :data:`SETTLE_S` before each call lets the previous backend's
    worker threads stop spinning first. Returns millisecond samples per key."""
    samples: dict = {key: [] for key in backends}
    for index in range(warmup + frames):
        for key, backend in backends.items():
            time.sleep(SETTLE_S)
            call = repeat(partial(backend.infer, *inputs[key]), runs=1, warmup=0)
            if index >= warmup:
                samples[key] += call.wall_ms
    return samples


def time_device_inference(backend, batch: np.ndarray, landmarks: np.ndarray, *,
                          frames: int, warmup: int) -> dict | None:
    """trtexec-style CUDA-event timing of a CUDA backend on ``batch`` ``(N, 3, S, S)``
    and ``landmarks`` ``(N, 68, 3)`` float32: ``h2d`` (the crops, pinned host to
    device), ``compute`` (crops and volume on the device; a guided backend's own copy of
    the landmarks, 816 bytes a face, falls in it), ``d2h`` and ``with_transfers`` (all
    three), as millisecond samples. ``None`` off CUDA."""
    if getattr(backend, "device", "cpu") != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        return None  # a TensorRT backend on numba-cuda arrays: no torch CUDA events

    host = torch.from_numpy(np.ascontiguousarray(batch)).pin_memory()
    samples: dict[str, list[float]] = {p: [] for p in GPU_PHASES}
    for index in range(warmup + frames):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        events[0].record()
        x = host.to("cuda", non_blocking=True)
        events[1].record()
        y = backend.infer(x, landmarks, on_device=True)
        events[2].record()
        y.to("cpu")
        events[3].record()
        torch.cuda.synchronize()
        if index < warmup:
            continue
        samples["h2d"].append(events[0].elapsed_time(events[1]))
        samples["compute"].append(events[1].elapsed_time(events[2]))
        samples["d2h"].append(events[2].elapsed_time(events[3]))
        samples["with_transfers"].append(events[0].elapsed_time(events[3]))
    return samples


def time_isosurface_references(volumes: dict[str, np.ndarray], *, level: float, runs: int,
                               budget_s: float) -> dict:
    """Every isosurface implementation of :mod:`vrn.bench.isosurface` on every volume
    (``{name: (D, H, W) float32}``): millisecond stats of one warm-up and then at least
    :data:`MIN_ISOSURFACE_RUNS`, at most ``runs`` calls (fewer once ``budget_s`` is
    spent), vertex and triangle counts, and how many times slower each reference is
    than ours (ratio of medians)."""
    from .isosurface import OURS, available_implementations

    runners, unavailable = available_implementations()
    results = []
    for name, volume in volumes.items():
        volume = np.ascontiguousarray(volume, dtype=np.float32)
        entry = {"volume": name, "shape": list(volume.shape), "implementations": {}}
        for impl, run in runners.items():
            timed = repeat(partial(run, volume, level), runs=max(runs, MIN_ISOSURFACE_RUNS),
                           min_runs=MIN_ISOSURFACE_RUNS, budget_s=budget_s)
            vertices, triangles = timed.result
            entry["implementations"][impl] = {**timed.summary(),
                                              "vertices": len(vertices),
                                              "triangles": len(triangles)}
        ours = entry["implementations"][OURS]["p50"]
        entry["slower_than_ours"] = {impl: ratio(stats["p50"], ours)
                                     for impl, stats in entry["implementations"].items()
                                     if impl != OURS}
        results.append(entry)
    return {"level": level, "ours": OURS, "volumes": results, "unavailable": unavailable}
