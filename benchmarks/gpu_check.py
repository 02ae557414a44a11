"""Checks that need a real GPU, in one run: ``python benchmarks/gpu_check.py``.

Each check is a function in :data:`CHECKS` that takes the shared :class:`Context` and
returns a dict with ``status`` (``"pass"``, ``"fail"`` or ``"skip"``), a one-line
``detail`` and any measured numbers. Checks without what they need (CUDA, TensorRT,
onnxruntime-gpu) skip; ``cpu_reference`` (the shared face crops, their landmarks and the
CPU fp32 reference volumes) and ``live_headless`` run anywhere. Every network call gets
the crops' landmarks, which a landmark-guided model needs and others ignore. The crops
are those of ``vrn-export``'s fp16 gate (:func:`vrn.deploy.parity.face_crop_variants`),
and the TensorRT check runs ``vrn-export --fp16 --engine yes`` itself, so it checks the
very engine (and gate) users get. The script prints a table and writes everything as
JSON to ``benchmarks/results/gpu_check-<date>-<gpu>.json``.

Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``; the test suite runs it so,
``tests/test_gpu_check.py``) the script runs end to end on any machine: the kernels on
tiny volumes, the torch-CUDA, TensorRT and ONNX Runtime GPU checks skipped, the live
loop on fewer frames. On a GPU host it must pass with no options.

Options: ``--only NAME`` (repeatable) runs a subset; ``--weights PATH`` uses those
weights instead of the package default; ``--out DIR`` changes the results folder;
``--frames N`` the live check's video length (default 120, 24 under the simulator).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vrn.metrics import MIN_IOU, occupancy_iou, repeat
from vrn.runtime.backends.cuda_arrays import torch_cuda

RESULTS = Path(__file__).resolve().parent / "results"
LIVE_FRAMES = 120
SIMULATOR_LIVE_FRAMES = 24


def simulated() -> bool:
    """Whether numba.cuda is the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _skip_on_simulator(what: str) -> dict | None:
    if simulated():
        return {"status": "skip", "detail": f"Numba CUDA simulator: {what} skipped (they "
                                            "need a real GPU)"}
    return None


@dataclass
class Context:
    """What the checks share: the weights, a scratch folder, the live check's length,
    and lazily built items."""

    weights: str | None
    scratch: Path
    frames: int = LIVE_FRAMES
    cache: dict = field(default_factory=dict)

    def model(self):
        """A fresh CPU copy of the model under test (float32, evaluation mode)."""
        from vrn.model import load_model

        return load_model(self.weights)

    def crops(self) -> np.ndarray:
        """``(N, 3, S, S)`` float32 face crops of the sample photo, the fp16 gate's
        (:func:`vrn.deploy.parity.face_crop_variants`: landmark stage and landmark crop
        on three boxes, the detected face and a wider and a shifted box around it).
        Their landmarks are :meth:`landmarks`; the photo and boxes are cached as
        ``photo`` and ``boxes``."""
        if "crops" not in self.cache:
            from vrn.deploy.parity import face_crop_variants, sample_photo_and_boxes

            size = self.model().config.input_size
            self.cache["photo"], self.cache["boxes"] = sample_photo_and_boxes()
            self.cache["crops"], self.cache["landmarks"] = face_crop_variants(size)
        return self.cache["crops"]

    def landmarks(self) -> np.ndarray:
        """``(N, 68, 3)`` float32 landmarks of :meth:`crops` in crop pixels ``(x, y, z)``
        (what a landmark-guided model takes beside each crop)."""
        self.crops()
        return self.cache["landmarks"]

    def reference(self) -> np.ndarray:
        """CPU fp32 torch volumes of :meth:`crops` (the reference every backend meets)."""
        if "reference" not in self.cache:
            from vrn.runtime.backends import TorchBackend

            backend = TorchBackend(self.model(), device="cpu")
            self.cache["reference"] = infer_each(backend, self.crops(), self.landmarks())
        return self.cache["reference"]

    def onnx(self, fp16: bool = False) -> Path:
        """The model exported to ONNX (fp32, or the fp16 conversion) in the scratch dir."""
        from vrn.runtime.backends.onnxruntime_backend import cached_onnx

        key = f"onnx-fp16={fp16}"
        if key not in self.cache:
            self.cache[key] = cached_onnx(self.model(), self.scratch, fp16=fp16)
        return self.cache[key]


