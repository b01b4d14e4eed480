"""The convolutional VAE of Zimmerer et al. (MICCAI 2019), as used by Zhou, Deng & Wu.

64x64x1 in and out (the paper's model). Encoder: four 4x4 stride-2 convolutions
(16-32-64-256 channels, 64->32->16->8->4 pixels) with LeakyReLU(0.01), then a latent head
giving mu and log_sigma (log standard deviation). Decoder mirrors it with transposed
convolutions. No biases and no normalisation layers, as in the reference code
(docs/method.md §1).

Beyond the paper (issue #15): 128x128 images and C co-registered sequences as channels.
A 128 model puts one more stride-2 stage of channels[0] features in front (128->64), so
from the 64x64 map down it is the 64 model's encoder, ending on the same 4x4 map and
latent head; the decoder mirrors it, ending with a 64->128 stage to C channels. The 64x64x1
model and its parameter names are unchanged (old checkpoints load as they are).

The 4x4-map <-> 1x1-latent layers are convolutions with a 4x4 kernel over a 4x4 map, i.e.
dense layers; they are written as Dense + reshape, the same maths without the padded-conv
form's wasted work. How the stride-2 convolutions are computed is the plain attribute
`conv_impl` (jaxvae.core.convs); the parameters and the maths are the same for every form.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from jaxvae.base.errors import ConfigError
from jaxvae.core.convs import CONV_IMPLS, conv_down, conv_up, layer_form

NEGATIVE_SLOPE = 0.01
IMAGE_SIZES = (64, 128)


def leaky(x):
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
    """Convolutional VAE / beta-VAE for 64x64 or 128x128 images of C channels.

    Attributes:
      latent_dim: size l of the latent code (paper: 32, 64, 256).
      channels: encoder channels of the four stride-2 convolutions from a 64x64 map down
        to the 4x4 map (the paper's model).
      image_size: input height = width, 64 or 128. The 128 model has five stride-2 stages,
        (channels[0], *channels): its first stage 128->64 repeats the first width, then the
        64 model's four stages follow (`stage_channels`). The decoder mirrors them.
      in_channels: C, the image channels (co-registered sequences); the decoder outputs C
        channels, the mean of the unit-variance Gaussian likelihood of each.
      conv_impl: "lax", "s2d" or "cpu_inference": how the convolutions are computed
        (jaxvae.core.convs; chosen per backend by jaxvae.runtime.execution); the parameters and the
        result are the same.

    Parameters: enc_convs_i / dec_convs_i (i < number of stages), enc_head, dec_head; the
    64x64x1 model's tree is the one of every jaxvae release before issue #15.

    Raises:
      ConfigError: image_size not in IMAGE_SIZES, channels not 4 positive ints, or
        in_channels < 1.
    """

    latent_dim: int = 256
    channels: Sequence[int] = (16, 32, 64, 256)
    image_size: int = 64
    in_channels: int = 1
    conv_impl: str = "lax"

    def __post_init__(self):
        if self.conv_impl not in CONV_IMPLS:
            raise ConfigError(f"unknown conv_impl {self.conv_impl!r}; choose from {CONV_IMPLS}")
        if self.image_size not in IMAGE_SIZES:
            raise ConfigError(f"image_size must be one of {', '.join(map(str, IMAGE_SIZES))}, "
                              f"got {self.image_size!r}")
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise ConfigError(f"channels must be 4 positive ints (the stages from a 64x64 map "
                              f"to 4x4), got {tuple(self.channels)}")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be >= 1, got {self.in_channels}")
        super().__post_init__()

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Output channels of every encoder stage: one stage per halving down to 4x4."""
        extra = IMAGE_SIZES.index(self.image_size)  # stages in front of the 64 model's
        return (self.channels[0],) * extra + tuple(self.channels)

    def setup(self):
        ch = self.stage_channels
        self.enc_convs = [_Conv4x4(c, False, self.conv_impl) for c in ch]
        self.enc_head = nn.Dense(2 * self.latent_dim, use_bias=False)
        self.dec_head = nn.Dense(self._bottom**2 * ch[-1], use_bias=False)
        dec_channels = [*ch[-2::-1], self.in_channels]
        self.dec_convs = [_Conv4x4(c, True, self.conv_impl) for c in dec_channels]

    @property
    def _bottom(self) -> int:
        return self.image_size // 2 ** len(self.stage_channels)

    def encode(self, x):
        """(N, S, S, C) images -> (mu, log_sigma), each (N, latent_dim)."""
        h = x
        for conv in self.enc_convs:
            h = leaky(conv(h))
        h = self.enc_head(h.reshape(h.shape[0], -1))
        mu, log_sigma = jnp.split(h, 2, axis=-1)
        return mu, log_sigma

    def decode(self, z):
        """(N, latent_dim) codes -> (N, S, S, C) reconstructions (no output activation)."""
        b = self._bottom
        h = leaky(self.dec_head(z)).reshape(z.shape[0], b, b, self.stage_channels[-1])
        for i, conv in enumerate(self.dec_convs):
            h = conv(h)
            if i < len(self.dec_convs) - 1:
                h = leaky(h)
        return h

    def __call__(self, x, key=None, *, eps=None):
        """Reconstruct x from z = mu, or from the reparameterised z = mu + sigma * eps.

        Args:
          x: (N, S, S, C) images.
          key: PRNG key drawing eps ~ N(0, I) of shape (N, l); ignored when eps is given.
          eps: (N, l) standard normal noise (a caller that slices a batch into pieces
            passes its own draws so the pieces see the same noise as the whole batch).

        Returns:
          (recon (N, S, S, C), {"mu": (N, l), "log_sigma": (N, l)}).
        """
        mu, log_sigma = self.encode(x)
        if eps is None and key is not None:
            eps = jax.random.normal(key, mu.shape, mu.dtype)
        z = mu if eps is None else mu + jnp.exp(log_sigma) * eps
        return self.decode(z), {"mu": mu, "log_sigma": log_sigma}


def check_input(model: ConvVAE, shape, what="images") -> None:
    """Raise ConfigError unless `shape` is (N, S, S, C) of the model's size and channels."""
    want = (model.image_size, model.image_size, model.in_channels)
    if len(shape) != 4 or tuple(shape[1:]) != want:
        raise ConfigError(f"{what} of shape {tuple(shape)} do not fit a model of "
                          f"{model.image_size}x{model.image_size} images with "
                          f"{model.in_channels} channel(s): expected "
                          f"(N, {', '.join(map(str, want))})")


def init_params(model: ConvVAE, key):
    """Initialise the model's parameters (a pytree of arrays) from a PRNG key."""
    x = jnp.zeros((1, model.image_size, model.image_size, model.in_channels), jnp.float32)
    return model.init(key, x)["params"]


def encode(model: ConvVAE, params, x):
    """Pure encoder: (N, S, S, C) -> (mu, log_sigma), each (N, latent_dim)."""
    return model.apply({"params": params}, x, method=ConvVAE.encode)


def decode(model: ConvVAE, params, z):
    """Pure decoder: (N, latent_dim) -> (N, S, S, C)."""
    return model.apply({"params": params}, z, method=ConvVAE.decode)


def reconstruct(model: ConvVAE, params, x):
    """Pure reconstruction from z = mu: (N, S, S, C) -> (N, S, S, C)."""
    return decode(model, params, encode(model, params, x)[0])
