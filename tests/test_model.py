import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvae
from jaxvae import losses


def _count(params):
    return sum(a.size for a in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("latent", [32, 64, 256])
def test_parameter_count_matches_reference_architecture(latent):
    params = jaxvae.init_params(jaxvae.ConvVAE(latent_dim=latent), jax.random.key(0))
    convs = 16 * (1 * 16 + 16 * 32 + 32 * 64 + 64 * 256)  # 4x4 kernels, no biases
    head = 4 * 4 * 256 * 2 * latent + latent * 4 * 4 * 256
    assert _count(params) == 2 * convs + head


def test_encode_decode_shapes():
    model = jaxvae.ConvVAE(latent_dim=32)
    params = jaxvae.init_params(model, jax.random.key(0))
    x = jnp.zeros((5, 64, 64, 1))
    mu, log_sigma = jaxvae.encode(model, params, x)
    assert mu.shape == log_sigma.shape == (5, 32)
    assert jaxvae.decode(model, params, mu).shape == (5, 64, 64, 1)
    recon, aux = model.apply({"params": params}, x)
    assert recon.shape == x.shape and set(aux) == {"mu", "log_sigma"}
    sampled, _ = model.apply({"params": params}, x + 1.0, key=jax.random.key(1))
    deterministic, _ = model.apply({"params": params}, x + 1.0)
    assert not np.allclose(sampled, deterministic)


def test_losses_hand_values():
    x = jnp.array([[1.0, 2.0]])
    x_hat = jnp.array([[0.0, 4.0]])
    np.testing.assert_allclose(losses.squared_error(x, x_hat), [[1.0, 4.0]])
    np.testing.assert_allclose(losses.rec_nll(x, x_hat),
                               [[0.5 + losses.HALF_LOG_2PI, 2.0 + losses.HALF_LOG_2PI]],
                               rtol=1e-6)
    # KL of N(mu, sigma^2) vs N(0, 1) for mu=1, sigma=1 is 0.5; mu=0, sigma=e: (e^2-1-2)/2
    kl = losses.kl_divergence(jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [1.0]]))
    np.testing.assert_allclose(kl, [0.5, 0.5 * (np.e**2 - 3.0)], rtol=1e-6)
    loss, rec, kl2 = losses.beta_elbo(x[..., None], x_hat[..., None], jnp.ones((1, 1)),
                                      jnp.zeros((1, 1)), beta=2.0)
    np.testing.assert_allclose(rec, [2.5 + 2 * losses.HALF_LOG_2PI], rtol=1e-6)
    np.testing.assert_allclose(loss, rec + 2.0 * kl2, rtol=1e-6)
