"""``vrn-export``: weights -> validated ONNX (fp32, optionally fp16) -> TensorRT engine.

    vrn-export [WEIGHTS] -o OUTDIR [--fp16] [--max-batch N] [--opt-batch N] [--opset K]
               [--workspace GB] [--engine auto|yes|no] [--bn-mode running|instance]
               [--device N] [--accept-parity] [--no-verify] [--strict]
    vrn-export --from-onnx OUTDIR/vrn.fp16.onnx [-o OUTDIR] [--max-batch N]
               [--opt-batch N] [--workspace GB] [--device N] [--accept-parity]
               [--no-verify]

The second form builds the engine on the target GPU from an ONNX file exported
elsewhere: engines are not portable between GPUs or TensorRT versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import VRNError
from ..model import BN_MODES
from .command import run_command

DESCRIPTION = ("Export VRN weights to a checked ONNX model (fp32, and fp16 with --fp16) and, "
               "where TensorRT and a GPU are present, a TensorRT engine for this GPU. "
               "Writes OUTDIR/vrn.onnx, OUTDIR/vrn.fp16.onnx, OUTDIR/vrn[.fp16].engine, "
               "OUTDIR/landmarks.onnx and OUTDIR/export.json (versions, hashes, shapes, "
               "parity figures, failed targets). A target that fails is reported and the "
               "others still complete; the exit code is 1 when vrn.onnx fails, or with "
               "--strict when any target fails.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vrn-export", description=DESCRIPTION)
    p.add_argument("weights", nargs="?", metavar="WEIGHTS",
                   help=".t7 or vrn-edge .safetensors weights (default: the package's "
                        "default model)")
    p.add_argument("-o", "--output", metavar="OUTDIR",
                   help="output folder (required unless --from-onnx, where it defaults to "
                        "the ONNX file's folder)")
    p.add_argument("--from-onnx", metavar="MODEL.onnx",
                   help="build the TensorRT engine for this ONNX file (exported elsewhere) "
                        "on this machine")
    p.add_argument("--fp16", action="store_true",
                   help="also write vrn.fp16.onnx (fp16 inside, fp32 input and output) and "
                        "build the engine from it")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="largest batch of the dynamic batch dimension and of the engine "
                        "profile (default: 4; with --from-onnx, the value stored in the file)")
    p.add_argument("--opt-batch", type=int, metavar="N",
                   help="the batch TensorRT tunes the engine's kernels for (default: 1, the "
                        "live pipeline's batch)")
    p.add_argument("--opset", type=int, metavar="K", help="ONNX opset (default: 20)")
    p.add_argument("--workspace", type=float, metavar="GB",
                   help="TensorRT builder workspace limit in GiB (default: TensorRT's)")
    p.add_argument("--engine", choices=("auto", "yes", "no"),
                   help="build a TensorRT engine: auto (when TensorRT and a GPU are here; "
                        "the default), yes (a missing TensorRT or GPU is then a failed target), no")
    p.add_argument("--bn-mode", choices=BN_MODES,
                   help="batch-norm mode to export: running (folded into the convolutions) "
                        "or instance (per-image statistics, InstanceNormalization); "
                        "default: the weights' own")
    p.add_argument("--device", type=int, default=0, metavar="N",
                   help="CUDA device to build and check the engine on (default: 0)")
    p.add_argument("--accept-parity", action="store_true",
                   help="publish an engine that fails its parity check under its own name "
                        "anyway (recorded in export.json); by default it is kept as "
                        "<engine>.rejected with its parity report beside it")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the parity checks against PyTorch / ONNX Runtime")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when any target fails (by default a failed fp16 graph, "
                        "engine or landmark file is reported and the others are kept; the "
                        "exit code is 1 only when vrn.onnx itself fails)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return run_command("vrn-export", parser, lambda args: _run(args, parser), argv)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..deploy.exporter import Exporter
    from ..deploy.parity import face_crop_variants
    from ..export.onnx_export import DEFAULT_MAX_BATCH, DEFAULT_OPSET
    from ..export.tensorrt_build import graph_max_batch

    try:
        if args.from_onnx:
            for flag, value in (("WEIGHTS", args.weights), ("--fp16", args.fp16 or None),
                                ("--opset", args.opset), ("--bn-mode", args.bn_mode)):
                if value is not None:
                    parser.error(f"{flag} does not apply to --from-onnx")
            if args.engine == "no":
                parser.error("--from-onnx builds an engine; --engine no leaves nothing to do")
            onnx_path = Path(args.from_onnx)
            if not onnx_path.is_file():
                raise VRNError(f"{onnx_path}: ONNX file not found")
            max_batch = args.max_batch or graph_max_batch(onnx_path)
            exporter = Exporter(args.output or onnx_path.parent, max_batch=max_batch,
                                opt_batch=args.opt_batch or 1, workspace_gb=args.workspace,
                                engine="yes", verify=not args.no_verify,
                                face_crops=face_crop_variants, device_id=args.device,
                                accept_parity=args.accept_parity)
            exporter.export_from_onnx(onnx_path)
        else:
            if not args.output:
                parser.error("-o/--output OUTDIR is required")
            exporter = Exporter(args.output, fp16=args.fp16,
                                max_batch=args.max_batch or DEFAULT_MAX_BATCH,
                                opt_batch=args.opt_batch or 1,
                                opset=args.opset or DEFAULT_OPSET, workspace_gb=args.workspace,
                                engine=args.engine or "auto", bn_mode=args.bn_mode,
                                verify=not args.no_verify, face_crops=face_crop_variants,
                                strict=args.strict, device_id=args.device,
                                accept_parity=args.accept_parity)
            report = exporter.export(args.weights)
            if report["failed"]:
                names = ", ".join(item["target"] for item in report["failed"])
                print(f"vrn-export: warning: {len(report['failed'])} target(s) failed "
                      f"({names}); the others were written (--strict makes this exit 1)",
                      file=sys.stderr)
    except (VRNError, ValueError, OSError) as exc:
        message = str(exc) if not isinstance(exc, OSError) or not exc.filename else (
            f"{exc.filename}: {exc.strerror}")
        print(f"vrn-export: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
