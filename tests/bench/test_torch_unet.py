"""The PyTorch reference of the DAE's U-Net (jaxvae.bench.torch_unet), loaded with the JAX
model's weights, computes what jaxvae.core.unet computes: outputs and input gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvae.core.reconstruction_maps import reconstruction_maps
from jaxvae.core.unet import UNet, denoise, init_unet

torch = pytest.importorskip("torch")
from jaxvae.bench import torch_unet  # noqa: E402  (needs torch)


@pytest.fixture(scope="module")
def pair():
    model = UNet(width=4, depth=4, in_channels=2)
    params = init_unet(model, jax.random.key(0))
    # every parameter perturbed (at init the norms' scales are 1 and the biases 0, which
    # would hide a scale and bias swapped in the conversion)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [v + 0.1 * jax.random.normal(k, v.shape)
                                       for v, k in zip(leaves, keys, strict=True)])
    x = jax.random.normal(jax.random.key(2), (3, 64, 64, 2)) * 0.5
    return model, params, x, torch_unet.from_jax(model, params)


def _torch(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def test_the_torch_unet_reproduces_the_jax_unet(pair):
    model, params, x, net = pair
    want = np.asarray(jax.jit(denoise, static_argnums=0)(model, params, x))
    with torch.no_grad():
        got = net(_torch(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_the_torch_input_gradient_is_the_dae_rec_grad(pair):
    model, params, x, net = pair
    xt = _torch(x).requires_grad_(True)
    loss = 0.5 * ((xt - net(xt)) ** 2).sum()
    loss.backward()
    want = reconstruction_maps(model, params, x, predictors=("rec_grad",),
                               smooth_sigma=0.0)["rec_grad"]
    got = xt.grad.abs().sum(1).numpy()
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-3,
                               atol=1e-4 * float(jnp.abs(want).max()))
