import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from maps_reference import assert_maps_close, model_and_batch, obvious_grad_maps

import jaxvae
from jaxvae.core import losses
from jaxvae.core.predictors import (
    _anomaly_maps,
    gaussian_matrix,
    smooth,
    unsmoothed_name,
)
from jaxvae.runtime import batching, execution

BETA = 0.7


@pytest.fixture(scope="module")
def setup():
    return model_and_batch(3, x_seed=1)


def test_gradient_maps_equal_plain_jax_grad(setup):
    model, params, x = setup
    maps = jaxvae.anomaly_maps(model, params, x, beta=BETA, smooth_sigma=0.0)
    ref = obvious_grad_maps(model, params, x, BETA)
    for name in ref:
        assert_maps_close(maps[name], ref[name], name)


def test_gradient_maps_match_finite_differences(setup):
    model, params, x = setup
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        maps = jaxvae.anomaly_maps(model, p64, x64, beta=BETA, smooth_sigma=0.0)
        assert maps["rec_grad"].dtype == jnp.float64

        def losses_of(x):
            mu, ls = jaxvae.encode(model, p64, x)
            rec = 0.5 * jnp.sum((x - jaxvae.decode(model, p64, mu)) ** 2)
            kl = jnp.sum(losses.kl_divergence(mu, ls))
            return {"rec_grad": rec, "kl_grad": kl, "elbo_grad": rec + BETA * kl}

        eps = 1e-5
        for n, i, j in [(0, 32, 32), (1, 10, 50), (2, 63, 0)]:
            e = jnp.zeros_like(x64).at[n, i, j, 0].set(eps)
            up, down = losses_of(x64 + e), losses_of(x64 - e)
            for name in up:
                fd = abs(float(up[name] - down[name]) / (2 * eps))
                np.testing.assert_allclose(float(maps[name][n, i, j]), fd, rtol=1e-5, atol=1e-8,
                                           err_msg=f"{name} at {(n, i, j)}")


def test_batch_sum_gradient_is_per_image_gradient(setup):
    model, params, x = setup
    batched = jaxvae.anomaly_maps(model, params, x, smooth_sigma=0.0)
    single = jax.vmap(lambda xi: jaxvae.anomaly_maps(
        model, params, xi[None], smooth_sigma=0.0,
        predictors=["rec_error", "rec_grad", "kl_grad", "elbo_grad"]))(x)
    for name, m in single.items():
        assert_maps_close(batched[name], m[:, 0], name)


def test_elbo_grad_is_abs_of_signed_sum_not_sum_of_maps(setup):
    model, params, x = setup
    maps = jaxvae.anomaly_maps(model, params, x, beta=BETA, smooth_sigma=0.0)
    # |a + b| <= |a| + |b|, with strict inequality where the signs differ
    bound = np.asarray(maps["rec_grad"] + BETA * maps["kl_grad"])
    ulps = 8 * np.finfo(np.float32).eps * bound.max()  # both sides round the same |g| values
    assert np.all(maps["elbo_grad"] <= bound + ulps)
    assert np.any(maps["elbo_grad"] < bound - 1e-4 * bound.max())
    only_rec = jaxvae.anomaly_maps(model, params, x, beta=0.0, smooth_sigma=0.0)
    # g_rec + 0 * g_kl is g_rec exactly: the same numbers, not merely close ones
    np.testing.assert_array_equal(only_rec["elbo_grad"], only_rec["rec_grad"])


def test_rec_error_and_combi_definitions(setup):
    model, params, x = setup
    maps = jaxvae.anomaly_maps(model, params, x, smooth_sigma=2.0)
    mu, _ = jaxvae.encode(model, params, x)
    x_hat = jaxvae.decode(model, params, mu)
    # squared errors reach ~1e-8, where the two programs' float32 x_hat differ relatively
    assert_maps_close(maps["rec_error"], ((x - x_hat) ** 2)[..., 0])
    raw = jaxvae.anomaly_maps(model, params, x, smooth_sigma=0.0, predictors=["kl_grad"])
    kl = raw["kl_grad"]
    norm = (kl - kl.min()) / (kl.max() - kl.min())  # min-max over the batch (one combi group)
    nll = losses.rec_nll(x, x_hat)[..., 0]
    assert_maps_close(maps["combi"], smooth(norm, 2.0) * nll)