def infer_each(backend, crops: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """``backend`` on one crop at a time: ``(N, D, S, S)`` float32 NumPy volumes of
    ``crops`` ``(N, 3, S, S)`` with their ``landmarks`` ``(N, 68, 3)``."""
    return np.concatenate([np.asarray(backend.infer(crops[i:i + 1], landmarks[i:i + 1]))
                           for i in range(len(crops))])


def _time_ms(fn, repeats: int = 20, warmup: int = 3) -> dict:
    """p50 and mean wall milliseconds of ``fn()`` (which must synchronise itself)."""
    stats = repeat(fn, runs=repeats, warmup=warmup).summary()
    return {"p50_ms": round(stats["p50"], 3), "mean_ms": round(stats["mean"], 3)}


def check_cpu_reference(ctx: Context) -> dict:
    """On any machine: the inputs the GPU checks share (the sample photo's crops, made
    by the pipeline's landmark crop, and their landmarks in crop pixels) and the CPU
    fp32 reference volumes of the model under test (a landmark-guided model gets the
    landmarks)."""
    from vrn.model import GUIDED_ARCHITECTURES

    crops, landmarks = ctx.crops(), ctx.landmarks()
    start = time.perf_counter()
    reference = ctx.reference()  # includes loading the model, unless cached before
    ms = (time.perf_counter() - start) * 1e3 / len(crops)
    size = crops.shape[-1]
    guided = getattr(ctx.model(), "architecture", "VRN") in GUIDED_ARCHITECTURES
    # The landmark crop puts the landmarks' mean at the crop's centre.
    centre_error = float(np.abs(landmarks[:, :, :2].mean(1) - (size - 1) / 2).max())
    problems = []
    if crops.shape != (3, 3, size, size) or landmarks.shape != (3, 68, 3):
        problems.append(f"shapes {crops.shape} and {landmarks.shape}")
    if centre_error > 0.5:
        problems.append(f"landmark mean {centre_error:.2f} px off the crop centre")
    if reference.shape[0] != 3 or not np.isfinite(reference).all() \
            or reference.min() < 0 or reference.max() > 1:
        problems.append("reference volumes not (3, D, S, S) in [0, 1]")
    occupied = float((reference > 0.5).mean())
    return {"status": "fail" if problems else "pass", "guided": guided,
            "reference_shape": list(reference.shape), "occupied": occupied,
            "crop_landmark_centre_error_px": centre_error,
            "detail": (f"{'; '.join(problems)}; " if problems else "")
            + f"{len(crops)} crops {size}px with landmarks, "
            f"{'landmark-guided' if guided else 'unguided'} model, reference "
            f"{tuple(reference.shape[1:])} {occupied:.1%} occupied, CPU fp32 {ms:.0f} ms "
            "per crop"}


def check_torch_fp16_vs_cpu_fp32(ctx: Context) -> dict:
    """PyTorch CUDA fp16 (channels-last, with and without CUDA graphs) against CPU fp32:
    occupancy IoU on face crops, and the batch-1 inference time."""
    skipped = _skip_on_simulator("torch CUDA checks")
    if skipped:
        return skipped
    torch = torch_cuda()
    if torch is None:
        return {"status": "skip", "detail": "torch has no CUDA"}
    from vrn.runtime.backends import TorchBackend

    reference, crops, landmarks = ctx.reference(), ctx.crops(), ctx.landmarks()
    result = {}
    for graphs in (False, True):
        backend = TorchBackend(ctx.model(), device="cuda", precision="fp16",
                               cuda_graphs=graphs)
        volumes = infer_each(backend, crops, landmarks)
        ious = [occupancy_iou(v, r) for v, r in zip(volumes, reference)]
        x = torch.from_numpy(crops[:1]).cuda()

        def run(backend=backend, x=x):
            backend.infer(x, landmarks[:1])
            torch.cuda.synchronize()

        result["graphs" if graphs else "eager"] = {"iou_min": round(min(ious), 5),
                                                   **_time_ms(run)}
    worst = min(r["iou_min"] for r in result.values())
    status = "pass" if worst >= MIN_IOU else "fail"
    return {"status": status, "detail": f"min IoU {worst:.4f} (need {MIN_IOU}); batch 1: "
                                        f"eager {result['eager']['p50_ms']:.2f} ms, graphs "
                                        f"{result['graphs']['p50_ms']:.2f} ms", **result}


def _count_host_copies(torch):
    """Patch the ways a CUDA array reaches the host; returns ``(copies, undo)`` where
    ``copies`` collects the element counts copied."""
    copies: list[int] = []
    undo = []

    def patch(owner, name, wrap):
        original = getattr(owner, name)
        setattr(owner, name, wrap(original))
        undo.append(lambda: setattr(owner, name, original))

    def tensor_wrap(name):
        def wrap(original):
            def wrapper(self, *args, **kwargs):
                out = original(self, *args, **kwargs)
                if self.is_cuda and (name in ("cpu", "numpy", "tolist", "__array__") or
                                     (isinstance(out, torch.Tensor) and not out.is_cuda)):
                    copies.append(int(self.numel()))
                return out
            return wrapper
        return wrap

    for name in ("cpu", "numpy", "to", "tolist", "__array__"):
        patch(torch.Tensor, name, tensor_wrap(name))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray

    def array_wrap(original):
        def copy_to_host(self, *args, **kwargs):
            copies.append(int(self.size))
            return original(self, *args, **kwargs)
        return copy_to_host

    patch(DeviceNDArray, "copy_to_host", array_wrap)
    return copies, lambda: [u() for u in reversed(undo)]


def _pipeline_zero_copy(ctx: Context, backend) -> dict:
    """Run one frame of the pipeline on ``backend`` (several faces, one batch) and count
    device-to-host copies; the volume must not be among them."""
    torch = torch_cuda()
    from vrn.runtime.pipeline import Reconstructor

    ctx.crops()
    photo, boxes = ctx.cache["photo"], ctx.cache["boxes"][:2]
    rec = Reconstructor(backend=backend, all_faces=True)
    rec(photo, boxes=boxes)  # warm-up: JIT, cuDNN autotuning, graph capture
    volume_elements = backend.out_depth * backend.input_size ** 2
    seen = []
    infer = backend.infer

    def watched(batch, *args, **kwargs):
        volume = infer(batch, *args, **kwargs)
        seen.append((type(volume).__module__, tuple(volume.shape)))
        return volume

    backend.infer = watched
    copies, undo = _count_host_copies(torch)
    try:
        result = rec(photo, boxes=boxes)
    finally:
        undo()
        del backend.infer
    stages = {k: round(v, 3) for k, v in result.timings_ms.items()}
    ok = (len(seen) == 1 and not seen[0][0].startswith("numpy") and seen[0][1][0] == 2
          and copies and max(copies) < volume_elements
          and all(len(f.mesh.faces) for f in result.faces))
    timing = _time_ms(lambda: rec(photo, boxes=boxes[:1]), repeats=10)
    return {"status": "pass" if ok else "fail",
            "detail": (f"volume {seen[0][0] if seen else '?'} {seen[0][1] if seen else ''}; "
                       f"largest host copy {max(copies) if copies else 0} elements "
                       f"(a volume is {volume_elements}); one face end to end "
                       f"{timing['p50_ms']:.1f} ms"),
            "host_copies": copies, "stages_ms_two_faces": stages,
            "one_face_ms": timing}


def check_zero_copy_pipeline(ctx: Context) -> dict:
    """The torch CUDA fp16 pipeline: the volume stays on the GPU (only mesh-sized copies
    reach the host), and the GPU mesh equals the CPU mesh for the same volume."""
    skipped = _skip_on_simulator("torch CUDA checks")
    if skipped:
        return skipped
    torch = torch_cuda()
    if torch is None:
        return {"status": "skip", "detail": "torch has no CUDA"}
    from vrn.runtime.backends import TorchBackend
    from vrn.runtime.pipeline import Reconstructor

    result = _pipeline_zero_copy(ctx, TorchBackend(ctx.model(), device="cuda",
                                                   precision="fp16", cuda_graphs=True))
    # Same volume on both paths (fp32 on the GPU), then the meshes must agree.
    photo, boxes = ctx.cache["photo"], ctx.cache["boxes"][:1]
    gpu = Reconstructor(backend=TorchBackend(ctx.model(), device="cuda", precision="fp32"))
    cpu = Reconstructor(backend=TorchBackend(ctx.model(), device="cpu"))
    g, c = gpu(photo, boxes=boxes).faces[0].mesh, cpu(photo, boxes=boxes).faces[0].mesh
    same = abs(len(g.faces) - len(c.faces)) <= max(10, len(c.faces) // 1000)
    result["gpu_vs_cpu_triangles"] = [len(g.faces), len(c.faces)]
    if not same:
        result["status"] = "fail"
    result["detail"] += f"; triangles GPU {len(g.faces)} vs CPU {len(c.faces)}"
    return result


def export_engine(ctx: Context) -> tuple[Path, dict]:
    """Run ``vrn-export [WEIGHTS] --fp16 --engine yes --accept-parity`` into the scratch
    folder (the command users run, with its defaults; ``--accept-parity`` keeps an
    engine that misses the fp16 gate so that it can still be measured): the engine's
    path and ``export.json``. Its output goes to ``vrn-export.log`` there."""
    from vrn.cli.export import main as vrn_export

    out = ctx.scratch / "export"
    argv = ([ctx.weights] if ctx.weights else []) + ["-o", str(out), "--fp16", "--engine",
                                                     "yes", "--accept-parity"]
    log = ctx.scratch / "vrn-export.log"
    with open(log, "w") as stream, contextlib.redirect_stdout(stream), \
            contextlib.redirect_stderr(stream):
        code = vrn_export(argv)
    report_path = out / "export.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    engine = out / "vrn.fp16.engine"
    if code != 0 or not engine.is_file():
        tail = "".join(log.read_text().splitlines(keepends=True)[-12:])
        raise RuntimeError(f"vrn-export {' '.join(argv)} exited {code} without "
                           f"{engine.name}:\n{tail}")
    return engine, report


def check_tensorrt(ctx: Context) -> dict:
    """TensorRT (when installed): the fp16 engine ``vrn-export --fp16 --engine yes``
    writes, with its fp16 gate (against PyTorch fp32 on face crops), then run by the
    TensorRT backend with and without CUDA graphs (IoU against CPU fp32, batch-1 time),
    and the zero-copy pipeline on it."""
    try:
        importlib.import_module("tensorrt")
    except ImportError as exc:
        return {"status": "skip", "detail": f"tensorrt does not import ({exc})"}
    skipped = _skip_on_simulator("TensorRT checks")
    if skipped:
        return skipped
    torch = torch_cuda()
    from vrn.runtime.backends.tensorrt_backend import TensorRTBackend

    engine, report = export_engine(ctx)
    gate = report.get("parity", {}).get("TensorRT fp16 vs PyTorch", {})
    reference, crops, landmarks = ctx.reference(), ctx.crops(), ctx.landmarks()
    result = {"build_s": (report.get("engine") or {}).get("build_seconds"),
              "export_gate": {k: gate.get(k) for k in ("passed", "accepted", "gate_iou",
                                                         "min_iou", "criterion")},
              "engine_batch": (report.get("engine") or {}).get("batch")}
    for graphs in (False, True):
        if graphs and torch is None:
            continue
        backend = TensorRTBackend(engine, cuda_graphs=graphs)
        volumes = infer_each(backend, crops, landmarks)
        ious = [occupancy_iou(v, r) for v, r in zip(volumes, reference)]
        x = torch.from_numpy(crops[:1]).cuda() if torch is not None else crops[:1]

        def run(backend=backend, x=x):
            backend.infer(x, landmarks[:1])
            backend.synchronize()

        result["graphs" if graphs else "plain"] = {"iou_min": round(min(ious), 5),
                                                   **_time_ms(run)}
    pipeline = _pipeline_zero_copy(ctx, TensorRTBackend(engine)) if torch else None
    worst = min(result[k]["iou_min"] for k in ("plain", "graphs") if k in result)
    gate_ok = bool(gate.get("passed"))
    ok = gate_ok and worst >= MIN_IOU and (pipeline is None or pipeline["status"] == "pass")
    gate_text = (f"vrn-export's fp16 gate {'passed' if gate_ok else 'FAILED'} (IoU "
                 f"{gate.get('gate_iou', float('nan')):.4f}, {gate.get('criterion')})")
    result.update(status="pass" if ok else "fail", pipeline=pipeline,
                  detail=f"{gate_text}; fp16 engine: min IoU {worst:.4f}, batch 1 "
                         f"{result['plain']['p50_ms']:.2f} ms"
                         + (f"; pipeline: {pipeline['detail']}" if pipeline else ""))
    return result


def check_onnxruntime_gpu(ctx: Context) -> dict:
    """onnxruntime's CUDA provider (when installed): it really loads (not the silent CPU
    fallback), IO binding keeps the volume on the device, and it matches CPU fp32."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"status": "skip", "detail": f"onnxruntime does not import ({exc})"}
    skipped = _skip_on_simulator("ONNX Runtime GPU checks")
    if skipped:
        return skipped
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"status": "skip", "detail": "onnxruntime without the CUDA provider "
                                            "(install onnxruntime-gpu)"}
    from vrn.errors import BackendUnavailableError
    from vrn.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    try:
        backend = OnnxRuntimeBackend(ctx.onnx(), provider="cuda")
    except BackendUnavailableError as exc:
        return {"status": "fail", "detail": str(exc)}
    reference, crops, landmarks = ctx.reference(), ctx.crops(), ctx.landmarks()
    volumes = infer_each(backend, crops, landmarks)
    error = float(np.abs(volumes - reference).max())
    iou = min(occupancy_iou(v, r) for v, r in zip(volumes, reference))
    torch = torch_cuda()
    on_device = (backend.infer(torch.from_numpy(crops[:1]).cuda(), landmarks[:1])
                 if torch else None)
    ok = iou >= MIN_IOU and (on_device is None or on_device.is_cuda)
    return {"status": "pass" if ok else "fail", "providers": backend.providers,
            "max_abs_error": error, "iou_min": iou,
            "detail": f"{backend.providers[0]}, max |error| {error:.2e}, IoU {iou:.4f}"}


def check_live_headless(ctx: Context) -> dict:
    """``vrn-live --headless`` with ``--backend auto`` on a video of the sample photo
    moved and rotated: steady-state FPS and per-stage p50."""
    from vrn.bench.video import moving_face_video
    from vrn.runtime.capture import FrameGrabber
    from vrn.runtime.live import run_live
    from vrn.runtime.pipeline import Reconstructor

    frames = ctx.frames
    video = moving_face_video(ctx.scratch / "moving_face.avi", frames=frames)
    rec = Reconstructor(ctx.weights, backend="auto", cache_dir=ctx.scratch)
    rec.warmup()
    with open(ctx.scratch / "live.log", "w") as log:
        summary = run_live(rec, FrameGrabber(video), headless=True, out=log)
    p50 = {k: v["p50"] for k, v in summary["stages_ms"].items()}
    ok = summary["frames"] == frames and summary["frames_with_faces"] >= frames * 5 // 6
    return {"status": "pass" if ok else "fail", "backend": rec.backend.describe(),
            "selection_reason": rec.backend.selection_reason, "fps": summary["fps"],
            "stages_p50_ms": p50,
            "detail": f"{rec.backend.name}: {summary['fps']:.1f} FPS over "
                      f"{summary['frames']} frames; p50 ms "
                      + " ".join(f"{k} {v:.1f}" for k, v in p50.items())}


def check_marching_cubes(ctx: Context) -> dict:
    """The mesh kernels (``vrn.kernels``) on the GPU: exactly the CPU output on full-size
    volumes, and their CUDA-event times (see ``gpu_check_kernels.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check_kernels import check_marching_cubes as check

    return check(ctx)


CHECKS = [
    ("cpu_reference", check_cpu_reference),
    ("marching_cubes", check_marching_cubes),
    ("torch_fp16_vs_cpu_fp32", check_torch_fp16_vs_cpu_fp32),
    ("zero_copy_pipeline", check_zero_copy_pipeline),
    ("tensorrt", check_tensorrt),
    ("onnxruntime_gpu", check_onnxruntime_gpu),
    ("live_headless", check_live_headless),
]


def system_summary() -> dict:
    from importlib import metadata

    torch = torch_cuda()
    info = {"python": platform.python_version(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name(0) if torch and not simulated() else None,
            "simulator": simulated()}
    for module in ("torch", "numba", "onnxruntime", "tensorrt"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    for dist in ("numba-cuda", "onnxruntime-gpu", "onnxruntime"):  # which packages
        try:
            info[f"dist:{dist}"] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[f"dist:{dist}"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=[name for name, _ in CHECKS])
    parser.add_argument("--weights", help="weights to check (default: the package default)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--frames", type=int, help="frames of the live check's video "
                        f"(default {LIVE_FRAMES}, {SIMULATOR_LIVE_FRAMES} under the simulator)")
    args = parser.parse_args(argv)
    from vrn.atomic import write_text_atomic

    frames = args.frames or (SIMULATOR_LIVE_FRAMES if simulated() else LIVE_FRAMES)
    results = {}
    with tempfile.TemporaryDirectory(prefix="vrn-gpu-check-") as scratch:
        ctx = Context(args.weights, Path(scratch), frames=frames)
        for name, check in CHECKS:
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            try:
                outcome = check(ctx)
            except Exception as exc:  # one broken check must not hide the others
                outcome = {"status": "fail", "detail": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()}
            outcome["seconds"] = round(time.perf_counter() - start, 1)
            results[name] = outcome
            print(f"{name:<26} {outcome['status']:<5} {outcome['detail']}", flush=True)
    system = system_summary()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", system["gpu"] or (
        "simulator" if simulated() else "no-gpu")).strip("-").lower()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check-{stamp}-{gpu}.json"
    write_text_atomic(path, json.dumps({"system": system, "weights": args.weights,
                                        "checks": results}, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return 0 if all(r["status"] != "fail" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
