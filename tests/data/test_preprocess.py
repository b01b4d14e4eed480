"""Tests of jaxvae.data.preprocess: masks, normalisation, resampling, alignment, way back."""

import numpy as np
import pytest

from jaxvae.base.errors import ConfigError, DataError
from jaxvae.data.preprocess import (
    PreprocessParams,
    SliceGeometry,
    area_matrix,
    brain_mask,
    linear_matrix,
    maps_to_volume,
    normalise,
    preprocess_volume,
)

EXACT = PreprocessParams(size=64, clip=1.5, drop_fraction=0.0, min_brain_pixels=0)


def dice(a, b):
    return 2 * np.sum(a & b) / (a.sum() + b.sum())


def phantom(background=0.0):
    """Non-square (100, 60, 40) volume: brain box x 10:90, y 5:55; bright lesion x 40:60, y 10:30.

    Returns (volume, brain, lesion).
    """
    rng = np.random.default_rng(0)
    vol = np.full((100, 60, 40), background, np.float32)
    brain = np.zeros(vol.shape, bool)
    brain[10:90, 5:55] = True
    lesion = np.zeros(vol.shape, bool)
    lesion[40:60, 10:30] = True
    vol[brain] = rng.normal(100, 5, brain.sum())
    vol[lesion] = 200
    return vol, brain, lesion


