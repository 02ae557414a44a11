"""``vrn-bench``: per-stage latency of the whole per-frame pipeline for every backend,
precision and batch size this machine can run, with reference implementations."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..errors import VRNError
from .command import run_command


def _csv(kind):
    def parse(text: str):
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            return tuple(kind(item) for item in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"cannot read {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    from ..bench.plan import BACKENDS, MODELS, PRECISIONS, BenchSettings

    defaults = BenchSettings()
    p = argparse.ArgumentParser(
        prog="vrn-bench",
        description="Time every stage of the per-frame pipeline (decode, detect, "
                    "landmarks, crop, infer, isosurface, colour, render) for each backend "
                    "x precision x batch this machine can run, beside PyTorch eager fp32, "
                    "skimage and PyMCubes. Prints a Markdown report; --json for machines.",
        epilog="OMP_WAIT_POLICY is set to PASSIVE unless the environment sets it: "
               "spinning OpenMP threads make eager PyTorch tens of times slower on a "
               "busy CPU. The system block of the report records it.")
    p.add_argument("--backends", type=_csv(str), default=defaults.backends,
                   help=f"comma-separated, from {','.join(BACKENDS)} (default: all; "
                        "PyTorch fp32 always runs as the reference)")
    p.add_argument("--precisions", type=_csv(str), default=defaults.precisions,
                   help=f"comma-separated, from {','.join(PRECISIONS)}; int8 means both "
                        f"int8 recipes (default: {','.join(defaults.precisions)})")
    p.add_argument("--batch", type=_csv(int), default=defaults.batches, dest="batches",
                   help="comma-separated batch sizes: faces per frame (default: 1)")
    p.add_argument("--frames", type=int, default=defaults.frames,
                   help=f"timed frames per configuration and batch (default: {defaults.frames})")
    p.add_argument("--warmup", type=int, default=defaults.warmup,
                   help=f"untimed frames first (default: {defaults.warmup})")
    p.add_argument("--source", metavar="IMAGE|VIDEO",
                   help="frames to time (default: the bundled sample photo)")
    p.add_argument("--model", choices=MODELS, default=defaults.model,
                   help="default: the package's default model; full: a seeded random "
                        "initialisation of the released 19M-parameter architecture "
                        "(timing does not depend on weight values)")
    p.add_argument("--weights", metavar="PATH", help=".t7 or .safetensors weights "
                                                     "(overrides --model)")
    p.add_argument("--validate-with", action="append", default=[], metavar="IMAGE_OR_DIR",
                   help="more face photos for the IoU check of reduced precisions and the "
                        "int8 calibration (repeatable; the sample photo is always used)")
    p.add_argument("--json", metavar="OUT.json",
                   help="write the full report as JSON ('-' for stdout); a folder gets "
                        "<date>-<machine>.json")
    p.add_argument("--markdown", nargs="?", const="-", metavar="OUT.md",
                   help="write the Markdown report to OUT.md instead of stdout (it is "
                        "printed unless --json -)")
    p.add_argument("--plot", metavar="OUT.png", help="per-stage latency plot (matplotlib)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where exported ONNX (VRN and landmark) and int8 graphs are cached "
                        "(default: $VRN_CACHE_DIR or ~/.cache/vrn-edge)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--results-md", nargs="?", const="benchmarks", metavar="DIR",
                   help="measure nothing: regenerate DIR/RESULTS.md (default DIR: "
                        "benchmarks) and its plots from DIR/results/*.json")
    return p


def main(argv: list[str] | None = None) -> int:
    from ..runtime.threads import prefer_passive_openmp

    # First, before anything loads torch (vrn.bench does): without it, idle OpenMP
    # threads spin, and on a shared CPU eager PyTorch, the reference every ratio is taken
    # against, runs tens of times slower. An explicit setting is kept.
    prefer_passive_openmp()
    parser = build_parser()
    return run_command("vrn-bench", parser, lambda args: _run(args, parser), argv)


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..bench import report as reporting
    from ..bench.runner import BenchSettings, run_benchmark

    if args.results_md:
        try:
            path = reporting.write_results_md(args.results_md)
        except (FileNotFoundError, ValueError) as exc:
            print(f"vrn-bench: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {path}")
        return 0
    from ..runtime.threads import configure_threads

    configure_threads()  # the thread budget vrn-live runs under
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install vrn-edge[bench]")
    try:
        settings = BenchSettings(
            backends=args.backends, precisions=args.precisions, batches=args.batches,
            frames=args.frames, warmup=args.warmup, source=args.source, model=args.model,
            weights=args.weights, validate_with=tuple(args.validate_with),
            cache_dir=args.cache_dir, progress=not args.no_progress)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        report = run_benchmark(settings)
    except (VRNError, FileNotFoundError) as exc:
        print(f"vrn-bench: {exc}", file=sys.stderr)
        return 1
    written = []
    if args.json == "-":
        import json

        print(json.dumps(report, indent=1))
    elif args.json:
        target = Path(args.json)
        if target.is_dir() or args.json.endswith(("/", "\\")):
            target.mkdir(parents=True, exist_ok=True)
            target = target / reporting.result_file_name(report)
        written.append(reporting.write_json(report, target))
    if args.plot:
        written.append(reporting.plot_stages(report, args.plot))
    text = reporting.markdown_report(report, plot=args.plot)
    if args.markdown and args.markdown != "-":
        from ..atomic import write_text_atomic

        written.append(write_text_atomic(args.markdown, text))
    elif args.json != "-":
        print(text)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
