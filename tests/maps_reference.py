"""Reference computations the map tests compare against (imported by tests of several
modules): a float32 closeness rule for maps, and the gradient maps the slow obvious way."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxvae
from jaxvae.core import losses
from jaxvae.core.predictors import GRADIENT_MAPS


def assert_maps_close(actual, desired, name=""):
    """Float32 maps from two programs (other fusion / summation order): rtol 1e-4 for the bulk,
    and an atol scaled to the map for entries near zero, where cancellation leaves only an
    absolute error: 1e-5 * max|desired| (~100 float32 ulps of the largest value) for
    rec_error and combi; 1e-4 for the input gradients, sums of many products through the
    network whose error follows the size of the terms, not of the result (measured ~1e-6 of
    the map's maximum; kl_grad's cotangent exp(2 log_sigma) - 1 cancels as well)."""
    desired = np.asarray(desired)
    atol = (1e-4 if name in GRADIENT_MAPS else 1e-5) * np.abs(desired).max()
    np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=atol, err_msg=name)



def obvious_grad_maps(model, params, x, beta):
    """The slow obvious way: three separate jax.grad calls of per-image scalar losses; a map
    is the sum over the C channels of |grad| (C = 1: |grad|)."""
    def rec(x):
        mu, _ = jaxvae.encode(model, params, x)
        return 0.5 * jnp.sum((x - jaxvae.decode(model, params, mu)) ** 2)

    def kl(x):
        return jnp.sum(losses.kl_divergence(*jaxvae.encode(model, params, x)))

    g_rec, g_kl = jax.grad(rec)(x), jax.grad(kl)(x)
    g_elbo = jax.grad(lambda x: rec(x) + beta * kl(x))(x)
    return {k: jnp.sum(jnp.abs(v), axis=-1) for k, v in
            {"rec_grad": g_rec, "kl_grad": g_kl, "elbo_grad": g_elbo}.items()}


def model_and_batch(n: int, x_seed: int, latent_dim: int = 16):
    """(model, params, x) of an initial ConvVAE whose maps depend on the network, and a batch
    of n random (64, 64, 1) images: at init the decoder outputs ~1e-3, so x - x_hat would be
    x whatever the model does; a larger last layer makes x_hat O(1) like x."""
    model = jaxvae.ConvVAE(latent_dim=latent_dim)
    params = jaxvae.init_params(model, jax.random.key(0))
    params["dec_convs_3"] = {"kernel": params["dec_convs_3"]["kernel"] * 300}
    x = jax.random.normal(jax.random.key(x_seed), (n, 64, 64, 1)) * 0.5
    return model, params, x
