"""The denoising auto-encoder's training noise: coarse Gaussian noise inside the brain.

After Kascenas et al. (MIDL 2022; AntanasKascenas/DenoisingAE, src/denoising.py): per image
and channel, Gaussian noise of standard deviation `std` is drawn on a `resolution` x
`resolution` grid, upsampled bilinearly to the image size with the corners aligned (torch's
`upsample_bilinear`, which the reference calls), rolled by a random shift along both axes
(so that the coarse grid's nodes fall anywhere), and added inside the brain only. The
reference draws std 0.2 at 16x16 for 128x128 images; both are settings here. One deviation:
the reference rolls a whole batch by one shift, here each image draws its own (the batch
composition then does not change an image's noise).

The brain of a pre-processed slice is where any channel is non-zero (jaxvae.data.preprocess
sets the background to exactly 0), as the reference's foreground is where the channels'
sum exceeds 0.01 on its [0, 1] images.
"""

import jax
import jax.numpy as jnp
import numpy as np


def brain_of(x):
    """(N, H, W) bool: the pixels where any channel of (N, H, W, C) images is non-zero."""
    return jnp.any(x != 0, axis=-1)


def upsampling_matrix(size: int, resolution: int) -> np.ndarray:
    """(size, resolution) bilinear interpolation weights with aligned corners: row i reads
    the grid at i * (resolution - 1) / (size - 1)."""
    if resolution == 1:
        return np.ones((size, 1), np.float32)
    pos = np.arange(size) * (resolution - 1) / max(size - 1, 1)
    lo = np.minimum(np.floor(pos).astype(int), resolution - 2)
    frac = pos - lo
    out = np.zeros((size, resolution), np.float32)
    out[np.arange(size), lo] = 1 - frac
    out[np.arange(size), lo + 1] = frac
    return out


def coarse_noise(key, shape, *, resolution=16, std=0.2):
    """Coarse Gaussian noise of `shape` (N, H, W, C), before the brain mask.

    Args:
      key: PRNG key; image i draws from fold_in(key, i).
      shape: (N, H, W, C) of the images.
      resolution: side of the grid the noise is drawn on (the reference: 16).
      std: standard deviation on the grid (the reference: 0.2); the upsampled noise is
        smoother, so its pixel standard deviation is lower between the grid's nodes.

    Returns:
      float32 noise of `shape`.
    """
    n, h, w, c = shape
    ah = jnp.asarray(upsampling_matrix(h, resolution))
    aw = jnp.asarray(upsampling_matrix(w, resolution))

    def one(i):
        k = jax.random.fold_in(key, i)
        grid = std * jax.random.normal(jax.random.fold_in(k, 0), (resolution, resolution, c))
        up = jnp.einsum("hr,rsc,ws->hwc", ah, grid, aw)
        dy, dx = (jax.random.randint(jax.random.fold_in(k, j), (), 0, s)
                  for j, s in ((1, h), (2, w)))
        return jnp.roll(up, (dy, dx), axis=(0, 1))

    return jax.vmap(one)(jnp.arange(n)).astype(jnp.float32)


def add_coarse_noise(key, x, *, resolution=16, std=0.2):
    """x + coarse noise inside the brain (`brain_of`): the DAE's training input."""
    noise = coarse_noise(key, x.shape, resolution=resolution, std=std)
    return x + noise * brain_of(x)[..., None].astype(x.dtype)
