"""Per-vertex mesh operations on the CPU: placing vertices in the photo and colouring
them from the crop. (Their CUDA twins are compared with these in
``test_marching_cubes_cudasim.py``.)"""

from __future__ import annotations

import numpy as np
import pytest

from vrn.kernels import marching_cubes, photo_z_scale, transform_vertices, vertex_colors


def similarity(scale=1.7, angle=0.3, shift=(120.25, -33.5)) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def test_transform_matches_the_affine_in_float64():
    rng = np.random.default_rng(0)
    vertices = rng.uniform(0, 192, (500, 3)).astype(np.float32)
    matrix = similarity()
    out = transform_vertices(vertices, matrix, z_scale=0.5)
    assert out.dtype == np.float32 and out.shape == vertices.shape
    v = vertices.astype(np.float64)
    expected_xy = v[:, :2] @ matrix[:, :2].T + matrix[:, 2]
    np.testing.assert_allclose(out[:, :2], expected_xy, rtol=0, atol=1e-4)
    np.testing.assert_allclose(out[:, 2], v[:, 2] * 0.5 * 1.7, rtol=1e-6)


def test_transform_identity_and_z_scale():
    vertices = np.array([[1.5, 2.0, 3.0], [0.0, 0.25, 8.0]], dtype=np.float32)
    out = transform_vertices(vertices, np.eye(2, 3), z_scale=0.5)
    assert np.array_equal(out[:, :2], vertices[:, :2])
    assert np.array_equal(out[:, 2], vertices[:, 2] * np.float32(0.5))
    assert photo_z_scale(np.eye(2, 3)) == 0.5
    assert photo_z_scale(similarity(scale=2.0), z_scale=1.0) == pytest.approx(2.0)
    # a reflection (negative determinant) still scales depth by sqrt(|det A|)
    assert photo_z_scale([[0, 3, 0], [3, 0, 0]], z_scale=0.5) == pytest.approx(1.5)


def test_transform_inverts_the_crop_warp():
    """Vertices of a crop cut with cv2.warpAffine(photo, photo_to_crop) land on the
    photo pixels the crop was sampled from."""
    cv2 = pytest.importorskip("cv2")
    photo_to_crop = similarity(scale=0.6, angle=-0.2, shift=(-40.0, 15.0))
    crop_to_photo = cv2.invertAffineTransform(photo_to_crop)
    rng = np.random.default_rng(1)
    photo_points = rng.uniform(100, 300, (50, 2))
    crop_points = photo_points @ photo_to_crop[:, :2].T + photo_to_crop[:, 2]
    vertices = np.column_stack([crop_points, np.zeros(50)]).astype(np.float32)
    out = transform_vertices(vertices, crop_to_photo)
    np.testing.assert_allclose(out[:, :2], photo_points, atol=1e-3)


def test_transform_writes_into_out():
    vertices = np.ones((4, 3), np.float32)
    out = np.empty((4, 3), np.float32)
    assert transform_vertices(vertices, similarity(), out=out) is out


@pytest.mark.parametrize("vertices, matrix, error", [
    (np.ones((4, 2), np.float32), np.eye(2, 3), ValueError),
    (np.ones((4, 3), np.float64), np.eye(2, 3), TypeError),
    (np.ones((4, 3), np.float32), np.eye(3), ValueError),
    (np.ones((4, 3), np.float32), [[1, 0, np.nan], [0, 1, 0]], ValueError),
])
def test_transform_rejects_bad_input(vertices, matrix, error):
    with pytest.raises(error):
        transform_vertices(vertices, matrix)


def test_colors_at_pixel_centres_and_between():
    crop = np.zeros((3, 4, 5), np.float32)
    crop[0] = np.arange(5, dtype=np.float32) / 4  # red ramps along x: 0, .25, .5, .75, 1
    crop[1] = (np.arange(4, dtype=np.float32) / 3)[:, None]  # green ramps along y
    crop[2, 2, 3] = 1.0  # one blue pixel
    vertices = np.array([[0, 0, 7], [4, 3, 0], [2, 1, 0], [3, 2, 5], [2.5, 1.5, 0],
                         [1.5, 0, 0]], dtype=np.float32)
    colors = vertex_colors(crop, vertices)
    assert colors.dtype == np.uint8 and colors.shape == (6, 3)
    assert colors[0].tolist() == [0, 0, 0]
    assert colors[1].tolist() == [255, 255, 0]
    assert colors[2].tolist() == [128, 85, 0]  # .5 * 255 = 127.5 rounds up; 1/3 -> 85
    assert colors[3].tolist() == [191, 170, 255]
    assert colors[4].tolist() == [159, 128, 64]  # blue: a quarter of the pixel
    assert colors[5].tolist() == [96, 0, 0]  # .375 * 255 = 95.6


