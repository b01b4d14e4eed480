"""Proj-Rec-Error: iterative projection of an image onto the VAE's normal manifold.

Dehaene et al. (ICLR 2020), as used by Zhou, Deng & Wu: starting from x_0 = x, minimise
E(x) = L_rec(x) + lam * ||x - x_0||_1 with Adam on the pixels of x, where L_rec is evaluated
at z = mu(x) and differentiated *through* the VAE (encoder and decoder; unofficial ports
that detach the reconstruction implement a weaker method). The anomaly map is the
reconstruction error of the projected image against the input, (x_0 - decode(mu(x_T)))**2.
Images of C channels are projected as a whole (E sums over channels), and both maps are
summed over channels to (N, H, W), as the reconstruction terms of jaxvae.predictors.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from jaxvae.base.errors import ConfigError
from jaxvae.core import losses
from jaxvae.core.model import ConvVAE, check_input, reconstruct

PROJECTION_MAPS = ("rec", "diff")


def _l1(d):
    # jax.grad(jnp.abs)(0.) == 1, but at the first step x == x_0 exactly: the subgradient of
    # |d| at 0 must be 0 or every pixel is pushed off x_0 by the same step.
    return jnp.where(d == 0, 0.0, jnp.abs(d))


def energy(model, params, x, x0, lam):
    """Per-image projection energy E(x) = sum rec_nll(x, rec(x)) + lam * ||x - x0||_1, (N,)."""
    x_hat = reconstruct(model, params, x)
    axes = tuple(range(1, x.ndim))
    return jnp.sum(losses.rec_nll(x, x_hat), axis=axes) + lam * jnp.sum(_l1(x - x0), axis=axes)


def init(x0, lr):
    """The optimiser state of a projection starting at x0 (Adam with learning rate lr)."""
    return optax.adam(lr).init(x0)


@functools.partial(jax.jit, static_argnames=("model", "steps", "unroll"))
def adam_steps(model, params, x, state, x0, lam, lr, *, steps, unroll=1):
    """`steps` Adam steps on E(x) as one compiled loop; returns the new (x, state).

    Args:
      unroll: Adam steps per iteration of the compiled loop (`lax.fori_loop(unroll=)`);
        True unrolls them all into straight-line code.
    """
    opt = optax.adam(lr)
    # images are independent: the gradient of the batch sum is each image's own gradient
    grad_e = jax.grad(lambda x: jnp.sum(energy(model, params, x, x0, lam)))

    def step(_, carry):
        x, state = carry
        updates, state = opt.update(grad_e(x), state, x)
        return optax.apply_updates(x, updates), state

    return jax.lax.fori_loop(0, steps, step, (x, state), unroll=unroll)


@functools.partial(jax.jit, static_argnames=("model", "map_kind"))
def projection_map(model, params, x, x0, *, map_kind="rec"):
    """The anomaly map of projected images x against the inputs x0, (N, S, S): summed over
    the C channels."""
    if map_kind == "rec":
        m = losses.squared_error(x0, reconstruct(model, params, x))
    else:
        m = jnp.abs(x0 - x)
    return m[..., 0] if m.shape[-1] == 1 else jnp.sum(m, axis=-1)


def check_args(*, lam, steps, lr, map_kind):
    """Raise ConfigError for projection settings that make no sense."""
    if steps < 0 or lam < 0 or lr <= 0:
        raise ConfigError(f"projection needs steps >= 0, lam >= 0, lr > 0 "
                          f"(got steps={steps}, lam={lam}, lr={lr})")
    if map_kind not in PROJECTION_MAPS:
        raise ConfigError(f"unknown projection map {map_kind!r}; choose from {PROJECTION_MAPS}")


def project(model: ConvVAE, params, x, *, lam=1.0, steps=100, lr=0.03, map_kind="rec",
            unroll=1):
    """Project images onto the normal manifold and return the Proj-Rec-Error map.

    A pure function of (params, x): the Adam steps are one compiled `fori_loop`, and
    `jax.jit` / `jax.vmap` of `project` work. `jaxvae.runtime.batching.project` is the batcher that
    applies the per-backend execution policy (chunks, convolution forms, step schedule).

    Args:
      model, params: the trained ConvVAE and its parameters.
      x: (N, S, S, C) float32 images (x_0).
      lam: weight of the L1 term keeping x close to x_0 (the paper gives no value).
      steps: number of Adam steps on x (the paper gives no value); 0 returns rec_error.
      lr: Adam learning rate (0.03 in the paper).
      map_kind: "rec" -> (x_0 - decode(mu(x_T)))**2 (the paper's map); "diff" -> |x_0 - x_T|.
      unroll: Adam steps per iteration of the compiled loop (see `adam_steps`).

    Returns:
      (x_projected (N, S, S, C), map (N, S, S), summed over channels).
    """
    check_args(lam=lam, steps=steps, lr=lr, map_kind=map_kind)
    x0 = jnp.asarray(x)
    check_input(model, x0.shape)
    x0 = x0.astype(jnp.result_type(x0.dtype, jnp.float32))  # float32, or float64 under x64
    lam, lr = jnp.asarray(lam, x0.dtype), jnp.asarray(lr, x0.dtype)
    x, _ = adam_steps(model, params, x0, init(x0, lr), x0, lam, lr, steps=int(steps),
                      unroll=unroll)
    return x, projection_map(model, params, x, x0, map_kind=map_kind)