def test_area_matrix_by_hand():
    np.testing.assert_allclose(area_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(area_matrix(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    np.testing.assert_allclose(area_matrix(240, 64).sum(axis=1), 1)


def test_area_matrix_equals_supersampled_block_mean():
    # 240 -> 64 is a factor 3.75; repeating each pixel 16 times gives 3840 = 64 blocks of 60
    x = np.random.default_rng(1).normal(size=240)
    slow = np.repeat(x, 16).reshape(64, 60).mean(axis=1)
    np.testing.assert_allclose(area_matrix(240, 64) @ x, slow)


def test_linear_matrix_by_hand():
    # output centres at input coordinates -0.25, 0.25, 0.75, 1.25 (edges clamped)
    np.testing.assert_allclose(linear_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    np.testing.assert_allclose(linear_matrix(64, 240).sum(axis=1), 1)


def test_brain_mask_zero_background():
    vol, brain, _ = phantom()
    np.testing.assert_array_equal(brain_mask(vol), brain)


def test_brain_mask_minimum_valued_background_keeps_zero_brain_voxels():
    vol, brain, _ = phantom(background=-1000.0)
    vol[50, 40, 20] = 0.0  # a brain voxel that happens to be 0: still brain
    mask = brain_mask(vol)
    np.testing.assert_array_equal(mask, brain)
    assert mask[50, 40, 20]


def test_brain_mask_given_mask_is_used_and_checked():
    vol, brain, _ = phantom()
    given = np.zeros_like(brain)
    given[20:30, 20:30, 5:10] = True
    np.testing.assert_array_equal(brain_mask(vol, given), given)
    with pytest.raises(DataError, match="shape"):
        brain_mask(vol, given[:-1], name="case7.nii.gz")


def test_brain_mask_errors_name_the_file():
    noisy = np.random.default_rng(0).normal(size=(30, 30, 30))  # not skull-stripped
    with pytest.raises(DataError, match="skull-stripped") as err:
        brain_mask(noisy, name="head.nii.gz")
    assert "head.nii.gz" in str(err.value)
    with pytest.raises(DataError, match="empty brain") as err:
        brain_mask(np.zeros((30, 30, 30)), name="blank.nii.gz")
    assert "blank.nii.gz" in str(err.value)
    with pytest.raises(DataError, match="empty brain"):
        brain_mask(np.ones((30, 30, 30)), np.zeros((30, 30, 30), bool))


def test_normalise_zscore_inside_brain_background_zero_and_clip():
    vol, brain, _ = phantom(background=-5.0)
    z = normalise(vol, brain, clip=None)
    assert abs(z[brain].mean()) < 1e-5 and abs(z[brain].std() - 1) < 1e-5
    assert not z[~brain].any()
    c = normalise(vol, brain, clip=1.5)
    assert c.min() >= -1.5 and c.max() == 1.5  # the lesion saturates
    np.testing.assert_array_equal(c, np.clip(z, -1.5, 1.5))
    flat = np.where(brain, 3.0, 0.0)
    with pytest.raises(DataError, match="constant intensity") as err:
        normalise(flat, brain, name="flat.nii")
    assert "flat.nii" in str(err.value)


def test_resize_keeps_image_and_masks_aligned_by_hand():
    vol, _, lesion = phantom()
    images, brain64, lesion64, geo = preprocess_volume(vol, EXACT, lesion=lesion)
    assert images.shape == (40, 64, 64) and images.dtype == np.float32
    assert geo.pad == (0, 20) and geo.square == 100 and geo.slices == tuple(range(40))
    # lesion x [40, 60) -> [25.6, 38.4); y [10, 30) + pad 20 -> [19.2, 32) at scale 0.64
    expected = np.zeros((64, 64), bool)
    expected[26:38, 19:32] = True
    np.testing.assert_array_equal(lesion64[7], expected)
    # brain x [10, 90) -> [6.4, 57.6); y [25, 75) -> [16, 48): edge pixels >= half covered
    expected = np.zeros((64, 64), bool)
    expected[6:58, 16:48] = True
    np.testing.assert_array_equal(brain64[7], expected)
    # the image is saturated (clip 1.5) where the lesion covers the whole pixel, bright on
    # the resized lesion (>= half covered), and dark around it
    np.testing.assert_allclose(images[:, 26:38, 20:32], 1.5)
    assert images[:, lesion64[7]].min() > 0.5
    ring = np.zeros((64, 64), bool)
    ring[22:42, 14:36] = True
    ring[24:40, 17:34] = False
    assert images[:, ring].max() < 0.5
    assert images.min() >= -1.5 and images.max() <= 1.5
    assert not images[:, ~brain64[7]].any()  # these pixels hold no brain at all: exactly 0


def test_matches_slow_pad_then_resize():
    vol, _, _ = phantom()
    images, _, _, _ = preprocess_volume(vol, EXACT)
    z = normalise(vol, brain_mask(vol), 1.5)
    a = area_matrix(100, 64)
    for s in (0, 13, 39):
        square = np.pad(z[:, :, s], ((0, 0), (20, 20)))
        # images are float32 roundings of float64 values |v| <= 1.5: off by < 1e-7, a bound
        np.testing.assert_allclose(images[s], a @ square @ a.T, atol=1e-6)


def test_slice_selection_by_hand():
    vol = np.zeros((32, 32, 60), np.float32)
    vol[8:24, 8:24, 10:50] = np.random.default_rng(0).uniform(1, 2, (16, 16, 40))
    vol[8:24, 8:24, 40:50] = 0  # slices 40-49: a 2x2 brain speck only
    vol[14:16, 14:16, 40:50] = 1.5
    # brain extent z 10..49 (40 slices); 0.125 * 40 = 5 dropped at each end -> 15..44
    params = PreprocessParams(size=16, drop_fraction=0.125, min_brain_pixels=1)
    _, brain, _, geo = preprocess_volume(vol, params)
    assert geo.slices == tuple(range(15, 45)) and len(brain) == 30
    # 16x16 brain -> 8x8 = 64 pixels; the 2x2 speck -> 1 pixel: dropped by min_brain_pixels=2
    params = PreprocessParams(size=16, drop_fraction=0.125, min_brain_pixels=2)
    _, brain, _, geo = preprocess_volume(vol, params)
    assert geo.slices == tuple(range(15, 40))
    assert (brain.sum(axis=(1, 2)) == 64).all()
    with pytest.raises(DataError, match="no axial slice") as err:
        params = PreprocessParams(size=16, drop_fraction=0.125, min_brain_pixels=65)
        preprocess_volume(vol, params, name="tiny.nii")
    assert "tiny.nii" in str(err.value)


def test_lesion_optional_and_checked():
    vol, _, lesion = phantom()
    assert preprocess_volume(vol, EXACT)[2] is None
    with pytest.raises(DataError, match="lesion mask shape") as err:
        preprocess_volume(vol, EXACT, lesion=lesion[:, :, :-1], name="c1_t2.nii.gz")
    assert "c1_t2.nii.gz" in str(err.value)


def test_way_back_puts_lesion_map_near_native_lesion():
    vol, brain, lesion = phantom()
    params = PreprocessParams(size=64, clip=1.5, drop_fraction=0.125, min_brain_pixels=0)
    _, brain64, lesion64, geo = preprocess_volume(vol, params, lesion=lesion)
    assert geo.slices == tuple(range(5, 35))
    back = maps_to_volume(lesion64.astype(np.float32), geo)
    assert back.shape == vol.shape and back.dtype == np.float32
    kept = list(geo.slices)
    assert dice(back[:, :, kept] > 0.5, lesion[:, :, kept]) > 0.9
    assert not back[:, :, :5].any() and not back[:, :, 35:].any()  # dropped slices
    ones = maps_to_volume(np.ones_like(lesion64, np.float32), geo)
    np.testing.assert_allclose(ones[:, :, kept], 1, atol=1e-6)  # padding cropped, no fade
    masked = maps_to_volume(np.ones_like(lesion64, np.float32), geo, brain_native=brain)
    np.testing.assert_array_equal(masked > 0, brain & (ones > 0))
    with pytest.raises(ValueError, match="geometry"):
        maps_to_volume(lesion64[1:], geo)


def test_geometry_arrays_round_trip_and_params_checked():
    geo = SliceGeometry((100, 60, 40), (3, 4, 5), (0, 20), 100, 64)
    assert SliceGeometry.from_arrays(geo.to_arrays()) == geo
    for bad in ({"size": 0}, {"drop_fraction": 0.5}, {"clip": 0.0}, {"min_brain_pixels": -1}):
        with pytest.raises(ConfigError):
            PreprocessParams(**bad)


def test_crop_resizes_the_brain_box_and_the_way_back_inverts_it():
    # an off-centre ellipsoid brain in a wide field of view
    x, y, z = np.mgrid[:120, :100, :40]
    brain = ((x - 40) / 30.0) ** 2 + ((y - 60) / 22.0) ** 2 + ((z - 20) / 16.0) ** 2 < 1
    vol = np.where(brain, 100.0 + 10 * np.sin(x / 5.0) + y / 10.0, 0.0)
    whole = preprocess_volume(vol, PreprocessParams())
    crop = preprocess_volume(vol, PreprocessParams(crop=True))
    assert crop[1].mean() > 3 * whole[1].mean()  # the brain fills more of the cropped slice
    geo = crop[3]
    assert geo.pad == (-11, -31) and geo.square == 59  # box x 11..69 (the longer), y 39..81
    back = maps_to_volume(np.ones_like(crop[0]), geo)
    kept = list(geo.slices)
    box = back[:, :, kept] > 0
    xs, ys = np.flatnonzero(box.any(axis=(1, 2))), np.flatnonzero(box.any(axis=(0, 2)))
    assert (xs[0], xs[-1]) == (11, 69) and (ys[0], ys[-1]) == (31, 89)  # the square, no more
    np.testing.assert_allclose(back[:, :, kept][box], 1.0, atol=1e-9)
    assert not back[:, :, [i for i in range(40) if i not in kept]].any()
    # the image itself, down and back up, lands where it came from
    img = maps_to_volume(crop[0], geo)
    ref = maps_to_volume(whole[0], whole[3])
    inner = brain & (back > 0)
    assert np.corrcoef(img[inner], ref[inner])[0, 1] > 0.95
