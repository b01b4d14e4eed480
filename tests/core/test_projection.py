import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from maps_reference import model_and_batch

import jaxvae
from jaxvae.core.projection import adam_steps, energy
from jaxvae.runtime import batching, execution

CHUNK = execution.CPU.projection_unroll


@pytest.fixture(scope="module")
def setup():
    return model_and_batch(2, x_seed=2)


def assert_maps_close(actual, desired):
    """Float32 results of two programs: rtol for the bulk, and for entries near zero (squared
    errors reach 1e-9) an atol of 1e-5 * max|desired|, ~100 float32 ulps of the largest."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=1e-5 * np.abs(desired).max())


def test_zero_steps_returns_plain_rec_error(setup):
    model, params, x = setup
    x_t, m = jaxvae.project(model, params, x, steps=0)
    np.testing.assert_array_equal(x_t, x)
    rec = jaxvae.anomaly_maps(model, params, x, predictors=["rec_error"])["rec_error"]
    assert_maps_close(m, rec)


def test_steps_lower_the_energy(setup):
    model, params, x = setup
    energies = [float(jnp.mean(energy(model, params, jaxvae.project(
        model, params, x, steps=s, lam=0.5)[0], x, 0.5))) for s in (0, 5, 20, 60)]
    assert all(b < a for a, b in zip(energies, energies[1:], strict=False)), energies


def test_first_step_moves_by_rec_gradient_only(setup):
    # with an L1 subgradient of 0 at x == x0, a huge lam changes nothing in step one
    model, params, x = setup
    a, _ = jaxvae.project(model, params, x, steps=1, lam=0.0)
    b, _ = jaxvae.project(model, params, x, steps=1, lam=1e6)
    # lam multiplies a subgradient of exactly 0: the same numbers, not merely close ones
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, x)


def test_projection_differentiates_through_the_vae(setup):
    # Adam's first step is -lr * g / (|g| + eps): compare with the full (not detached) gradient
    model, params, x = setup
    x1, _ = jaxvae.project(model, params, x, steps=1, lam=0.0, lr=0.01)
    g = jax.grad(lambda x: jnp.sum(energy(model, params, x, x, 0.0)))(x)
    # each pixel moves by about +-lr; rounding of the two gradients stays far below 1 % of it
    np.testing.assert_allclose(x1, x - 0.01 * g / (jnp.abs(g) + 1e-8), rtol=0, atol=1e-2 * 0.01)


def test_diff_map_and_validation(setup):
    model, params, x = setup
    x_t, m = jaxvae.project(model, params, x, steps=3, map_kind="diff")
    # one correctly rounded subtraction on the same numbers: equal up to the last ulp
    np.testing.assert_allclose(m, jnp.abs(x - x_t)[..., 0], rtol=2 * np.finfo(np.float32).eps)
    with pytest.raises(jaxvae.ConfigError):
        jaxvae.project(model, params, x, steps=-1)
    with pytest.raises(jaxvae.ConfigError):
        jaxvae.project(model, params, x, map_kind="nope")


def test_pure_loop_and_cpu_schedule_equal_one_plain_adam_loop(setup):
    # the plain formulation: one lax.fori_loop of optax Adam steps over the whole projection;
    # the CPU policy runs it as a Python loop over compiled programs of CHUNK unrolled steps
    model, params, x = setup
    steps, lam, lr = 2 * CHUNK + 3, 0.3, 0.02
    with jax.enable_x64(True):  # float64: the two programs round differently in float32
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x0 = jnp.asarray(x, jnp.float64)
        opt = optax.adam(lr)
        grad_e = jax.grad(lambda x: jnp.sum(energy(model, p64, x, x0, lam)))

        def step(_, carry):
            updates, state = opt.update(grad_e(carry[0]), carry[1], carry[0])
            return optax.apply_updates(carry[0], updates), state

        want, _ = jax.lax.fori_loop(0, steps, step, (x0, opt.init(x0)))
        rec = jaxvae.decode(model, p64, jaxvae.encode(model, p64, want)[0])
        for got, m in (jaxvae.project(model, p64, x0, steps=steps, lam=lam, lr=lr),
                       batching.project(model, p64, x0, steps=steps, lam=lam, lr=lr,
                                     policy=execution.CPU)):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(m, ((x0 - rec) ** 2)[..., 0], rtol=1e-9, atol=1e-12)


def test_projection_compiled_once(setup):
    model, params, x = setup
    for policy in (execution.PLAIN, execution.CPU):
        batching.project(model, params, x, steps=CHUNK + 2, lam=0.1, policy=policy)
        n = adam_steps._cache_size()
        batching.project(model, params, x * 2, steps=CHUNK + 2, lam=0.3, lr=0.01, policy=policy)
        assert adam_steps._cache_size() == n


def test_projection_chunk_by_chunk_equals_all_at_once(setup):
    model, params, x = setup
    xs, lr = jnp.concatenate([x, x[:1] * 0.3]), 0.03  # 3 images
    x_whole, m_whole = jaxvae.project(model, params, xs, steps=4, lam=0.2, lr=lr)
    x_parts, m_parts = batching.project(model, params, xs, steps=4, lam=0.2, lr=lr,
                                     policy=dataclasses.replace(execution.PLAIN, chunk_size=2))
    assert x_parts.shape == x_whole.shape and m_parts.shape == m_whole.shape
    # Adam moves a pixel by up to lr per step, and by m / sqrt(v) where the gradient nearly
    # cancels: there rounding shows at ~1e-5 (measured); 1 % of a step bounds it
    np.testing.assert_allclose(x_parts, x_whole, rtol=0, atol=1e-2 * lr)
    assert_maps_close(m_parts, m_whole)
