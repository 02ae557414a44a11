"""Voxelisation of crop-aligned meshes into VRN target volumes."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fake_bfm import grid_mesh
from vrn.data.bfm import crop_rotation
from vrn.data.voxelize import (FRONT_MARGIN, column_runs, front_depth, volume_from_runs,
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


def test_runs_are_exact_compact_form():
    v, t = _crop_mesh()
    runs = column_runs(v, t, thickness=25)
    assert runs.dtype == np.uint8 and runs.shape == (3, 2, 192, 192)
    np.testing.assert_array_equal(volume_from_runs(runs), voxelize(v, t, thickness=25))
    first = runs[0].astype(int)
    covered = first[1] > 0
    # No rotation: the fill runs along the camera axis, `thickness` voxels deep, one run.
    assert np.all(first[1][covered] - first[0][covered] == 25)
    assert not runs[1:].any()


def _yawed(v, degrees):
    """``v`` turned by ``degrees`` of yaw about its centroid, and that rotation."""
    r = crop_rotation(0.0, np.radians(degrees), 0.0)
    c = v.mean(0)
    return (v - c) @ r.T + c, r


def test_frontalised_fill_of_a_turned_plane():
    """A plane turned by 45 degrees, filled back 20 px along its own normal: a camera ray
    crosses the slab over 20 / cos(45) px, i.e. 56.6 voxels (a camera-axis fill: 40)."""
    vertices, t = grid_mesh(40, half_width=1.0)
    plane = np.stack([95.5 + 40 * vertices[:, 0], 95.5 - 40 * vertices[:, 1],
                      np.zeros(len(vertices))], 1)
    turned, r = _yawed(plane, 45)
    runs = column_runs(turned, t, rotation=r).astype(int)
    assert not runs[1:].any()  # a plane: one run per column
    inner = runs[0][:, 80:112, 82:110]  # columns whose ray leaves through the back face
    assert np.all(inner[1] > 0)
    np.testing.assert_allclose(np.median(inner[1] - inner[0]), 20 / np.cos(np.pi / 4) * 2,
                               atol=1.5)
    camera_axis = column_runs(turned, t).astype(int)[0][:, 80:112, 82:110]
    assert np.all(np.abs(camera_axis[1] - camera_axis[0] - 40) <= 1)


@pytest.mark.parametrize("yaw", [0.0, 40.0])
def test_round_trip_within_one_voxel(yaw):
    v, t = _crop_mesh()
    v, r = _yawed(v, yaw)
    vol = voxelize(v, t, rotation=r)
    mc_vertices, mc_faces = _isosurface(vol)
    z = front_depth(v, t)
    offset = 200 - 1 - FRONT_MARGIN - 2.0 * z[np.isfinite(z)].max()
    gt = np.stack([v[:, 0], v[:, 1], 2.0 * v[:, 2] + offset], 1)  # voxel units
    # The visible part (the camera z-buffer at the vertex) away from the rim walls.
    ix, iy = np.round(v[:, 0]).astype(int), np.round(v[:, 1]).astype(int)
    visible = v[:, 2] > z[iy, ix] - 0.5
    inner = visible & (np.abs(v[:, 0] - 95.5) < 45) & (np.abs(v[:, 1] - 95.5) < 60)
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
    runs = column_runs(v, t[keep])
    assert runs[0, 1, 96, 96] > runs[0, 0, 96, 96]


def test_bad_input():
    with pytest.raises(ValueError, match="vertices must be"):
        voxelize(np.zeros((4, 2)), np.zeros((1, 3), int))
    with pytest.raises(ValueError, match="thickness"):
        voxelize(np.zeros((3, 3)), np.array([[0, 1, 2]]), thickness=0)
    with pytest.raises(ValueError, match="rotation"):
        voxelize(*_crop_mesh(), rotation=np.ones((3, 3)))
    empty = voxelize(np.zeros((3, 3)), np.zeros((0, 3), int))
    assert not empty.any()


def test_bfm_sized_mesh_is_fast():
    v, t = _crop_mesh(n=196)  # 38,416 vertices, 76,050 triangles: BFM-face size
    v, r = _yawed(v, 60)
    column_runs(v, t, rotation=r)
    start = time.perf_counter()
    for _ in range(3):
        column_runs(v, t, rotation=r)
    per_mesh = (time.perf_counter() - start) / 3
    assert per_mesh < 0.25  # about 12 ms on an idle 2-core machine (bench: under 50 ms)
