"""Fidelity to the reference code: the activation's kink, combi's groups, the KL opt-in."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvae
from jaxvae.core import losses
from jaxvae.core.model import NEGATIVE_SLOPE, leaky
from jaxvae.core.predictors import smooth
from jaxvae.runtime import batching, execution


def test_activation_derivative_at_zero_is_the_negative_slope():
    slope = np.float32(NEGATIVE_SLOPE)  # 0.01 rounded to float32, exactly
    assert NEGATIVE_SLOPE == 0.01
    assert jax.grad(leaky)(jnp.float32(0.0)) == slope
    assert jax.grad(leaky)(jnp.float32(1e-30)) == 1.0
    assert jax.grad(leaky)(jnp.float32(-1e-30)) == slope


def test_background_gradient_uses_the_slope_at_zero():
    """An all-zero image puts every pre-activation at exactly 0 (no biases): the input
    gradient then is the linear map with every activation's derivative = 0.01."""
    model = jaxvae.ConvVAE(latent_dim=8, conv_impl="lax")
    params = jaxvae.init_params(model, jax.random.key(0))
    x = jnp.zeros((1, 64, 64, 1))
    g = jax.grad(lambda x: jnp.sum(jaxvae.encode(model, params, x)[0]))(x)

    def scaled(x):  # the encoder with each activation replaced by its slope-at-0 line
        h = x
        for i in range(4):
            k = params[f"enc_convs_{i}"]["kernel"]
            h = NEGATIVE_SLOPE * jax.lax.conv_general_dilated(
                h, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum((h.reshape(1, -1) @ params["enc_head"]["kernel"])[:, :8])

    ref = jax.grad(scaled)(x)
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(ref))))
    assert float(jnp.max(jnp.abs(ref))) > 0


@pytest.fixture(scope="module")
def setup():
    model = jaxvae.ConvVAE(latent_dim=16)
    params = jaxvae.init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (7, 64, 64, 1)) * 0.5
    return model, params, x


def _combi_by_hand(kl_abs, nll, groups, sigma=3.0):
    parts = []
    for g in groups:
        a = kl_abs[g]
        parts.append((a - a.min()) / (a.max() - a.min()))
    return np.asarray(smooth(jnp.asarray(np.concatenate(parts)), sigma)) * nll


@pytest.mark.parametrize("group, chunk", [(3, 0), (3, 6), (3, 4), (0, 0), (0, 3), (64, 0)])
def test_combi_normalises_over_consecutive_groups(setup, group, chunk):
    model, params, x = setup
    maps = jaxvae.anomaly_maps(model, params, x, combi_group=group,
                               predictors=["kl_grad", "rec_error", "combi"], smooth_sigma=0.0)
    kl_abs = np.asarray(maps["kl_grad"])
    nll = 0.5 * np.asarray(maps["rec_error"]) + losses.HALF_LOG_2PI
    n = x.shape[0]
    groups = [slice(0, n)] if group in (0, 64) else [slice(i, i + group)
                                                      for i in range(0, n, group)]
    ref = _combi_by_hand(kl_abs, nll, groups)
    # the batcher in chunks of `chunk` images (0: one call) never splits a combi group
    policy = dataclasses.replace(execution.PLAIN, chunk_size=chunk)
    got = np.asarray(batching.maps(model, params, x, policy=policy, combi_group=group,
                                predictors=["combi"])["combi"])
    # min-max values in [0, 1] times an NLL of ~1: float32 rounding of a few ulps of the max
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    if 0 < group < n:  # the grouping matters: whole-batch normalisation differs
        whole = _combi_by_hand(kl_abs, nll, [slice(0, n)])
        assert np.abs(whole - ref).max() > 1e-2 * np.abs(ref).max()


def test_reference_kl_reproduces_the_sigma_for_log_sigma_mixup(setup):
    model, params, x = setup

    def kl_of(x, fix):
        mu, ls = jaxvae.encode(model, params, x)
        return jnp.sum(losses.kl_divergence(mu, jnp.exp(ls) if fix else ls))

    got = jaxvae.anomaly_maps(model, params, x, reference_kl=True, predictors=["kl_grad"],
                              smooth_sigma=0.0)["kl_grad"]
    ref = jnp.abs(jax.grad(kl_of)(x, True))[..., 0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * float(jnp.max(ref)))
    correct = jnp.abs(jax.grad(kl_of)(x, False))[..., 0]
    assert float(jnp.max(jnp.abs(got - correct))) > 1e-2 * float(jnp.max(correct))
