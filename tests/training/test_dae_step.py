"""Tests of jaxvae.training.dae_step: the DAE's loss is the squared error inside the brain of
the prediction from noisy input, its step is Adam on that loss, and training denoises."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvae.core.noise import add_coarse_noise
from jaxvae.core.unet import UNet, init_unet
from jaxvae.training.dae_step import dae_loss, make_dae_train_step

MODEL = UNet(width=4, depth=3)


def _images(n, seed=0):
    x = jax.random.normal(jax.random.key(seed), (n, 64, 64)) * 0.5
    return x.at[:, :10].set(0.0)  # a background band: no noise, no loss there


def test_the_loss_is_the_squared_error_inside_the_brain_of_the_denoised_input():
    params = init_unet(MODEL, jax.random.key(0))
    x = _images(2)[..., None]
    key = jax.random.key(5)
    got = jax.jit(dae_loss, static_argnums=0)(MODEL, params, x, key)
    pred = jax.jit(MODEL.apply)({"params": params}, add_coarse_noise(key, x))
    want = jnp.sum(((pred - x) ** 2)[:, 10:], axis=(1, 2, 3))
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_the_step_is_adam_on_the_batch_mean_loss_with_the_noise_of_fold_in_key_1():
    params = init_unet(MODEL, jax.random.key(0))
    opt = optax.adam(1e-3)
    state = opt.init(params)
    batch, key = _images(4), jax.random.key(7)
    step = make_dae_train_step(MODEL, lr=1e-3)
    new, _, metrics = step(params, state, batch, key)
    loss = lambda p: jnp.mean(dae_loss(MODEL, p, batch[..., None],
                                       jax.random.fold_in(key, 1)))
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    updates, _ = opt.update(grads, state, params)
    ref = optax.apply_updates(params, updates)
    np.testing.assert_allclose(metrics["loss"], value, rtol=1e-5)
    assert float(metrics["kl"]) == 0 and float(metrics["rec"]) == float(metrics["loss"])
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # the raw uint32 key data the training loop feeds gives the same step
    again = step(params, state, batch, jax.random.key_data(key))[2]["loss"]
    assert float(again) == float(metrics["loss"])


def test_a_few_steps_reduce_the_denoising_loss():
    params = init_unet(MODEL, jax.random.key(0))
    state = optax.adam(3e-3).init(params)
    step = make_dae_train_step(MODEL, lr=3e-3)
    batch = _images(8, seed=1)
    losses = []
    for i in range(30):
        params, state, m = step(params, state, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3]), losses
