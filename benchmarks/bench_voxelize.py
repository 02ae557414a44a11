"""Voxelisation speed: ``python benchmarks/bench_voxelize.py [--bfm-face DIR] [--repeats 9]``.

Times :func:`vrn.data.voxelize.column_runs` (the paper's frontalised fill-back: two
z-buffer renders and a walk through the rotated slab) on BFM face meshes posed at
several yaws, beside the camera-axis fill of the same meshes (``rotation=None``: one
render, no frontal walk) in the same process. With the BFM basis and face region
(``--bfm``, ``--bfm-face`` or their environment variables) the mesh is the BFM
face (the mean face: 38,365 vertices, 76,073 triangles); without them, a bump of about
the same size.
Each figure is the median of ``--repeats`` runs after a warm-up (which compiles).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import numpy as np

from vrn.data.bfm import crop_rotation
from vrn.data.voxelize import column_runs
from vrn.metrics import repeat

YAWS = (0.0, 30.0, 60.0, 90.0)


def _bump(n: int = 168):
    u = np.linspace(-1.0, 1.0, n)
    x, y = np.meshgrid(u, u)
    z = 30.0 * np.exp(-2.0 * (x ** 2 + y ** 2))
    vertices = np.stack([95.5 + 60 * x.ravel(), 95.5 + 70 * y.ravel(), z.ravel()], 1)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    tris = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3),
                           np.stack([b, d, c], -1).reshape(-1, 3)])
    return vertices, tris, "bump"


def _frontal_mesh(args):
    """A frontal face mesh ``(vertices (V, 3) crop pixels, triangles, name)``."""
    from vrn.data.bfm import BFMNotFoundError, load_bfm

    try:
        bfm = load_bfm(args.bfm, args.bfm_face)
    except (BFMNotFoundError, FileNotFoundError):
        return _bump()
    v = bfm.mean * np.array([1.0, -1.0, 1.0])
    v = (v - v.mean(0)) * (140.0 / np.ptp(v[:, 1])) + np.array([95.5, 95.5, 0.0])
    return v, bfm.triangles, "BFM mean face"


def _median_ms(fn, repeats):
    return repeat(fn, runs=repeats).summary()["p50"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bfm", default=None)
    p.add_argument("--bfm-face", default=None)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    frontal, tris, name = _frontal_mesh(args)
    print(f"{name}: {len(frontal)} vertices, {len(tris)} triangles")
    print("yaw   frontalised fill-back   camera-axis fill   ratio")
    for yaw in YAWS:
        r = crop_rotation(0.0, np.radians(yaw), 0.0)
        c = frontal.mean(0)
        posed = (frontal - c) @ r.T + c
        ours = _median_ms(partial(column_runs, posed, tris, rotation=r), args.repeats)
        axis = _median_ms(partial(column_runs, posed, tris), args.repeats)
        print(f"{yaw:4.0f}  {ours:15.1f} ms  {axis:14.1f} ms  {ours / axis:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
