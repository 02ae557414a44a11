"""``vrn-convert``: the authors' Torch7 ``.t7`` weights to a vrn-edge checkpoint."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..errors import VRNError, WeightsError
from ..model.blocks import BN_MODES, BatchNorm2d
from ..model.checkpoint import save_checkpoint
from ..model.torch7 import load_torch7
from ..model.vrn import count_parameters
from .command import run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vrn-convert",
        description="Convert Torch7 VRN weights (vrn-unguided.t7) to a vrn-edge "
                    ".safetensors checkpoint. The .t7 is parsed as data only; nothing in "
                    "it is executed.")
    p.add_argument("input", metavar="IN.t7", help="Torch7 weights file")
    p.add_argument("-o", "--output", metavar="OUT.safetensors",
                   help="checkpoint to write (default: IN with the suffix .safetensors)")
    p.add_argument("--bn-mode", choices=BN_MODES, default="instance",
                   help="batch-norm mode stored in the checkpoint: 'instance' (per-image "
                        "statistics, how the released model was run; default) or "
                        "'running' (the stored running statistics)")
    p.add_argument("--fp16", action="store_true",
                   help="store the tensors as float16 (half the size; loaded as float32)")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_command("vrn-convert", build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    source = Path(args.input)
    output = Path(args.output) if args.output else source.with_suffix(".safetensors")
    try:
        if output.suffix.lower() != ".safetensors":
            raise WeightsError(f"{output}: the output must end in .safetensors")
        if output.resolve() == source.resolve():
            raise WeightsError(f"{output}: the output would overwrite the input")
        start = time.perf_counter()
        model = load_torch7(source, bn_mode=args.bn_mode)
        _check_default_eps(model, source)
        convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        norms = sum(isinstance(m, BatchNorm2d) for m in model.modules())
        print(f"Read {source}: VRN, {count_parameters(model):,} parameters "
              f"({convs} convolutions, {norms} batch norms) in "
              f"{time.perf_counter() - start:.1f} s")
        output.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, output, dtype=torch.float16 if args.fp16 else None)
    except VRNError as exc:
        print(f"vrn-convert: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"vrn-convert: error: {exc.filename or output}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    size_mb = output.stat().st_size / 1e6
    print(f"Wrote {output} ({size_mb:.1f} MB, {'float16' if args.fp16 else 'float32'}, "
          f"batch norm: {args.bn_mode})")
    print(f"Use it with: vrn-reconstruct PHOTO -o OUTDIR --weights {output}")
    return 0


def _check_default_eps(model: torch.nn.Module, source: Path) -> None:
    """The checkpoint format stores no batch-norm eps: refuse files that need another."""
    default = BatchNorm2d(1).eps
    for name, m in model.named_modules():
        if isinstance(m, BatchNorm2d) and m.eps != default:
            raise WeightsError(f"{source}: batch norm {name} has eps {m.eps:g}; vrn-edge "
                               f"checkpoints assume {default:g} (load the .t7 directly)")


if __name__ == "__main__":
    sys.exit(main())
