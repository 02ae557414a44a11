"""2D 68-landmark NME of the landmark stage on the AFLW2000-3D sample in
``../shared/data/aflw2000-sample`` (development data, not shipped), and a grid search of
the detector-box constants (``BOX_SHIFT``, ``BOX_SCALE`` in :mod:`vrn.runtime.landmarks`)
for YuNet.

NME as in 3DDFA_V2: mean point-to-point 2D error over the 68 landmarks divided by the
square root of the area of the ground-truth landmarks' bounding box.

Usage::

    python tools/eval_landmarks_aflw.py [--data DIR] [--yunet MODEL.onnx] [--grid]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vrn.runtime.detect import FaceBox, YuNetFaceDetector  # noqa: E402
from vrn.image_io import load_image  # noqa: E402
from vrn.metrics import repeat  # noqa: E402
from vrn.runtime.landmarks import (BOX_SCALE, BOX_SHIFT, LandmarkStage,  # noqa: E402
                                   box_to_crop_box, landmarks_to_crop_box)

SHARED = ROOT.parent / "shared" / "data"


def nme_2d(pred: np.ndarray, gt: np.ndarray) -> float:
    """NME of ``pred`` ``(68, 2+)`` against ``gt`` ``(68, 2+)`` (photo pixels)."""
    lo, hi = gt[:, :2].min(axis=0), gt[:, :2].max(axis=0)
    norm = np.sqrt(np.prod(hi - lo))
    return float(np.linalg.norm(pred[:, :2] - gt[:, :2], axis=1).mean() / norm)


def load_samples(folder: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, image (H, W, 3) uint8 RGB, pt3d_68 (68, 3))`` per sample."""
    from scipy.io import loadmat

    out = []
    for mat in sorted(folder.glob("*.mat")):
        gt = loadmat(str(mat))["pt3d_68"].T.astype(np.float64)
        out.append((mat.stem, load_image(mat.with_suffix(".jpg")), gt))
    return out


def jittered(crop_box: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    """Crop boxes ``(J, 4)``: ``crop_box`` moved by ``jitter[:, :2]`` and scaled by
    ``1 + jitter[:, 2]``, all in units of its side."""
    centre, side = (crop_box[:2] + crop_box[2:]) / 2, crop_box[2] - crop_box[0]
    c = centre + side * jitter[:, :2]
    half = side * (1 + jitter[:, 2:]) / 2
    return np.concatenate([c - half, c + half], axis=1)


def evaluate(stage: LandmarkStage, samples, boxes_for,
             jitter: np.ndarray | None = None) -> tuple[float, float]:
    """Mean NME ``(single pass, refined)`` with crop boxes from ``boxes_for(i)``;
    with ``jitter`` ``(J, 3)``, averaged over that many perturbed boxes per image (a
    smoother estimate of how the error depends on the framing)."""
    single, refined = [], []
    for i, (_, image, gt) in enumerate(samples):
        boxes = boxes_for(i)[None] if jitter is None else jittered(boxes_for(i), jitter)
        first = stage.from_crop_boxes(image, boxes)
        second = stage.from_crop_boxes(image, np.stack([landmarks_to_crop_box(p)
                                                        for p in first]))
        single.append(np.mean([nme_2d(p, gt) for p in first]))
        refined.append(np.mean([nme_2d(p, gt) for p in second]))
    return float(np.mean(single)), float(np.mean(refined))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED / "aflw2000-sample")
    parser.add_argument("--yunet", type=Path, default=None,
                        help="YuNet model (default: the shipped one)")
    parser.add_argument("--grid", action="store_true",
                        help="grid of the YuNet constants (jitter-averaged NME)")
    args = parser.parse_args(argv)
    samples = load_samples(args.data)
    stage = LandmarkStage("torch", refine=False)
    print(f"{len(samples)} samples; {stage.describe()}")

    # 32 fixed perturbations of up to 3% of the side in position and size.
    jitter = np.random.default_rng(1).uniform(-0.03, 0.03, size=(32, 3))
    gt_boxes = [landmarks_to_crop_box(gt) for _, _, gt in samples]
    single, refined = evaluate(stage, samples, lambda i: gt_boxes[i])
    print(f"GT-landmark crop box:        single {100 * single:.2f}%  "
          f"refined {100 * refined:.2f}%")

    detector = YuNetFaceDetector(args.yunet)  # None: the shipped model
    faces: list[FaceBox] = []
    for name, image, _ in samples:
        found = detector(image)
        if not found:
            raise SystemExit(f"{name}: YuNet found no face")
        faces.append(max(found, key=lambda b: b.score))
    for label, (shift, scale) in (("original 0.14/1.58", (0.14, 1.58)),
                                  (f"current {BOX_SHIFT}/{BOX_SCALE}", (BOX_SHIFT, BOX_SCALE))):
        def boxes_for(i, shift=shift, scale=scale):
            return box_to_crop_box(faces[i], shift=shift, scale=scale)

        result = evaluate(stage, samples, boxes_for) + evaluate(stage, samples, boxes_for,
                                                                jitter)
        print(f"YuNet box, {label:22s} single %.2f%%  refined %.2f%%  "
              "(jitter-averaged %.2f%%, %.2f%%)" % tuple(100 * v for v in result))

    if args.grid:
        print("jitter-averaged NME %, single / refined; rows shift, columns scale")
        scales = (1.15, 1.2, 1.25, 1.3, 1.35, 1.45, 1.58)
        print("        " + " ".join(f"{scale:^11.2f}" for scale in scales))
        for shift in (-0.05, 0.0, 0.05, 0.1, 0.15, 0.2):
            cells = []
            for scale in scales:
                def boxes_for(i, shift=shift, scale=scale):
                    return box_to_crop_box(faces[i], shift=shift, scale=scale)

                single, refined = evaluate(stage, samples, boxes_for, jitter)
                cells.append(f"{100 * single:.2f}/{100 * refined:.2f}")
            print(f"{shift:+.2f}   " + " ".join(cells))

    image = samples[0][1]
    for backend in ("torch", "onnxruntime"):
        timed = LandmarkStage(backend, refine=False)
        batch = np.zeros((1, 3, 120, 120), np.float32)
        forward = repeat(lambda timed=timed, batch=batch: timed._run(batch), runs=200,
                         warmup=20)
        full = repeat(lambda timed=timed: timed.from_crop_boxes(image, gt_boxes[0][None]),
                      runs=50)
        print(f"{timed.describe()}: forward {np.median(forward.wall_ms):.2f} ms, "
              f"crop + forward + mapping {np.median(full.wall_ms):.2f} ms (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