def test_smoothing_is_a_normalised_gaussian_and_can_be_switched_off(setup):
    model, params, x = setup
    k = np.asarray(gaussian_matrix(64, 3.0))
    assert k[32, 25:40].nonzero()[0].tolist() == list(range(29 - 25, 36 - 25))  # radius 3
    np.testing.assert_allclose(k[32].sum(), 1.0, rtol=1e-6)
    impulse = jnp.zeros((1, 64, 64)).at[0, 32, 32].set(1.0)
    blurred = np.asarray(smooth(impulse, 3.0))[0]
    np.testing.assert_allclose(blurred.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(blurred, blurred.T, atol=1e-7)
    assert blurred[32, 32] == blurred.max() and blurred[32, 36] == 0.0
    on = jaxvae.anomaly_maps(model, params, x, smooth_sigma=3.0, predictors=["rec_grad"])
    off = jaxvae.anomaly_maps(model, params, x, smooth_sigma=0.0, predictors=["rec_grad"])
    assert_maps_close(on["rec_grad"], smooth(off["rec_grad"], 3.0), "rec_grad")
    assert not np.allclose(on["rec_grad"], off["rec_grad"])


def test_only_requested_predictors_and_unknown_names(setup):
    model, params, x = setup
    assert set(jaxvae.anomaly_maps(model, params, x, predictors="kl_grad")) == {"kl_grad"}
    assert set(jaxvae.anomaly_maps(model, params, x)) == set(jaxvae.PREDICTORS)
    with pytest.raises(jaxvae.ConfigError, match="unknown predictor"):
        jaxvae.anomaly_maps(model, params, x, predictors=["rec_grad", "nope"])
    with pytest.raises(jaxvae.ConfigError, match="key"):
        jaxvae.anomaly_maps(model, params, x, n_samples=2)


def test_monte_carlo_rec_grad_uses_reparameterised_samples(setup):
    model, params, x = setup
    key = jax.random.key(7)
    maps = jaxvae.anomaly_maps(model, params, x, n_samples=1, key=key, smooth_sigma=0.0,
                               predictors=["rec_grad"])

    def rec(x):
        mu, ls = jaxvae.encode(model, params, x)
        z = mu + jnp.exp(ls) * jax.random.normal(key, (1,) + mu.shape)[0]
        return 0.5 * jnp.sum((x - jaxvae.decode(model, params, z)) ** 2)

    assert_maps_close(maps["rec_grad"], jnp.abs(jax.grad(rec)(x))[..., 0], "rec_grad")
    again = jaxvae.anomaly_maps(model, params, x, n_samples=1, key=key, smooth_sigma=0.0,
                                predictors=["rec_grad"])
    np.testing.assert_array_equal(maps["rec_grad"], again["rec_grad"])


def test_compiled_once_per_shape(setup):
    model, params, x = setup
    jaxvae.anomaly_maps(model, params, x, predictors=["rec_grad", "kl_grad"])
    before = _anomaly_maps._cache_size()
    jaxvae.anomaly_maps(model, params, x + 1.0, predictors=["kl_grad", "rec_grad"], beta=2.0)
    jaxvae.anomaly_maps(model, params, np.asarray(x) * 2, predictors="rec_grad,kl_grad")
    assert _anomaly_maps._cache_size() == before


def test_large_batches_are_cut_into_chunks_with_the_same_maps(setup):
    model, params, x = setup
    xs = jnp.concatenate([x, x[::-1] * 0.5])  # 6 images
    whole = jaxvae.anomaly_maps(model, params, xs, beta=BETA, combi_group=2)
    before = _anomaly_maps._cache_size()
    chunks = dataclasses.replace(execution.PLAIN, chunk_size=4)  # 4 + 2, combi groups of 2
    chunked = batching.maps(model, params, xs, policy=chunks, beta=BETA, combi_group=2)
    assert _anomaly_maps._cache_size() == before + 2  # two new shapes: 4 and 2 images
    for k in whole:
        assert chunked[k].shape == (6, 64, 64)
        assert_maps_close(chunked[k], whole[k], k)
    # Monte-Carlo draws differ per chunk (fold_in), not repeated chunk after chunk
    mc = batching.maps(model, params, jnp.concatenate([x[:2]] * 2), n_samples=1,
                    key=jax.random.key(3), policy=dataclasses.replace(chunks, chunk_size=2),
                    predictors=["rec_grad"])
    assert not np.allclose(mc["rec_grad"][:2], mc["rec_grad"][2:])


def test_one_signed_maps_equal_their_definitions(setup):
    model, params, x = setup
    maps = jaxvae.anomaly_maps(model, params, x, predictors="rec_pos,rec_grad_pos,rec_error",
                               smooth_sigma=0.0)
    mu, _ = jaxvae.encode(model, params, x)
    r = (x - jaxvae.decode(model, params, mu))[..., 0]
    assert_maps_close(maps["rec_pos"], np.square(np.maximum(r, 0)), "rec_pos")
    assert (r < 0).any() and (r > 0).any()  # both signs occur, so the clipping is tested
    np.testing.assert_array_equal(maps["rec_pos"] <= maps["rec_error"], True)
    g = jax.grad(lambda x: 0.5 * jnp.sum((x - jaxvae.decode(
        model, params, jaxvae.encode(model, params, x)[0])) ** 2))(x)[..., 0]
    assert_maps_close(maps["rec_grad_pos"], np.maximum(g, 0), "rec_grad")
    assert (np.asarray(maps["rec_grad_pos"]) == 0).mean() > 0.2  # the negative part is cut


def test_dark_one_signed_maps_and_unsmoothed_twins_split_their_maps_exactly(setup):
    model, params, x = setup
    names = "rec_error,rec_pos,rec_neg,rec_grad,rec_grad_pos,rec_grad_neg,kl_grad"
    maps = jaxvae.anomaly_maps(model, params, x, predictors=names, smooth_sigma=2.0,
                               unsmoothed=True)
    # (x - x_hat)^2 = its positive part^2 + its negative part^2; |g| = max(g,0) + max(-g,0)
    assert_maps_close(maps["rec_pos"] + maps["rec_neg"], maps["rec_error"], "rec_neg")
    assert_maps_close(maps["rec_grad_pos"] + maps["rec_grad_neg"], maps["rec_grad"],
                      "rec_grad_neg")
    assert (np.asarray(maps["rec_neg"]) > 0).mean() > 0.2  # not all cut
    for name in ("rec_grad", "rec_grad_pos", "rec_grad_neg", "kl_grad"):
        twin = maps[unsmoothed_name(name)]
        assert_maps_close(smooth(twin, 2.0), maps[name], name)  # smoothed after, not before
        assert not np.allclose(twin, maps[name])
    assert unsmoothed_name("rec_error") not in maps  # never smoothed: no twin
    plain = jaxvae.anomaly_maps(model, params, x, predictors=names, smooth_sigma=2.0)
    assert set(plain) == set(names.split(","))
    for k in plain:
        np.testing.assert_array_equal(plain[k], maps[k])  # the twins change no map
    with pytest.raises(jaxvae.ConfigError, match="rec_abs"):
        jaxvae.anomaly_maps(model, params, x, predictors="rec_abs")


def test_elbo_grad_sum_is_the_unweighted_elbo_gradient(setup):
    model, params, x = setup
    ref = obvious_grad_maps(model, params, x, 1.0)["elbo_grad"]  # |grad(rec + kl)|
    for beta in (BETA, 1.0):
        maps = jaxvae.anomaly_maps(model, params, x, beta=beta, smooth_sigma=0.0,
                                   predictors="elbo_grad,elbo_grad_sum")
        assert_maps_close(maps["elbo_grad_sum"], ref, "elbo_grad")
    assert not np.allclose(jaxvae.anomaly_maps(model, params, x, beta=BETA, smooth_sigma=0.0,
                                               predictors="elbo_grad")["elbo_grad"], ref)
