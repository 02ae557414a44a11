"""The one exporter behind ``vrn-export``: weights -> fp32 ONNX -> fp16 ONNX -> TensorRT
engine, each step checked, timed and reported the same way, then ``export.json`` and a
summary of the files written and how to use them.

The artifacts are written by :mod:`vrn.export`; their parity checks (:mod:`.parity`)
run them through the runtime's own backends and landmark runners, the code that
``vrn-live`` and ``vrn-reconstruct`` run, so this module sits above both. The ONNX
files are one table (:data:`GRAPH_TARGETS`) published by one helper (write, check,
rename into place).

Every file is written atomically, and each is published under its final name only
after its checks passed (graph checks, then parity), so an interrupted or failed export
never leaves a half-written or unverified file behind; ``export.json`` comes last.

The fp32 graph is the one target every other needs: when it fails, the export fails.
A failure of any later target (the fp16 graph, an engine, the landmark stage) is
reported in one line and recorded in ``export.json``'s ``failed`` list, and the other
targets still complete; with ``strict=True`` the export then raises.

The fp16 gate (:mod:`.parity`): the fp16 graph is checked on the CPU with its fp16
rounding emulated (:func:`vrn.export.fp16.emulate_fp16`; ONNX Runtime's CPU provider
would compute it in fp32), the fp16 engine on the GPU, both against the fp32 reference
on real face crops. An engine that misses the target is not thrown away: it is kept as
``<engine>.rejected`` with its sidecar and ``<engine>.rejected.parity.json`` beside it,
and ``accept_parity=True`` (``--accept-parity``) publishes it under its own name anyway,
recorded as accepted. Before an engine is built, the exporter says which buffer provider
its check will run on (torch CUDA tensors or numba-cuda arrays), or fails at once when
there is none.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO
from collections.abc import Callable

import numpy as np
import torch

from ..atomic import atomic_path, write_text_atomic
from ..errors import BackendUnavailableError, ExportError, UnreadableOnnxError, VRNError
from ..export.engine_file import current_gpu, sha256_file, sidecar_path
from ..export.onnx_export import (BATCH_DIM, DEFAULT_MAX_BATCH, DEFAULT_OPSET, export_onnx,
                                  graph_io)
from ..model import BN_MODES, GUIDED_ARCHITECTURES, count_parameters, load_model, set_bn_mode
from ..model.checkpoint import model_info
from ..runtime.backends import cuda_arrays
from ..runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from ..runtime.backends.torch_backend import TorchBackend
from .parity import (LANDMARKS_MAX_ABS_PX, CachedRunner, ParityReport, check_parity,
                     face_crop_variants, format_table, landmark_difference, parity_inputs)

__all__ = ["ENGINE_MODES", "ExportError", "Exporter", "GRAPH_TARGETS", "ParityFailure"]

ONNX_NAME = "vrn.onnx"
FP16_NAME = "vrn.fp16.onnx"
LANDMARKS_ONNX_NAME = "landmarks.onnx"
REPORT_NAME = "export.json"
REPORT_FORMAT = "vrn-export/1"
ENGINE_MODES = ("auto", "yes", "no")
REJECTED_SUFFIX = ".rejected"  # an engine that failed its parity check: vrn.fp16.engine.rejected
PARITY_SUFFIX = ".parity.json"  # its report beside it


class ParityFailure(ExportError):
    """A file missed its parity target; ``report`` is the :class:`~.parity.ParityReport`
    and ``table`` its table."""

    def __init__(self, message: str, report: ParityReport, table: str):
        super().__init__(message)
        self.report, self.table = report, table


@dataclass(frozen=True)
class GraphTarget:
    """One ONNX file of the export: its name, the step that writes it (and
    ``"<step> parity"``, the one that checks it), its parity check's name and precision,
    whether the check runs the graph with its fp16 rounding emulated
    (:func:`vrn.export.fp16.emulate_fp16`), and whether the export fails with it (else
    it is one failed target among others)."""

    file: str
    step: str
    check: str
    precision: str
    required: bool
    slow: bool  # show a spinner while it is written
    emulate_fp16: bool = False


GRAPH_TARGETS = {
    "fp32": GraphTarget(ONNX_NAME, "ONNX", "ONNX fp32 vs PyTorch", "fp32", required=True,
                        slow=True),
    "fp16": GraphTarget(FP16_NAME, "fp16", "ONNX fp16 emulated vs PyTorch", "fp16",
                        required=False, slow=False, emulate_fp16=True),
}

_FAILED = object()  # what Exporter._attempt returns for a failed target


class Exporter:
    """Export a VRN model for deployment.

    Parameters
    ----------
    outdir : path
        Output folder (created if missing).
    fp16 : bool
        Also write ``vrn.fp16.onnx`` (fp16 compute, fp32 input and output) and build the
        engine from it.
    max_batch : int
        Largest batch of the dynamic batch dimension and of the engine's profile.
    opt_batch : int
        The batch TensorRT tunes the engine's kernels for (default 1: the live
        pipeline's batch).
    opset : int
        ONNX opset.
    workspace_gb : float, optional
        TensorRT builder workspace limit (GiB).
    engine : {"auto", "yes", "no"}
        Build a TensorRT engine: when TensorRT and a GPU are here (skipped otherwise),
        always (a missing TensorRT or GPU is then a failed target), or never.
    bn_mode : {"running", "instance"}, optional
        Batch-norm mode to export (default: the weights' own).
    verify : bool
        Run the parity checks (a failing check fails its target).
    strict : bool
        Raise :class:`ExportError` at the end when any target failed (the other
        targets and ``export.json`` are still written first).
    out : text stream
        Where progress lines and the summary go.
    progress : bool, optional
        Show a spinner with the elapsed time during slow steps (default: when stderr
        is a terminal).
    random_inputs : int
        Number of random images in the parity checks.
    face_crops : callable, optional
        ``face_crops(size) -> (crops, landmarks)``: the real face crops of the parity
        checks, on which the fp16 gate applies (default:
        :func:`~.parity.face_crop_variants`, the bundled photo's face as the pipeline
        crops it from three boxes).
    accept_parity : bool
        Publish an engine that misses its parity target under its own name (recorded as
        accepted in ``export.json``) instead of keeping it as ``<engine>.rejected``.
    device_id : int
        The CUDA device engines are built and checked on.
    """

    def __init__(self, outdir, *, fp16: bool = False, max_batch: int = DEFAULT_MAX_BATCH,
                 opt_batch: int = 1, opset: int = DEFAULT_OPSET,
                 workspace_gb: float | None = None, engine: str = "auto",
                 bn_mode: str | None = None, verify: bool = True, out: TextIO | None = None,
                 progress: bool | None = None, random_inputs: int = 3, face_crops=None,
                 strict: bool = False, accept_parity: bool = False, device_id: int = 0):
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if not 1 <= int(opt_batch) <= int(max_batch):
            raise ValueError(f"opt_batch must be in [1, max_batch={max_batch}], got "
                             f"{opt_batch}")
        if int(device_id) < 0:
            raise ValueError(f"device_id must be >= 0, got {device_id}")
        if engine not in ENGINE_MODES:
            raise ValueError(f"engine must be one of {ENGINE_MODES}, got {engine!r}")
        if bn_mode is not None and bn_mode not in BN_MODES:
            raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
        if workspace_gb is not None and not workspace_gb > 0:
            raise ValueError(f"workspace must be a positive number of GiB, got {workspace_gb}")
        self.outdir = Path(outdir)
        self.fp16 = fp16
        self.max_batch = int(max_batch)
        self.opt_batch = int(opt_batch)
        self.device_id = int(device_id)
        self.accept_parity = accept_parity
        self.opset = opset
        self.workspace_gb = workspace_gb
        self.engine = engine
        self.bn_mode = bn_mode
        self.verify = verify
        self.out = out or sys.stdout
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.random_inputs = random_inputs
        self.face_crops = face_crops or face_crop_variants
        self.strict = strict
        self.failed: list[dict] = []
        self.steps: list[dict] = []
        self.files: list[Path] = []
        self.parity: dict[str, ParityReport] = {}
        self.notes: list[str] = []
        self.elapsed = 0.0

    # -- the two pipelines -------------------------------------------------------------

    def export(self, weights=None) -> dict:
        """Export ``weights`` (a ``.t7``, a vrn-edge ``.safetensors``, ``None`` for the
        package default, or a loaded model) and return the ``export.json`` report."""
        start = time.perf_counter()
        self._prepare_outdir()
        model = self._step("weights", lambda: self._load(weights))
        info = model_info(model)
        inputs = reference = None
        if self.verify:
            channels = 3 if info.architecture == "VRNGuided" else model.config.in_channels
            inputs = parity_inputs(channels, model.config.input_size,
                                   random_count=self.random_inputs, faces=self.face_crops,
                                   guided=info.architecture in GUIDED_ARCHITECTURES)
            reference = CachedRunner(TorchBackend(model, device="cpu", precision="fp32"))
        metadata = {**info.to_metadata(), "max_batch": self.max_batch}
        writers = {"fp32": lambda tmp: self._export_onnx(model, tmp, metadata),
                   "fp16": lambda tmp: self._export_fp16(self.outdir / ONNX_NAME, tmp)}
        written, target, missing = {}, None, None
        for key in ("fp32", "fp16") if self.fp16 else ("fp32",):
            spec = GRAPH_TARGETS[key]
            publish = functools.partial(self._publish_graph, spec, writers[key], reference,
                                        inputs, trained=info.trained)
            outcome = publish() if spec.required else self._attempt(spec.file, publish)
            if outcome is _FAILED:
                missing = spec.file  # the engine is built from the last graph
                break
            target, written[key] = outcome
        if missing is not None:
            if self.engine != "no":
                self._skipped("TensorRT", f"needs {missing}, which failed")
            engine_meta = None
        else:
            engine_meta = self._attempt("TensorRT", lambda: self._engine_steps(
                target, inputs, trained=info.trained, reference=reference))
        built_engine = engine_meta is not None and engine_meta is not _FAILED
        self._landmark_steps(built_engine)
        report = self._new_report(engine_meta if built_engine else None)
        report.update(self._model_report(model, weights, written["fp32"]))
        self._write_report(report, start)
        self._summary(report)
        self._raise_if_strict()
        return report

    def _publish_graph(self, spec: GraphTarget, write: Callable, reference, inputs, *,
                       trained: bool) -> tuple[Path, object]:
        """Write one ONNX file (``write(tmp) -> (result, message)``), check it against
        ``reference`` on the ONNX Runtime backend, and only then rename it into place;
        ``(path, result)``."""
        path = self.outdir / spec.file
        with atomic_path(path) as tmp:
            result = self._step(spec.step, lambda: write(tmp), slow=spec.slow)
            if self.verify:
                self._step(f"{spec.step} parity", lambda: self._verify_graph(
                    spec, tmp, reference, inputs, trained=trained), slow=True)
        self.files.append(path)
        return path, result

    def _verify_graph(self, spec: GraphTarget, path: Path, reference, inputs, *, trained):
        """Check the graph ``path`` on the ONNX Runtime backend (CPU) against
        ``reference``; an fp16 graph with its fp16 rounding made explicit
        (:func:`vrn.export.fp16.emulate_fp16`), which ONNX Runtime's CPU provider would
        otherwise mostly compute away."""
        if not spec.emulate_fp16:
            return self._verify(spec.check, reference, OnnxRuntimeBackend(path, provider="cpu"),
                                inputs, spec.precision, trained=trained)
        import onnx

        from ..export.fp16 import emulate_fp16
        from ..export.onnx_export import save_onnx

        with tempfile.TemporaryDirectory(dir=self.outdir, prefix=".fp16-emulated-") as folder:
            emulated = Path(folder) / "emulated.onnx"
            save_onnx(emulate_fp16(onnx.load(str(path))), emulated)
            report, message = self._verify(
                spec.check, reference, OnnxRuntimeBackend(emulated, provider="cpu"), inputs,
                spec.precision, trained=trained)
        return report, message + "\nfp16 rounding emulated on the CPU: each fp16 tensor " \
            "rounded to fp16, fp32 arithmetic (TensorRT's best case)"

    def export_from_onnx(self, onnx_path) -> dict:
        """Build (and check) the TensorRT engine for ``onnx_path`` on this machine and
        return the report; the engine goes to ``outdir``."""
        start = time.perf_counter()
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise ExportError(f"{onnx_path}: ONNX file not found")
        if self.engine == "no":
            raise ExportError("--from-onnx builds an engine; --engine no leaves nothing to do")
        self._prepare_outdir()
        meta = self._step("ONNX", lambda: self._read_onnx(onnx_path))
        inputs = None
        if self.verify:
            inputs = parity_inputs(meta["channels"], meta["size"],
                                   random_count=self.random_inputs, faces=self.face_crops,
                                   guided=len(meta["inputs"]) == 2)
        trained = meta["metadata"].get("trained", "true") != "false"
        reference = None
        if meta["precision"] == "fp16" and self.verify:
            reference = self._fp32_reference(onnx_path)
        engine_meta = self._engine_steps(onnx_path, inputs, trained=trained,
                                         reference=reference)
        new = self._new_report(engine_meta)
        onnx_sha = sha256_file(onnx_path)
        old = self._export_report_of(onnx_path, onnx_sha)
        if old is None:
            new.update({"source": {"onnx": str(onnx_path), "onnx_sha256": onnx_sha},
                        "model": meta["metadata"], "inputs": meta["inputs"],
                        "outputs": meta["outputs"], "files": self._file_entries()})
            report = self._write_report(new, start)
        else:
            report = self._write_report(merge_engine_build(old, new, self._file_entries()),
                                        start, merged=True)
        self._summary(report)
        return report

    # -- steps ---------------------------------------------------------------------------

    def _prepare_outdir(self) -> None:
        if self.outdir.exists() and not self.outdir.is_dir():
            raise ExportError(f"{self.outdir}: exists and is not a folder")
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.outdir):
                pass
        except OSError as exc:
            raise ExportError(f"{self.outdir}: cannot write to the output folder "
                              f"({exc.strerror or exc})") from None

    def _load(self, weights):
        if isinstance(weights, torch.nn.Module):
            model, source = weights.eval(), "model given"
            if self.bn_mode is not None and self.bn_mode != model_info(model).bn_mode:
                model = copy.deepcopy(model)  # the caller's model keeps its mode
                set_bn_mode(model, self.bn_mode)
                if getattr(model, "info", None) is not None:
                    model.info.bn_mode = self.bn_mode
        else:
            model = load_model(weights, bn_mode=self.bn_mode)
            source = str(weights) if weights is not None else "package default"
        info = model_info(model)
        trained = "trained" if info.trained else "untrained"
        return model, (f"{source}: {info.architecture}, {count_parameters(model):,} "
                       f"parameters, {trained}, batch norm {info.bn_mode}")

    def _export_onnx(self, model, path: Path, metadata: dict):
        graph = export_onnx(model, path, max_batch=self.max_batch, opset=self.opset,
                            metadata=metadata)
        counts = ", ".join(f"{graph.op_counts.get(op, 0)} {op}" for op in
                           ("Conv", "InstanceNormalization") if graph.op_counts.get(op))
        folded = (f", {graph.folded_batch_norms} batch norms folded, "
                  f"{graph.affine_batch_norms} as Mul+Add" if graph.bn_mode == "running" else "")
        return graph, (f"opset {graph.opset}, batch 1..{graph.max_batch}, {counts}{folded}, "
                       f"{_size(path)}")

    def _export_fp16(self, src: Path, dst: Path):
        from ..export.fp16 import export_fp16

        summary = export_fp16(src, dst)
        kept = ", ".join(f"{n} {op}" for op, n in sorted(summary.fp32_ops.items()))
        return summary, (f"{summary.fp16_nodes} nodes fp16, kept fp32: {kept or 'none'}; "
                         f"{summary.casts_added} casts, {_size(dst)}")

    def _read_onnx(self, path: Path):
        import onnx

        try:
            proto = onnx.load(str(path))
        except Exception as exc:  # protobuf decode errors share no base class
            raise UnreadableOnnxError(f"{path}: not a readable ONNX file ({exc})",
                                      reason="onnx cannot parse it") from None
        from ..export.fp16 import graph_precision

        inputs, outputs = graph_io(proto)
        if len(inputs) not in (1, 2) or len(outputs) != 1 or len(inputs[0]["shape"]) != 4 \
                or (len(inputs) == 2 and inputs[1]["shape"][1:] != [68, 3]):
            raise ExportError(f"{path}: expected an (N, C, S, S) input (and (N, 68, 3) "
                              "landmarks for a landmark-guided model) and one output")
        shape = inputs[0]["shape"]
        meta = {"metadata": {p.key: p.value for p in proto.metadata_props},
                "precision": graph_precision(proto), "inputs": inputs, "outputs": outputs,
                "channels": int(shape[1]), "size": int(shape[2])}
        return meta, (f"{path.name}: {meta['precision']}, input {shape}, "
                      f"{_size(path)}, SHA-256 {sha256_file(path)[:12]}...")

    def _fp32_reference(self, onnx_path: Path):
        """``(name, backend)`` of the fp32 reference for the engine of the fp16 graph
        ``onnx_path``: the fp32 ``vrn.onnx`` beside it when the ``export.json`` there
        vouches for both (same SHA-256s), else the fp16 graph itself on ONNX Runtime's
        CPU provider (which computes most of it in fp32), with a note."""
        folder = onnx_path.parent
        try:
            files = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))["files"]
            fp32 = folder / ONNX_NAME
            if (files[onnx_path.name]["sha256"] == sha256_file(onnx_path)
                    and files[ONNX_NAME]["sha256"] == sha256_file(fp32)):
                return "ONNX fp32", OnnxRuntimeBackend(fp32, provider="cpu")
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.notes.append(f"TensorRT: the fp16 engine was checked against {onnx_path.name} "
                          f"on ONNX Runtime's CPU provider: no {ONNX_NAME} of the same "
                          f"export beside it (copy it and {REPORT_NAME} along for an fp32 "
                          "reference)")
        return "ONNX Runtime", OnnxRuntimeBackend(onnx_path, provider="cpu")

    def _verify(self, name, reference, candidate, inputs, precision, *, trained):
        report = check_parity(reference, candidate, inputs, name=name, precision=precision,
                              max_batch=self.max_batch,
                              enforced=trained or precision == "fp32")
        self.parity[name] = report
        table = format_table([report])
        if not report.passed and (report.enforced or not report.sane):
            raise ParityFailure(f"{name}: parity check failed ({report.criterion}); "
                                f"nothing was written under the final name\n{table}",
                                report, table)
        if not report.passed:
            self.notes.append(f"{name}: below the target {report.criterion} (IoU "
                              f"{report.gate_iou:.5f}), accepted because the weights are "
                              "untrained: their volume hovers around 0.5, where tiny "
                              "differences flip occupancy")
        verdict = "pass" if report.passed else "below target, untrained weights"
        return report, self._parity_line(report, verdict, table)

    @staticmethod
    def _parity_line(report: ParityReport, verdict: str, table: str) -> str:
        gate = f", gate IoU {report.gate_iou:.5f}" if report.precision == "fp16" else ""
        return (f"max |diff| {report.max_abs:.2e}, mean |diff| {report.mean_abs:.2e}, "
                f"min IoU {report.min_iou:.5f}{gate}: {verdict}\n{table}")

    def _attempt(self, target: str, fn: Callable):
        """Run the steps of one output target and return ``fn()``'s result; on failure
        record it, print it in one line (details indented below) and return
        ``_FAILED``, so the targets that do not need this one still complete."""
        try:
            return fn()
        except (VRNError, OSError) as exc:
            message = str(exc) if isinstance(exc, VRNError) else (
                f"{exc.filename}: {exc.strerror}" if exc.filename else
                f"{type(exc).__name__}: {exc}")
            first, _, details = message.partition("\n")
            self.failed.append({"target": target, "error": first})
            print(f"{target:<14} {'':>8}  FAILED: {first}", file=self.out)
            if details:
                print("\n".join(f"    {line}" for line in details.splitlines()),
                      file=self.out)
            return _FAILED

    def _skipped(self, target: str, reason: str) -> None:
        self.failed.append({"target": target, "error": f"skipped: {reason}"})
        print(f"{target:<14} {'':>8}  skipped: {reason}", file=self.out)

    def _raise_if_strict(self) -> None:
        if self.strict and self.failed:
            names = ", ".join(item["target"] for item in self.failed)
            raise ExportError(f"{len(self.failed)} target(s) failed ({names}); see above "
                              f"and {self.outdir / REPORT_NAME}")

    def _landmark_steps(self, engine: bool) -> None:
        """The landmark stage's graph (``landmarks.onnx``) next to the VRN's, checked
        against PyTorch; with ``engine``, its fp32 TensorRT engine too, checked against
        ONNX Runtime. The checks run the landmark stage's own runners."""
        from ..export.landmark_onnx import export_landmark_onnx
        from ..model.landmark_net import load_landmark_regressor
        from ..runtime.landmarks import (OrtLandmarkRunner, TensorRTLandmarkRunner,
                                         TorchLandmarkRunner)

        model = load_landmark_regressor()
        path = self.outdir / LANDMARKS_ONNX_NAME
        crops = np.random.default_rng(0).uniform(-1, 1, (self.max_batch, 3, 120, 120))
        crops = crops.astype(np.float32)

        def export():
            with atomic_path(path) as tmp:
                export_landmark_onnx(model, tmp, opset=self.opset)
                message = f"batch 1..n, {_size(tmp)}"
                if self.verify:
                    message += ", " + _landmark_parity(
                        "ONNX vs PyTorch", TorchLandmarkRunner(model), OrtLandmarkRunner(tmp),
                        crops)
            self.files.append(path)
            return path, message

        if self._attempt(LANDMARKS_ONNX_NAME,
                         lambda: self._step("landmarks", export, slow=True)) is _FAILED:
            if engine:
                self._skipped("landmarks TRT", f"needs {LANDMARKS_ONNX_NAME}, which failed")
            return
        if not engine:
            return

        def build():
            engine_path = path.with_suffix(".engine")
            built, parity = self._publish_engine(
                path, engine_path, "fp32", lambda tmp: _landmark_parity(
                    "TensorRT vs ONNX Runtime", OrtLandmarkRunner(path),
                    TensorRTLandmarkRunner(tmp, device_id=self.device_id), crops))
            self.files += [engine_path, sidecar_path(engine_path)]
            return engine_path, (f"{engine_path.name}: built in {built.build_seconds:.1f} s, "
                                 f"{_size(engine_path)}" + (f", {parity}" if parity else ""))

        self._attempt("landmarks TRT", lambda: self._step("landmarks TRT", build, slow=True))

    def _engine_steps(self, onnx_path: Path, inputs, *, trained: bool, reference=None):
        """Build the engine for ``onnx_path`` per ``self.engine``; returns its metadata
        dict or ``None`` when no engine is built. ``reference``: the fp32 reference the
        engine of an fp16 graph is checked against (a runner, or ``(name, runner)``);
        default: the graph on ONNX Runtime."""
        if self.engine == "no":
            self.notes.append("TensorRT: skipped (--engine no)")
            return None
        from ..export.tensorrt_lib import import_tensorrt

        try:
            import_tensorrt()
            gpu = current_gpu(self.device_id)
            if gpu is None:
                raise BackendUnavailableError(f"no CUDA GPU {self.device_id} found on this "
                                              "machine")
        except BackendUnavailableError as exc:
            if self.engine == "yes":
                raise ExportError(f"cannot build a TensorRT engine: {exc}") from None
            self.notes.append(f"no TensorRT engine built here; build it on the target GPU "
                              f"with `vrn-export --from-onnx {onnx_path}`")
            print(f"{'TensorRT':<14} {'':>8}  skipped: {exc}", file=self.out)
            return None
        self._announce_check(gpu)
        engine_path = onnx_path.with_suffix(".engine")
        if engine_path.parent != self.outdir:
            engine_path = self.outdir / engine_path.name
        return self._step("TensorRT", lambda: self._build_and_verify(
            onnx_path, engine_path, inputs, trained=trained, reference=reference), slow=True)

    def _announce_check(self, gpu) -> None:
        """Say, before a build of minutes, what the engine's check will run on: the
        buffer provider the TensorRT backend will use (:class:`ExportError` at once when
        there is none, rather than after the build)."""
        where = f"{gpu.name} (cuda:{self.device_id})"
        if not self.verify:
            print(f"{'TensorRT':<14} {'':>8}  building on {where}; not checked (--no-verify)",
                  file=self.out)
            return
        try:
            buffers = cuda_arrays.device_buffers(self.device_id)
        except BackendUnavailableError as exc:
            raise ExportError(f"cannot check a TensorRT engine here ({exc}): install "
                              "numba-cuda (`pip install 'vrn-edge[gpu]'`) or torch with "
                              "CUDA, or pass --no-verify") from None
        line = f"building on {where}; its check runs on {cuda_arrays.describe_buffers(buffers)}"
        self.notes.append(f"TensorRT: {line}")
        print(f"{'TensorRT':<14} {'':>8}  {line}", file=self.out)

    def _build_and_verify(self, onnx_path: Path, engine_path: Path, inputs, *, trained,
                          reference=None):
        """The VRN's engine, checked on the TensorRT backend: an fp32 engine against its
        graph on the ONNX Runtime backend, an fp16 one against the fp32 reference."""
        import onnx

        from ..export.fp16 import graph_precision
        from ..runtime.backends.tensorrt_backend import TensorRTBackend

        precision = graph_precision(onnx.load(str(onnx_path)))
        if precision == "fp16" and reference is not None:
            ref_name, ref = reference if isinstance(reference, tuple) else ("PyTorch",
                                                                            reference)
        else:
            ref_name, ref = "ONNX Runtime", None  # made only when checking

        def check(tmp: Path) -> str:
            runner = ref if ref is not None else OnnxRuntimeBackend(onnx_path, provider="cpu")
            return self._verify(f"TensorRT {precision} vs {ref_name}", runner,
                                TensorRTBackend(tmp, device_id=self.device_id), inputs,
                                precision, trained=trained)[1]

        build, parity = self._publish_engine(onnx_path, engine_path, precision, check)
        self.files += [engine_path, sidecar_path(engine_path), build.timing_cache_path]
        layers = ", ".join(f"{n} {k}" for k, n in sorted(build.metadata.layer_precisions.items()))
        cache = "reused" if build.timing_cache_reused else "new"
        return build.metadata, (f"{engine_path.name}: TensorRT {build.metadata.tensorrt_version} "
                                f"on {build.metadata.gpu_name}, built in "
                                f"{build.build_seconds:.1f} s, layers {layers}, timing cache "
                                f"{cache}, {_size(engine_path)}"
                                + (f"\nparity: {parity}" if parity else ""))

    def _publish_engine(self, onnx_path: Path, engine_path: Path, precision: str,
                        check: Callable[[Path], str]):
        """Build ``engine_path`` from ``onnx_path`` into a temporary file, run
        ``check(tmp) -> message`` on it (when verifying), and only then rename it into
        place with its sidecar; ``(EngineBuild, message)``. An engine that misses its
        parity target is kept as ``<engine>.rejected`` (:meth:`_reject`), or published
        anyway with ``accept_parity``."""
        from ..export.tensorrt_build import build_engine

        message = ""
        with atomic_path(engine_path) as tmp:
            try:
                build = build_engine(onnx_path, tmp, max_batch=self.max_batch,
                                     opt_batch=min(self.opt_batch, self.max_batch),
                                     workspace_gb=self.workspace_gb, precision=precision,
                                     timing_cache=self.outdir / "timing.cache",
                                     device_id=self.device_id)
                if self.verify:
                    try:
                        message = check(tmp)
                    except ParityFailure as failure:
                        if not self.accept_parity:
                            self._reject(tmp, engine_path, build, failure)
                        message = self._accept(failure)
            finally:
                sidecar_path(tmp).unlink(missing_ok=True)
        write_text_atomic(sidecar_path(engine_path), build.metadata.to_json())
        self._remove_rejected(engine_path)
        return build, message

    def _reject(self, tmp: Path, engine_path: Path, build, failure: ParityFailure):
        """Keep the engine that failed its check as ``<engine>.rejected``, with its
        sidecar and its parity report beside it, and raise :class:`ExportError`."""
        rejected = engine_path.with_name(engine_path.name + REJECTED_SUFFIX)
        os.replace(tmp, rejected)
        write_text_atomic(sidecar_path(rejected), build.metadata.to_json())
        report_path = rejected.with_name(rejected.name + PARITY_SUFFIX)
        write_text_atomic(report_path, json.dumps(
            {"engine": rejected.name, **failure.report.to_dict(), "table": failure.table},
            indent=2, default=_json_default) + "\n")
        self.files += [rejected, sidecar_path(rejected), report_path]
        report = failure.report
        raise ExportError(f"{report.name}: parity check failed ({report.criterion}); the "
                          f"engine is kept as {rejected.name}, its parity report in "
                          f"{report_path.name}; --accept-parity publishes it under its own "
                          f"name\n{failure.table}")

    def _accept(self, failure: ParityFailure) -> str:
        """Publish an engine that missed its target (``accept_parity``): recorded in
        the report and the notes."""
        report = failure.report
        report.accepted = True
        self.notes.append(f"{report.name}: below the target ({report.criterion}; gate IoU "
                          f"{report.gate_iou:.5f}), published anyway because of "
                          "--accept-parity")
        return self._parity_line(report, "FAILED, kept with --accept-parity",
                                 format_table([report]))

    def _remove_rejected(self, engine_path: Path) -> None:
        """Remove a ``.rejected`` engine left by an earlier run once a checked (or
        accepted) engine is published under the name."""
        rejected = engine_path.with_name(engine_path.name + REJECTED_SUFFIX)
        for path in (rejected, sidecar_path(rejected),
                     rejected.with_name(rejected.name + PARITY_SUFFIX)):
            path.unlink(missing_ok=True)

    # -- reporting -----------------------------------------------------------------------

    def _step(self, name: str, fn: Callable, *, slow: bool = False):
        """Run one step: ``fn()`` returns ``(result, message)``; print
        ``name  seconds  message`` (further lines of the message indented below) and
        record it. Slow steps show a spinner."""
        start = time.perf_counter()
        try:
            with _spinner(f"{name}: running", enabled=slow and self.progress):
                result, message = fn()
        except VRNError:
            raise
        except (ValueError, RuntimeError) as exc:
            raise ExportError(f"{name}: {exc}") from exc
        seconds = time.perf_counter() - start
        first, _, details = message.partition("\n")
        self.steps.append({"step": name, "seconds": round(seconds, 3), "result": first})
        print(f"{name:<14} {seconds:6.1f} s  {first}", file=self.out)
        if details:
            print("\n".join(f"    {line}" for line in details.splitlines()), file=self.out)
        return result

    def _new_report(self, engine) -> dict:
        """The ``export.json`` fields every run writes: format, time, versions, GPU,
        options, steps, parity figures, ``engine`` (an
        :class:`~vrn.export.engine_file.EngineMetadata`, or ``None``), failed targets and
        notes."""
        return {
            "format": REPORT_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "gpu": _gpu(self.device_id),
            "options": {"fp16": self.fp16, "max_batch": self.max_batch,
                        "opt_batch": self.opt_batch, "opset": self.opset,
                        "workspace_gb": self.workspace_gb, "engine": self.engine,
                        "bn_mode": self.bn_mode, "verify": self.verify,
                        "accept_parity": self.accept_parity, "device_id": self.device_id},
            "batch": {"min": 1, "opt": self.opt_batch, "max": self.max_batch},
            "steps": self.steps,
            "parity": {name: rep.to_dict() for name, rep in self.parity.items()},
            "engine": None if engine is None else asdict(engine),
            "failed": self.failed,
            "notes": self.notes,
        }

    def _model_report(self, model, weights, graph) -> dict:
        """The fields of an export from weights: source, model description, the fp32
        graph's batch-norm mode, opset, op counts and interface, and the files."""
        info = model_info(model)
        inputs, outputs = graph_io_shapes(graph)
        return {
            "source": {"weights": None if weights is None or isinstance(
                weights, torch.nn.Module) else str(weights)},
            "model": {"architecture": info.architecture, "config": info.config.to_dict(),
                      "landmark_config": (info.landmark_config.to_dict()
                                          if info.landmark_config else None),
                      "parameters": count_parameters(model), "trained": info.trained,
                      "provenance": info.provenance, "color_order": info.color_order,
                      "input_range": info.input_range, "z_scale": info.z_scale},
            "bn_mode": graph.bn_mode, "opset": graph.opset, "op_counts": graph.op_counts,
            "inputs": inputs, "outputs": outputs, "files": self._file_entries(),
        }

    def _file_entries(self) -> dict:
        """``{name: {"bytes", "sha256"}}`` of the files written so far."""
        return {path.name: {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
                for path in self.files if path.is_file()}

    def _write_report(self, report: dict, start: float, *, merged: bool = False) -> dict:
        """Record the total time (in the ``engine_build`` part of a ``merged`` report),
        write ``export.json`` atomically, last, and return ``report``."""
        self.elapsed = round(time.perf_counter() - start, 3)
        (report["engine_build"] if merged else report)["total_seconds"] = self.elapsed
        write_text_atomic(self.outdir / REPORT_NAME,
                          json.dumps(report, indent=2, default=_json_default) + "\n")
        self.files.append(self.outdir / REPORT_NAME)
        return report

    def _export_report_of(self, onnx_path: Path, onnx_sha: str) -> dict | None:
        """The ``export.json`` in ``outdir`` when it is the report of the export that
        wrote ``onnx_path`` (same file name and SHA-256), else ``None``."""
        try:
            report = json.loads((self.outdir / REPORT_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
            return None
        entry = report.get("files", {}).get(onnx_path.name, {})
        return report if entry.get("sha256") == onnx_sha else None

    def _summary(self, report: dict) -> None:
        outcome = (f"{len(self.failed)} target(s) FAILED or skipped" if self.failed
                   else "done")
        print(f"\nvrn-export: {outcome} in {self.elapsed:.1f} s, wrote:", file=self.out)
        for path in self.files:
            print(f"  {str(path):<48} {_size(path):>9}", file=self.out)
        for item in self.failed:
            print(f"failed: {item['target']}: {item['error']}", file=self.out)
        for note in self.notes:
            print(f"note: {note}", file=self.out)
        vrn_files = [p for p in self.files if not p.name.startswith("landmarks")]
        engines = [p for p in vrn_files if p.suffix == ".engine"]
        onnx_files = [p for p in vrn_files if p.suffix == ".onnx"]
        print("next:", file=self.out)
        if engines:
            print(f"  vrn-live --engine {engines[0]}", file=self.out)
        if onnx_files:
            print(f"  vrn-live --weights {onnx_files[0]}    (ONNX Runtime)", file=self.out)
            print(f"  vrn-export --from-onnx {onnx_files[-1]}    (engine on a target GPU)",
                  file=self.out)


def merge_engine_build(old: dict, new: dict, files: dict) -> dict:
    """``old``, the ``export.json`` of the export that wrote the ONNX file, with the
    engine built from it by ``--from-onnx`` added: ``engine_build`` (time, versions,
    GPU, options, batch, steps of ``new``, the build's own report), its engine, parity
    figures, notes and ``files``; the export's own fields are kept."""
    old["engine_build"] = {k: new[k] for k in ("created", "versions", "gpu", "options",
                                               "batch", "steps")}
    old["engine"] = new["engine"]
    old["parity"] = {**old.get("parity", {}), **new["parity"]}
    old["notes"] = [*old.get("notes", []), *new["notes"]]
    old["files"] = {**old.get("files", {}), **files}
    return old


def graph_io_shapes(graph) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an :class:`~.onnx_export.OnnxExport` as report entries."""
    inputs = [{"name": graph.input_name, "shape": graph.input_shape, "dtype": "float32"}]
    if graph.landmarks_name:
        inputs.append({"name": graph.landmarks_name, "shape": [BATCH_DIM, 68, 3],
                       "dtype": "float32"})
    return (inputs,
            [{"name": graph.output_name, "shape": graph.output_shape, "dtype": "float32"}])


def _landmark_parity(name: str, reference, candidate, crops: np.ndarray) -> str:
    """Compare two landmark runners on ``crops`` ``(N, 3, 120, 120)``
    (:func:`.parity.landmark_difference`); :class:`ExportError` past
    :data:`~.parity.LANDMARKS_MAX_ABS_PX`."""
    diff = landmark_difference(reference, candidate, crops)
    if not diff < LANDMARKS_MAX_ABS_PX:
        raise ExportError(f"landmarks {name}: max |diff| {diff:.2e} px over "
                          f"{LANDMARKS_MAX_ABS_PX:g} px; nothing was written under the "
                          "final name")
    return f"{name} max |diff| {diff:.1e} px: pass"


def _versions() -> dict:
    """Versions of what made the files; ``onnxruntime`` is ``None`` where neither ONNX
    Runtime package is installed (only possible with ``--no-verify``), and
    ``onnxruntime_package`` names the one that is (``onnxruntime`` or
    ``onnxruntime-gpu``)."""
    from importlib import metadata

    import onnx
    import torch

    from .. import __version__
    from ..export.engine_file import installed_tensorrt_version

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    packages = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
            packages.append(name)
        except metadata.PackageNotFoundError:
            pass
    return {"vrn": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": ort_version,
            "onnxruntime_package": " + ".join(packages) or None,
            "numpy": np.__version__, "tensorrt": installed_tensorrt_version()}


def _gpu(device_id: int = 0) -> dict | None:
    gpu = current_gpu(device_id)
    return None if gpu is None else {"name": gpu.name,
                                     "compute_capability": gpu.compute_capability}


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _size(path: Path) -> str:
    size = Path(path).stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@contextlib.contextmanager
def _spinner(description: str, *, enabled: bool):
    """A tqdm line with the elapsed time, refreshed twice a second, on stderr."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    bar = tqdm(total=None, desc=description, bar_format="{desc} {elapsed}", leave=False,
               file=sys.stderr)
    stop = threading.Event()

    def tick():
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()
