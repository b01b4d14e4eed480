"""Tests of jaxvae.core.noise: the DAE's coarse noise (its resolution, its standard deviation,
inside the brain only, a function of the key)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvae.core.noise import add_coarse_noise, brain_of, coarse_noise, upsampling_matrix


def test_upsampling_aligns_the_corners_and_keeps_constants():
    a = upsampling_matrix(64, 16)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-6)
    assert a[0, 0] == 1 and a[-1, -1] == 1  # the grid's corners are the image's corners
    assert np.allclose(upsampling_matrix(16, 16), np.eye(16))
    # linear along the axis: a ramp on the grid is a ramp on the image
    ramp = a @ np.arange(16, dtype=np.float32)
    np.testing.assert_allclose(np.diff(ramp), 15 / 63, rtol=1e-5)


def test_noise_at_full_resolution_is_white_with_the_given_std():
    n = coarse_noise(jax.random.key(0), (64, 32, 32, 2), resolution=32, std=0.2)
    assert n.shape == (64, 32, 32, 2)
    assert abs(float(n.std()) - 0.2) < 0.005 and abs(float(n.mean())) < 0.005
    # neighbours independent
    corr = np.corrcoef(np.asarray(n[:, :, :-1]).ravel(), np.asarray(n[:, :, 1:]).ravel())[0, 1]
    assert abs(corr) < 0.02


@pytest.mark.parametrize("resolution", [8, 16])
def test_coarse_noise_is_smooth_at_its_resolution(resolution):
    n = np.asarray(coarse_noise(jax.random.key(1), (32, 64, 64, 1), resolution=resolution,
                                std=0.2))
    corr = np.corrcoef(n[:, :, :-1].ravel(), n[:, :, 1:].ravel())[0, 1]
    step = (resolution - 1) / 63  # grid cells per pixel: neighbours nearly equal
    assert corr > 1 - 2 * step
    # the std is std at the grid's nodes and lower between them: overall between 2/3 and 1
    assert 0.2 * 0.66 < n.std() < 0.2
    # coarser noise is smoother
    if resolution == 8:
        finer = np.asarray(coarse_noise(jax.random.key(1), (32, 64, 64, 1), resolution=32))
        assert corr > np.corrcoef(finer[:, :, :-1].ravel(), finer[:, :, 1:].ravel())[0, 1]


def test_noise_is_added_inside_the_brain_only_and_depends_on_the_key_alone():
    x = jnp.zeros((4, 64, 64, 2)).at[:, 16:48, 20:44, :].set(1.0)
    y = add_coarse_noise(jax.random.key(2), x, resolution=16, std=0.2)
    brain = np.asarray(brain_of(x))
    assert np.all(np.asarray(y)[~brain] == 0)  # the background stays exactly 0
    assert np.abs(np.asarray(y - x)[brain]).mean() > 0.05
    np.testing.assert_array_equal(y, add_coarse_noise(jax.random.key(2), x))
    assert not np.array_equal(y, add_coarse_noise(jax.random.key(3), x))
    # image i's noise does not depend on the batch around it
    np.testing.assert_array_equal(coarse_noise(jax.random.key(2), (4, 64, 64, 2))[:2],
                                  coarse_noise(jax.random.key(2), (2, 64, 64, 2)))