def test_colors_clamp_outside_the_crop():
    crop = np.random.default_rng(2).random((3, 6, 7)).astype(np.float32)
    inside = np.array([[0, 0, 0], [6, 5, 0], [0, 5, 0], [6, 0, 0]], np.float32)
    outside = np.array([[-3, -1, 0], [9, 8, 0], [-0.5, 7, 0], [100, -100, 0]], np.float32)
    assert np.array_equal(vertex_colors(crop, outside), vertex_colors(crop, inside))
    expected = np.rint(crop[:, [0, 5, 5, 0], [0, 6, 0, 6]].T * 255).astype(np.uint8)
    assert np.array_equal(vertex_colors(crop, inside), expected)


def test_colors_of_non_finite_vertices_read_the_crop_edge():
    """NaN reads column or row 0 and infinities clamp: never a read outside the crop."""
    crop = np.random.default_rng(4).random((3, 6, 7)).astype(np.float32)
    odd = np.array([[np.nan, np.nan, 0], [np.inf, -np.inf, 0], [np.nan, 5, 0]], np.float32)
    edge = np.array([[0, 0, 0], [6, 0, 0], [0, 5, 0]], np.float32)
    assert np.array_equal(vertex_colors(crop, odd), vertex_colors(crop, edge))


def test_colors_match_a_float64_bilinear_reference():
    rng = np.random.default_rng(3)
    crop = rng.random((3, 32, 32)).astype(np.float32)
    vertices = rng.uniform(-1, 33, (2000, 3)).astype(np.float32)
    colors = vertex_colors(crop, vertices).astype(np.int64)
    x = np.clip(vertices[:, 0].astype(np.float64), 0, 31)
    y = np.clip(vertices[:, 1].astype(np.float64), 0, 31)
    x0, y0 = np.minimum(x.astype(int), 30), np.minimum(y.astype(int), 30)
    fx, fy = x - x0, y - y0
    c = crop.astype(np.float64)
    reference = ((1 - fy) * ((1 - fx) * c[:, y0, x0] + fx * c[:, y0, x0 + 1])
                 + fy * ((1 - fx) * c[:, y0 + 1, x0] + fx * c[:, y0 + 1, x0 + 1])).T * 255
    assert np.abs(colors - reference).max() <= 0.5 + 1e-3


def test_colors_of_a_marching_cubes_mesh():
    z, y, x = np.mgrid[:6, :16, :16].astype(np.float32)
    volume = (1 - np.hypot(x - 7.5, y - 7.5) / 10 - z / 20).astype(np.float32)
    vertices, _ = marching_cubes(volume, 0.5)
    crop = np.broadcast_to(np.array([0.2, 0.4, 0.6], np.float32)[:, None, None],
                           (3, 16, 16)).copy()
    colors = vertex_colors(crop, vertices)
    assert len(colors) == len(vertices) > 0
    assert np.all(colors == [51, 102, 153])
    out = np.empty_like(colors)
    assert vertex_colors(crop, vertices, out=out) is out


@pytest.mark.parametrize("crop, vertices, error", [
    (np.zeros((4, 8, 8), np.float32), np.zeros((2, 3), np.float32), ValueError),
    (np.zeros((8, 8, 3), np.float32), np.zeros((2, 3), np.float32), ValueError),
    (np.zeros((3, 8, 8), np.uint8), np.zeros((2, 3), np.float32), TypeError),
    (np.zeros((3, 8, 8), np.float32), np.zeros((2, 3), np.float64), TypeError),
])
def test_colors_reject_bad_input(crop, vertices, error):
    with pytest.raises(error):
        vertex_colors(crop, vertices)
