"""The beta-VAE losses, written once and unreduced: the caller sums or averages.

Training and every anomaly map use these same functions (docs/method.md §1).
"""

import math

import jax.numpy as jnp

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def squared_error(x, x_hat):
    """Per-pixel squared error (x - x_hat)**2, same shape as x."""
    return jnp.square(x - x_hat)


def rec_nll(x, x_hat):
    """Per-pixel Gaussian NLL of x under N(x_hat, 1): 0.5 (x - x_hat)**2 + 0.5 log 2 pi."""
    return 0.5 * squared_error(x, x_hat) + HALF_LOG_2PI


def kl_divergence(mu, log_sigma):
    """Per-image KL(N(mu, sigma**2) || N(0, I)) in closed form.

    Args:
      mu, log_sigma: (..., l) mean and log standard deviation.
    Returns:
      (...,) KL summed over the latent dimensions.
    """
    return 0.5 * jnp.sum(jnp.square(mu) + jnp.exp(2.0 * log_sigma) - 1.0 - 2.0 * log_sigma,
                         axis=-1)


def beta_elbo(x, x_hat, mu, log_sigma, beta=1.0):
    """Per-image negative beta-ELBO: sum_pixels rec_nll + beta * KL.

    Args:
      x, x_hat: (N, H, W, C) images and reconstructions.
      mu, log_sigma: (N, l).
    Returns:
      (loss, rec, kl), each (N,).
    """
    rec = jnp.sum(rec_nll(x, x_hat), axis=tuple(range(1, x.ndim)))
    kl = kl_divergence(mu, log_sigma)
    return rec + beta * kl, rec, kl
