"""The convolutional VAE of Zimmerer et al. (MICCAI 2019), as used by Zhou, Deng & Wu.

64x64x1 in and out. Encoder: four 4x4 stride-2 convolutions (16-32-64-256 channels,
64->32->16->8->4 pixels) with LeakyReLU(0.01), then a latent head giving mu and log_sigma
(log standard deviation). Decoder mirrors it with transposed convolutions. No biases and
no normalisation layers, as in the reference code (REFERENCE.md §1).

The 4x4-map <-> 1x1-latent layers are convolutions with a 4x4 kernel over a 4x4 map, i.e.
dense layers; they are written as Dense + reshape because XLA runs the padded-conv form with
~16x wasted work (measured: the Dense form is ~40% faster for input gradients).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _leaky(x):
    return nn.leaky_relu(x, negative_slope=0.01)


class ConvVAE(nn.Module):
    """Convolutional VAE / beta-VAE for 64x64x1 images.

    Attributes:
      latent_dim: size l of the latent code (paper: 32, 64, 256).
      channels: encoder channels of the four stride-2 convolutions.
      image_size: input height = width (64; must be 16 * 2**k for 4 halvings to a 4x4 map).
    """

    latent_dim: int = 256
    channels: Sequence[int] = (16, 32, 64, 256)
    image_size: int = 64

    def setup(self):
        kw = dict(kernel_size=(4, 4), strides=(2, 2), use_bias=False)
        self.enc_convs = [nn.Conv(c, padding=((1, 1), (1, 1)), **kw) for c in self.channels]
        self.enc_head = nn.Dense(2 * self.latent_dim, use_bias=False)
        self.dec_head = nn.Dense(self._bottom**2 * self.channels[-1], use_bias=False)
        # PyTorch ConvTranspose2d(k=4, s=2, p=1) == lax.conv_transpose with padding k-1-p = 2
        # on each side: output exactly twice the input size.
        dec_channels = list(self.channels[-2::-1]) + [1]
        self.dec_convs = [nn.ConvTranspose(c, padding=((2, 2), (2, 2)), **kw)
                          for c in dec_channels]

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

    def __call__(self, x, key=None):
        """Reconstruct x; z = mu without a key, a reparameterised sample with one.

        Returns:
          (recon (N, 64, 64, 1), {"mu": (N, l), "log_sigma": (N, l)}).
        """
        mu, log_sigma = self.encode(x)
        z = mu if key is None else mu + jnp.exp(log_sigma) * jax.random.normal(key, mu.shape)
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
