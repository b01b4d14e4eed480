"""On-the-fly augmentation of training slices: rotation, zoom, mirror, brightness, contrast, noise.

Follows docs/method.md §6 (the reference code's ranges are AugmentConfig's defaults). Every
draw is a function of the key alone: image i of a batch uses fold_in(key, i), and inside one
image each random quantity has its own fold_in index, so an augmentation that is switched
off does not shift the draws of the others.

Images of C channels (co-registered sequences) are augmented as one: the same rotation,
zoom, mirror, brightness and contrast factor for every channel (contrast about each
channel's own mean, as each sequence is normalised on its own), noise drawn per pixel
and channel. An (H, W) image is augmented exactly as before channels existed.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from jaxvae.base.errors import ConfigError


def _pair(name, value):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"augmentation {name} must be a (low, high) pair, "
                          f"got {value!r}") from None
    if not lo <= hi:
        raise ConfigError(f"augmentation {name} range must have low <= high, got {value!r}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the on-the-fly augmentation, each drawn uniformly per image.

    Attributes:
      rotation: maximum |angle| in radians (angle ~ U(-rotation, rotation)).
      scale: (low, high) zoom factor; > 1 enlarges the image.
      brightness: (low, high) multiplicative intensity factor.
      contrast: (low, high) factor on the deviation from the image mean (off by default:
        the reference code changes brightness only).
      noise_std: standard deviation of the additive Gaussian noise (z-score units).
      mirror_prob: probability of a left-right mirror (last axis).
    """

    rotation: float = 0.1
    scale: tuple[float, float] = (0.9, 1.2)
    brightness: tuple[float, float] = (0.95, 1.1)
    contrast: tuple[float, float] = (1.0, 1.0)
    noise_std: float = 0.05
    mirror_prob: float = 0.5

    def __post_init__(self):
        for name in ("scale", "brightness", "contrast"):
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        for name in ("rotation", "noise_std", "mirror_prob"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.rotation < 0 or self.noise_std < 0:
            raise ConfigError("augmentation rotation and noise_std must be >= 0")
        if self.scale[0] <= 0:
            raise ConfigError(f"augmentation scale must be > 0, got {self.scale}")
        if not 0 <= self.mirror_prob <= 1:
            raise ConfigError(f"augmentation mirror_prob must be in [0, 1], got {self.mirror_prob}")

    @classmethod
    def neutral(cls) -> "AugmentConfig":
        """Ranges that leave every image unchanged."""
        return cls(rotation=0.0, scale=(1.0, 1.0), brightness=(1.0, 1.0), contrast=(1.0, 1.0),
                   noise_std=0.0, mirror_prob=0.0)


def affine_resample(image, angle, scale, flip):
    """Rotate, zoom and optionally mirror an image about its centre (bilinear, zero outside).

    Output pixel p samples the input at c + A^-1 (p - c), A = mirror . scale . rotation.

    Args:
      image: (H, W) or (H, W, C) float image; every channel is resampled the same way.
      angle: rotation in radians (scalar).
      scale: zoom factor (scalar, > 1 enlarges).
      flip: bool scalar, mirror the width axis.

    Returns:
      image of the same shape and dtype.
    """
    if image.ndim == 3:
        return jax.vmap(affine_resample, in_axes=(2, None, None, None), out_axes=2)(
            image, angle, scale, flip)
    h, w = image.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=image.dtype), jnp.arange(w, dtype=image.dtype),
                          indexing="ij")
    dy, dx = yy - cy, xx - cx
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    sy = (cos * dy + sin * dx) / scale
    sx = (cos * dx - sin * dy) / scale
    sx = jnp.where(flip, -sx, sx)
    return map_coordinates(image, [sy + cy, sx + cx], order=1, mode="constant", cval=0.0)


def augment_image(key, image, aug: AugmentConfig):
    """One random augmentation of one (H, W) or (H, W, C) image; ops whose range is neutral
    are skipped.

    Geometry (rotation, scale, mirror) is one bilinear resampling; then brightness,
    contrast about the image mean, and additive Gaussian noise.
    """
    def k(i):
        return jax.random.fold_in(key, i)

    def uniform(i, lo, hi):
        return jax.random.uniform(k(i), (), image.dtype, lo, hi)

    x = image
    if aug.rotation > 0 or aug.scale != (1.0, 1.0) or aug.mirror_prob > 0:
        angle = uniform(0, -aug.rotation, aug.rotation)
        scale = uniform(1, *aug.scale)
        flip = jax.random.uniform(k(2), ()) < aug.mirror_prob
        x = affine_resample(x, angle, scale, flip)
    if aug.brightness != (1.0, 1.0):
        x = x * uniform(3, *aug.brightness)
    if aug.contrast != (1.0, 1.0):
        m = jnp.mean(x, axis=(0, 1))  # per channel; the image's mean for (H, W)
        x = (x - m) * uniform(4, *aug.contrast) + m
    if aug.noise_std > 0:
        x = x + aug.noise_std * jax.random.normal(k(5), x.shape, x.dtype)
    return x


def augment_images(key, images, aug: AugmentConfig):
    """`augment_batch` without the jit, to be traced inside another jitted function."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    return jax.vmap(augment_image, in_axes=(0, 0, None))(keys, images, aug)


augment_batch = jax.jit(augment_images, static_argnames="aug")
augment_batch.__doc__ = """Augment a batch, image i with key fold_in(key, i) (jitted, vmapped).

Args:
  key: PRNG key.
  images: (N, H, W) or (N, H, W, C) float images (the channels of an image augmented
    together, see the module docstring).
  aug: AugmentConfig (static).

Returns:
  augmented images, same shape and dtype.
"""
