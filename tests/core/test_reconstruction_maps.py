"""Tests of jaxvae.core.reconstruction_maps: the DAE's maps against plain jax.grad, the
one-signed parts, the VAE-only maps refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvae.base.errors import ConfigError
from jaxvae.core.predictors import smooth, unsmoothed_name
from jaxvae.core.reconstruction_maps import RECONSTRUCTION_MAPS, reconstruction_maps
from jaxvae.core.unet import UNet, denoise, init_unet


@pytest.fixture(scope="module")
def setup():
    model = UNet(width=4, depth=3, in_channels=2)
    params = init_unet(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 64, 64, 2)) * 0.5
    return model, params, x


def test_rec_grad_is_plain_jax_grad_of_the_reconstruction_loss(setup):
    model, params, x = setup
    maps = reconstruction_maps(model, params, x, predictors=RECONSTRUCTION_MAPS,
                               smooth_sigma=0.0)
    loss = lambda v: 0.5 * jnp.sum((v - denoise(model, params, v)) ** 2)
    g = jax.jit(jax.grad(loss))(x)  # the batch sum: each image's own gradient
    np.testing.assert_allclose(maps["rec_grad"], jnp.abs(g).sum(-1), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(g).max()))
    np.testing.assert_allclose(maps["rec_grad_pos"], jnp.maximum(g, 0).sum(-1), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(g).max()))
    r = x - jax.jit(denoise, static_argnums=0)(model, params, x)  # another compiled program
    want = (r ** 2).sum(-1)
    np.testing.assert_allclose(maps["rec_error"], want, rtol=1e-4,
                               atol=1e-5 * float(want.max()))
    np.testing.assert_allclose(maps["rec_pos"] + maps["rec_neg"], maps["rec_error"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(maps["rec_grad_pos"] + maps["rec_grad_neg"], maps["rec_grad"],
                               rtol=1e-5, atol=1e-6)


def test_gradient_maps_are_smoothed_and_keep_their_unsmoothed_twins(setup):
    model, params, x = setup
    maps = reconstruction_maps(model, params, x, predictors="rec_grad,rec_error",
                               smooth_sigma=2.0, unsmoothed=True)
    twin = maps[unsmoothed_name("rec_grad")]
    np.testing.assert_allclose(maps["rec_grad"], smooth(twin, 2.0), rtol=1e-6)
    assert unsmoothed_name("rec_error") not in maps  # residuals are never smoothed


@pytest.mark.parametrize("bad", ["kl_grad", "rec_error,combi", "elbo_grad", "nope", ""])
def test_maps_of_a_latent_are_refused_by_name(setup, bad):
    model, params, x = setup
    with pytest.raises(ConfigError, match="reconstruction model"):
        reconstruction_maps(model, params, x, predictors=bad)
