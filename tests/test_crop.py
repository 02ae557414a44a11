import numpy as np
import pytest

from vrn.runtime.crop import (CROP_SIZE, LANDMARK_EXTENT, crop_matrix, invert_affine,
                              landmarks_crop_matrix, points_to_crop, to_network_input,
                              warp_crop)


def apply(matrix, points):
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def test_points_to_crop_maps_xy_and_scales_z():
    s, t = 0.6, np.deg2rad(20)
    m = np.array([[s * np.cos(t), -s * np.sin(t), 12.0], [s * np.sin(t), s * np.cos(t), -7.0]])
    points = np.array([[100.0, 50.0, -4.0], [20.0, 80.0, 10.0]])
    out = points_to_crop(points, m)
    assert out.shape == (2, 3) and out.dtype == np.float64
    np.testing.assert_allclose(out[:, :2], apply(m, points[:, :2]), atol=1e-12)
    np.testing.assert_allclose(out[:, 2], s * points[:, 2], rtol=1e-12)


def test_pipeline_face_crops_of_the_sample_photo(sample_image):
    """The pipeline's crops (detection, landmarks, the landmark crop): the landmarks in
    crop pixels are centred and 90 pixels across, as the original rule puts them."""
    from vrn.runtime.pipeline import face_crops

    batch, landmarks = face_crops(sample_image)
    assert batch.shape == (1, 3, CROP_SIZE, CROP_SIZE) and batch.dtype == np.float32
    assert landmarks.shape == (1, 68, 3) and landmarks.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0 and batch.std() > 0.05
    xy = landmarks[0, :, :2].astype(np.float64)
    np.testing.assert_allclose(xy.mean(0), [(CROP_SIZE - 1) / 2] * 2, atol=1e-3)
    assert np.sqrt(np.prod(xy.max(0) - xy.min(0))) == pytest.approx(LANDMARK_EXTENT, rel=1e-4)
    small, small_landmarks = face_crops(sample_image, size=64)
    assert small.shape == (1, 3, 64, 64) and small_landmarks.shape == (1, 68, 3)
    empty, none = face_crops(np.zeros((240, 320, 3), np.uint8))
    assert empty.shape == (0, 3, CROP_SIZE, CROP_SIZE) and none.shape == (0, 68, 3)


def test_landmark_rule_matches_original_formula():
    rng = np.random.default_rng(0)
    pts = rng.uniform([100, 120], [260, 300], size=(68, 2))
    m = landmarks_crop_matrix(pts)
    scale = 90 / np.sqrt(np.prod(pts.max(0) - pts.min(0)))
    assert m[0, 0] == pytest.approx(scale)
    np.testing.assert_allclose(apply(m, [pts.mean(0)]), [[95.5, 95.5]], atol=1e-9)


def test_crop_and_back_mapping_round_trip():
    """A known similarity (scale, rotation, shift): crop pixels map back to the photo
    pixels they were sampled from."""
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    photo = np.ascontiguousarray(np.repeat(np.repeat(photo[::4, ::4], 4, 0), 4, 1)[:300, :400])
    s, t = 0.8, np.deg2rad(10)
    m = np.array([[s * np.cos(t), -s * np.sin(t), 20.0], [s * np.sin(t), s * np.cos(t), -35.0]])
    crop = warp_crop(photo, m)
    back = invert_affine(m)
    np.testing.assert_allclose(back @ np.append(m @ [150.0, 120.0, 1.0], 1.0), [150, 120],
                               atol=1e-9)
    # Crop pixel centres that land on photo block interiors have the photo's colour.
    ys, xs = np.mgrid[20:170:7, 20:170:7]
    crop_pts = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    photo_pts = apply(back, crop_pts)
    inside = ((photo_pts > 2) & (photo_pts < np.array([397, 297]))).all(1)
    frac = (photo_pts % 4)
    interior = inside & ((frac > 0.6) & (frac < 2.4)).all(1)
    assert interior.sum() > 50
    px = np.round(photo_pts[interior]).astype(int)
    cp = crop_pts[interior].astype(int)
    np.testing.assert_array_equal(crop[cp[:, 1], cp[:, 0]], photo[px[:, 1], px[:, 0]])


def test_to_network_input_layout():
    crops = np.zeros((2, 192, 192, 3), np.uint8)
    crops[1, 5, 7] = (255, 0, 51)
    x = to_network_input(crops)
    assert x.shape == (2, 3, 192, 192) and x.dtype == np.float32
    np.testing.assert_allclose(x[1, :, 5, 7], [1.0, 0.0, 0.2], atol=1e-7)


def test_bad_landmark_size():
    with pytest.raises(ValueError):
        crop_matrix((0.0, 0.0), 0.0)
