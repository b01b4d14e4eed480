"""The convolutional VAE of Zimmerer et al. (MICCAI 2019), as used by Zhou, Deng & Wu.

64x64x1 in and out. Encoder: four 4x4 stride-2 convolutions (16-32-64-256 channels,
64->32->16->8->4 pixels) with LeakyReLU(0.01), then a latent head giving mu and log_sigma
(log standard deviation). Decoder mirrors it with transposed convolutions. No biases and
no normalisation layers, as in the reference code (REFERENCE.md §1).

The 4x4-map <-> 1x1-latent layers are convolutions with a 4x4 kernel over a 4x4 map, i.e.
dense layers; they are written as Dense + reshape, the same maths without the padded-conv
form's wasted work. How the stride-2 convolutions are computed is the plain attribute
`conv_impl` (jaxvae.convs); the parameters and the maths are the same for every form.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxvae.convs import CONV_IMPLS, conv_down, conv_up, layer_form

NEGATIVE_SLOPE = 0.01


def _leaky(x):
    """LeakyReLU(0.01) whose derivative at exactly 0 is the slope, as PyTorch's (and so the
    reference code's): flax's `x >= 0` form gives 1 there, and with an exact-zero background
    and bias-free convolutions every all-background patch sits at 0, so this decides the
    gradient maps over the whole background."""
    return jnp.where(x > 0, x, NEGATIVE_SLOPE * x)


class _Conv4x4(nn.Module):
    """A bias-free 4x4 stride-2 (transposed) convolution with a flax-compatible 'kernel'."""

    features: int
    transpose: bool
    impl: str

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(),
                       (4, 4, x.shape[-1], self.features), jnp.float32)
        x, k = promote_dtype(x, k)
        impl = layer_form(self.impl, transpose=self.transpose, in_channels=x.shape[-1])
        return (conv_up if self.transpose else conv_down)(x, k, impl)


class ConvVAE(nn.Module):
    """Convolutional VAE / beta-VAE for 64x64x1 images.

    Attributes:
      latent_dim: size l of the latent code (paper: 32, 64, 256).
      channels: encoder channels of the four stride-2 convolutions.
      image_size: input height = width (64; must be 16 * 2**k for 4 halvings to a 4x4 map).
      conv_impl: "lax", "s2d" or "cpu_inference": how the convolutions are computed
        (jaxvae.convs; chosen per backend by jaxvae.execution); the parameters and the
        result are the same.
    """

    latent_dim: int = 256
    channels: Sequence[int] = (16, 32, 64, 256)
    image_size: int = 64
    conv_impl: str = "lax"

    def __post_init__(self):
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv_impl {self.conv_impl!r}; choose from {CONV_IMPLS}")
        super().__post_init__()

    def setup(self):
        self.enc_convs = [_Conv4x4(c, False, self.conv_impl) for c in self.channels]
        self.enc_head = nn.Dense(2 * self.latent_dim, use_bias=False)
        self.dec_head = nn.Dense(self._bottom**2 * self.channels[-1], use_bias=False)
        dec_channels = list(self.channels[-2::-1]) + [1]
        self.dec_convs = [_Conv4x4(c, True, self.conv_impl) for c in dec_channels]

    @property
    def _bottom(self) -> int:
        return self.image_size // 2 ** len(self.channels)

    def encode(self, x):
        """(N, 64, 64, 1) images -> (mu, log_sigma), each (N, latent_dim)."""
        h = x
        for conv in self.enc_convs:
            h = _leaky(conv(h))
        h = self.enc_head(h.reshape(h.shape[0], -1))
        mu, log_sigma = jnp.split(h, 2, axis=-1)
        return mu, log_sigma

    def decode(self, z):
        """(N, latent_dim) codes -> (N, 64, 64, 1) reconstructions (no output activation)."""
        b = self._bottom
        h = _leaky(self.dec_head(z)).reshape(z.shape[0], b, b, self.channels[-1])
        for i, conv in enumerate(self.dec_convs):
            h = conv(h)
            if i < len(self.dec_convs) - 1:
                h = _leaky(h)
        return h

    def __call__(self, x, key=None, *, eps=None):
        """Reconstruct x from z = mu, or from the reparameterised z = mu + sigma * eps.

        Args:
          x: (N, 64, 64, 1) images.
          key: PRNG key drawing eps ~ N(0, I) of shape (N, l); ignored when eps is given.
          eps: (N, l) standard normal noise (a caller that slices a batch into pieces
            passes its own draws so the pieces see the same noise as the whole batch).

        Returns:
          (recon (N, 64, 64, 1), {"mu": (N, l), "log_sigma": (N, l)}).
        """
        mu, log_sigma = self.encode(x)
        if eps is None and key is not None:
            eps = jax.random.normal(key, mu.shape, mu.dtype)
        z = mu if eps is None else mu + jnp.exp(log_sigma) * eps
        return self.decode(z), {"mu": mu, "log_sigma": log_sigma}


def init_params(model: ConvVAE, key):
    """Initialise the model's parameters (a pytree of arrays) from a PRNG key."""
    x = jnp.zeros((1, model.image_size, model.image_size, 1), jnp.float32)
    return model.init(key, x)["params"]


def encode(model: ConvVAE, params, x):
    """Pure encoder: (N, 64, 64, 1) -> (mu, log_sigma), each (N, latent_dim)."""
    return model.apply({"params": params}, x, method=ConvVAE.encode)


def decode(model: ConvVAE, params, z):
    """Pure decoder: (N, latent_dim) -> (N, 64, 64, 1)."""
    return model.apply({"params": params}, z, method=ConvVAE.decode)


def reconstruct(model: ConvVAE, params, x):
    """Pure reconstruction from z = mu: (N, 64, 64, 1) -> (N, 64, 64, 1)."""
    return decode(model, params, encode(model, params, x)[0])
