"""Tests of jaxvae.core.augment: shapes, keys, neutral ranges, the resampling against scipy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi
from run_helpers import (
    images,
)

from jaxvae.core.augment import AugmentConfig, affine_resample, augment_batch

# --------------------------------------------------------------------------- augmentation


def test_augment_keeps_shape_dtype_and_depends_on_key_only():
    x = jnp.asarray(images(4))
    aug = AugmentConfig()
    a = augment_batch(jax.random.key(1), x, aug)
    b = augment_batch(jax.random.key(1), x, aug)
    c = augment_batch(jax.random.key(2), x, aug)
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # each image gets its own draw
    same = jnp.stack([x[0]] * 4)
    d = augment_batch(jax.random.key(1), same, aug)
    assert not np.allclose(d[0], d[1])


def test_augment_is_identity_when_ranges_are_neutral():
    x = jnp.asarray(images(4))
    np.testing.assert_array_equal(augment_batch(jax.random.key(0), x, AugmentConfig.neutral()), x)
    # the resampling path itself is exact at angle 0, scale 1, and an exact mirror
    np.testing.assert_array_equal(affine_resample(x[0], 0.0, 1.0, False), x[0])
    np.testing.assert_array_equal(affine_resample(x[0], 0.0, 1.0, True), x[0, :, ::-1])
    mirror = dataclasses.replace(AugmentConfig.neutral(), mirror_prob=1.0)
    np.testing.assert_array_equal(augment_batch(jax.random.key(0), x, mirror), x[:, :, ::-1])


@pytest.mark.parametrize("angle,scale,flip", [(0.1, 1.0, False), (-0.07, 1.15, True),
                                              (0.0, 0.9, False)])
def test_affine_resample_matches_scipy(angle, scale, flip):
    x = images(1)[0]
    c = np.array([31.5, 31.5])
    f = -1.0 if flip else 1.0
    m = np.array([[np.cos(angle), np.sin(angle)],
                  [-f * np.sin(angle), f * np.cos(angle)]]) / scale
    want = ndi.affine_transform(x.astype(np.float64), m, offset=c - m @ c, order=1,
                                mode="grid-constant", cval=0.0)
    got = affine_resample(jnp.asarray(x), angle, scale, flip)
    # float32 sample coordinates (up to ~64 px) are off by ~1e-5 px, and the bilinear slope
    # reaches max|x| per px at the zero border: atol 1e-4 * max|x| (measured error 2e-6 * max)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(x).max())
    if angle or scale != 1:
        assert not np.allclose(got, x)


def test_intensity_augmentations():
    x = jnp.asarray(images(8))
    neutral = AugmentConfig.neutral()
    bright = dataclasses.replace(neutral, brightness=(2.0, 2.0))
    np.testing.assert_allclose(augment_batch(jax.random.key(0), x, bright), 2 * x, rtol=1e-6)
    noisy = dataclasses.replace(neutral, noise_std=0.1)
    diff = augment_batch(jax.random.key(0), x, noisy) - x
    assert abs(float(jnp.std(diff)) - 0.1) < 0.005 and abs(float(jnp.mean(diff))) < 0.005
    contrast = dataclasses.replace(neutral, contrast=(0.5, 0.5))
    y = augment_batch(jax.random.key(0), x, contrast)
    np.testing.assert_allclose(jnp.std(y, axis=(1, 2)), 0.5 * jnp.std(x, axis=(1, 2)), rtol=1e-4)
