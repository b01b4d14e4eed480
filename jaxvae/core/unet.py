"""The denoising auto-encoder's network: a U-Net that maps a noisy slice to a clean one.

After Kascenas et al., "Denoising autoencoders for unsupervised anomaly detection in brain
MRI" (MIDL 2022; their code: AntanasKascenas/DenoisingAE, src/unet.py and denoising.py),
read for the design, not copied:
- `depth` levels (the reference: 4), `width` channels at the first (the reference trains
  wf = 6: 64, doubling per level: 64-128-256-512);
- each level two 3x3 convolutions, each of the map reflection-padded by one pixel, with a
  weight-standardised kernel (per output channel zero mean and unit standard deviation,
  the reference's WNConv2d) and a bias, then swish, then group normalisation with the
  middle divisor of the channel count as the number of groups (the reference's
  `get_groups`: 8 groups of 64 channels, 16 of 128 and of 256, 32 of 512);
- 2x2 average pooling down, 2x2 stride-2 transposed convolutions up, the skip connection
  concatenated after the upsampled map;
- a 1x1 convolution to the C input channels (the reference's `n_classes = n_input`), no
  activation: the network predicts the clean image.
Channels-last (N, H, W, C) like the ConvVAE, for 64x64 and 128x128 slices of C sequences.
The network follows the reference; the training noise deviates in one detail (its random
roll is drawn per image, jaxvae.core.noise).
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxvae.base.errors import ConfigError

IMAGE_SIZES = (64, 128)
WS_EPS = 1e-5  # added to the kernel's standard deviation, as in the reference
GN_EPS = 1e-5  # torch.nn.GroupNorm's epsilon


def groups_for(channels: int) -> int:
    """The number of groups of a GroupNorm over `channels`: the middle one of its sorted
    divisors (for 64: of 1, 2, 4, 8, 16, 32, 64 the fourth, 8)."""
    divisors = sorted({d for i in range(1, math.isqrt(channels) + 1) if channels % i == 0
                       for d in (i, channels // i)})
    return divisors[len(divisors) // 2]


def standardise(kernel):
    """A (kh, kw, in, out) kernel with zero mean and unit standard deviation (unbiased, as
    torch's `std`) per output channel, WS_EPS added to the deviation."""
    flat = kernel.reshape(-1, kernel.shape[-1])
    centred = flat - flat.mean(0)
    std = jnp.sqrt(jnp.sum(centred ** 2, 0) / (flat.shape[0] - 1))
    return (centred / (std + WS_EPS)).reshape(kernel.shape)


class StandardisedConv(nn.Module):
    """A 3x3 convolution, weight-standardised, of the map reflection-padded by one pixel."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
        y = lax.conv_general_dilated(x, standardise(kernel).astype(x.dtype), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(x.dtype)


class ConvBlock(nn.Module):
    """(StandardisedConv -> swish -> GroupNorm) twice: one level of the U-Net."""

    features: int

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.swish(StandardisedConv(self.features)(x))
            x = nn.GroupNorm(num_groups=groups_for(self.features), epsilon=GN_EPS)(x)
        return x


class UNet(nn.Module):
    """The DAE's U-Net: (N, S, S, C) noisy images -> (N, S, S, C) predicted clean images.

    Attributes:
      depth: levels (the reference: 4); the image size must halve depth - 1 times.
      width: channels of the first level, doubled per level (the reference: 64).
      image_size: S, 64 or 128 (the slices the run was trained on).
      in_channels: C, the sequences stacked as channels.
    """

    depth: int = 4
    width: int = 64
    image_size: int = 64
    in_channels: int = 1

    def __post_init__(self):
        if self.image_size not in IMAGE_SIZES:
            raise ConfigError(f"image_size must be one of {', '.join(map(str, IMAGE_SIZES))}, "
                              f"got {self.image_size!r}")
        if not 1 <= self.depth <= 5 or self.width < 1 or self.in_channels < 1:
            raise ConfigError(f"need 1 <= depth <= 5, width >= 1, in_channels >= 1 (got "
                              f"depth={self.depth}, width={self.width}, "
                              f"in_channels={self.in_channels})")
        super().__post_init__()

    @nn.compact
    def __call__(self, x):
        skips = []
        for level in range(self.depth):
            x = ConvBlock(self.width * 2 ** level)(x)
            if level < self.depth - 1:
                skips.append(x)
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        for level in reversed(range(self.depth - 1)):
            features = self.width * 2 ** level
            x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID")(x)
            x = ConvBlock(features)(jnp.concatenate([x, skips[level]], axis=-1))
        return nn.Conv(self.in_channels, (1, 1))(x)


@functools.partial(jax.jit, static_argnums=0)
def init_unet(model: UNet, key):
    """Parameters of a U-Net (jitted, compiled once per model: an eager Flax init compiles
    each small op alone)."""
    x = jnp.zeros((1, model.image_size, model.image_size, model.in_channels), jnp.float32)
    return model.init(key, x)["params"]


def denoise(model: UNet, params, x):
    """The network's prediction of the clean images (N, S, S, C) from images `x`."""
    return model.apply({"params": params}, x)
