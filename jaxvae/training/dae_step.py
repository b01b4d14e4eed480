"""The denoising auto-encoder's train step (issue #23; not yet reached from `jaxvae train`).

The step of Kascenas et al. (MIDL 2022): the input is the (augmented) slice plus coarse noise
inside the brain (jaxvae.core.noise), the target the slice itself, the loss the squared error
inside the brain. Per image the squared error is summed over the brain's pixels and channels
and the batch takes the mean, as the VAE's per-image negative ELBO is (the reference averages
over every element instead: a constant factor, which Adam's update does not see). Keys as in
jaxvae.training.trainer: fold_in(key, 0) augments, fold_in(key, 1) draws the noise. The
metrics carry the VAE's names (loss, rec = loss, kl = 0), so metrics.jsonl keeps one format.
"""

import functools

import jax
import jax.numpy as jnp
import optax

from jaxvae.core.augment import AugmentConfig, augment_images
from jaxvae.core.noise import add_coarse_noise, brain_of
from jaxvae.core.unet import UNet
from jaxvae.data.slices import with_channels


def dae_loss(model: UNet, params, x, key, *, resolution=16, std=0.2):
    """Per-image squared error inside the brain of the network's prediction from x + noise.

    Args:
      model, params: the U-Net and its parameters.
      x: (N, H, W, C) clean images; key: the noise's PRNG key.
      resolution, std: the coarse noise's grid side and standard deviation.

    Returns:
      (N,) sums over each image's brain pixels and channels.
    """
    noisy = add_coarse_noise(key, x, resolution=resolution, std=std)
    pred = model.apply({"params": params}, noisy)
    inside = brain_of(x)[..., None].astype(x.dtype)
    return jnp.sum((pred - x) ** 2 * inside, axis=(1, 2, 3))


@functools.lru_cache(maxsize=16)
def make_dae_train_step(model: UNet, *, lr: float, resolution: int = 16, std: float = 0.2,
                        augment: AugmentConfig | None = None):
    """Build the jitted pure step `train_step(params, opt_state, batch, key)` of the DAE.

    One compiled function per (model, lr, noise, augment), cached.

    Returns:
      train_step(params, opt_state, batch (B, S, S[, C]) float32, key (a PRNG key or its raw
        uint32 key data)) -> (params, opt_state, {"loss", "rec", "kl"}: batch means).
    """
    opt = optax.adam(lr)

    def mean_loss(params, x, key):
        per_image = dae_loss(model, params, x, key, resolution=resolution, std=std)
        return jnp.mean(per_image)

    def train_step(params, opt_state, batch, key):
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        x = with_channels(batch)
        if augment is not None:
            x = augment_images(jax.random.fold_in(key, 0), x, augment)
        loss, grads = jax.value_and_grad(mean_loss)(params, x, jax.random.fold_in(key, 1))
        updates, opt_state = opt.update(grads, opt_state, params)
        metrics = {"loss": loss, "rec": loss, "kl": jnp.zeros_like(loss)}
        return optax.apply_updates(params, updates), opt_state, metrics

    return jax.jit(train_step)
