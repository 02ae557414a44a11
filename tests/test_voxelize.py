"""Voxelisation of crop-aligned meshes into VRN target volumes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fake_bfm import grid_mesh
from vrn.data.voxelize import (FRONT_MARGIN, front_depth, top_map, volume_from_top,
                               voxelize)


def _crop_mesh(n=60, radius=70.0, height=30.0):
    """A bump over the crop centre, in crop pixels (x right, y down, z toward camera)."""
    vertices, tris = grid_mesh(n, half_width=1.0)
    v = np.empty_like(vertices)
    v[:, 0] = 95.5 + radius * vertices[:, 0]
    v[:, 1] = 95.5 - radius * vertices[:, 1]
    v[:, 2] = height * vertices[:, 2] / 30000.0
    return v, tris


def _isosurface(volume):
    from vrn.kernels import marching_cubes

    return marching_cubes(volume.astype(np.float32), level=0.5)


def test_volume_shape_convention_and_thickness():
    v, t = _crop_mesh()
    vol = voxelize(v, t, thickness=40)
    assert vol.shape == (200, 192, 192) and vol.dtype == bool
    centre = vol[:, 96, 96]
    occupied = np.flatnonzero(centre)
    # The nearest point sits at d = D - 1 - FRONT_MARGIN; 40 voxels are filled behind it.
    assert occupied.max() == 200 - 1 - FRONT_MARGIN
    assert len(occupied) == 40 and np.all(np.diff(occupied) == 1)
    assert not vol[:, 2, 2].any()  # outside the mesh's footprint
    # Larger d is nearer the camera: the rim of the bump is deeper (smaller d) than its top.
    assert np.flatnonzero(vol[:, 96, 40]).max() < occupied.max()


def test_top_map_is_exact_compact_form():
    v, t = _crop_mesh()
    top = top_map(v, t)
    assert top.dtype == np.uint8 and top.shape == (192, 192)
    np.testing.assert_array_equal(volume_from_top(top, thickness=25), voxelize(v, t, thickness=25))


def test_round_trip_within_one_voxel():
    v, t = _crop_mesh()
    vol = voxelize(v, t)
    mc_vertices, mc_faces = _isosurface(vol)
    z = front_depth(v, t)
    offset = 200 - 1 - FRONT_MARGIN - 2.0 * z[np.isfinite(z)].max()
    gt = np.stack([v[:, 0], v[:, 1], 2.0 * v[:, 2] + offset], 1)  # voxel units
    inner = np.hypot(v[:, 0] - 95.5, v[:, 1] - 95.5) < 60  # away from the rim walls
    from vrn.eval.nme import surface_distances

    dist = surface_distances(gt[inner], np.asarray(mc_vertices, np.float64), mc_faces)
    assert dist.max() <= 1.0
    assert dist.mean() < 0.5


def test_mouth_hole_is_filled():
    v, t = _crop_mesh()
    centre = np.hypot(v[:, 0] - 95.5, v[:, 1] - 95.5) < 12
    keep = ~centre[t].any(1)  # cut a hole in the middle
    z = front_depth(v, t[keep])
    assert not np.isfinite(z[96, 96])
    top = top_map(v, t[keep])
    assert top[96, 96] > 0


def test_bad_input():
    with pytest.raises(ValueError, match="vertices must be"):
        voxelize(np.zeros((4, 2)), np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="thickness"):
        voxelize(np.zeros((3, 3)), np.array([[0, 1, 2]]), thickness=0)
    empty = voxelize(np.zeros((3, 3)), np.zeros((0, 3), int))
    assert not empty.any()


def test_bfm_sized_mesh_is_fast():
    v, t = _crop_mesh(n=196)  # 38,416 vertices, 76,050 triangles: BFM-face size
    voxelize(v, t)
    start = time.perf_counter()
    for _ in range(3):
        voxelize(v, t)
    per_mesh = (time.perf_counter() - start) / 3
    assert per_mesh < 0.25  # about 20-40 ms on an idle 2-core machine
