"""The convolutional VAE of Zimmerer et al. (MICCAI 2019), as used by Zhou, Deng & Wu.

64x64x1 in and out. Encoder: four 4x4 stride-2 convolutions (16-32-64-256 channels,
64->32->16->8->4 pixels) with LeakyReLU(0.01), then a latent head giving mu and log_sigma
(log standard deviation). Decoder mirrors it with transposed convolutions. No biases and
no normalisation layers, as in the reference code (REFERENCE.md §1).

The 4x4-map <-> 1x1-latent layers are convolutions with a 4x4 kernel over a 4x4 map, i.e.
dense layers; they are written as Dense + reshape because XLA runs the padded-conv form with
~16x wasted work (measured: the Dense form is ~40% faster for input gradients).

How the 4x4 stride-2 (transposed) convolutions are computed is a per-backend choice
(`conv_impl`); the parameters (HWIO kernels, as flax nn.Conv / nn.ConvTranspose) and the
maths are the same either way:

* "lax": one strided `lax.conv_general_dilated` / `lax.conv_transpose`, the textbook form.
* "s2d" (space-to-depth): the strided convolution as a 2x2 stride-1 convolution on 2x2
  pixel blocks folded into channels, and the transposed convolution as one dense 2x2
  stride-1 convolution to the four output phases. No dilated convolution appears, neither
  forward nor in any gradient. On XLA:CPU dilated convolutions (transposed convolutions and
  the input gradient of strided ones) take a slow generic kernel: measured on a 2-core
  EPYC (`python -m benchmarks.variants`), s2d makes the training step 2.0x and the fused
  gradient maps 1.25x faster.
* "auto" (default): s2d on CPU, lax elsewhere (cuDNN / TPU convolutions handle strides and
  dilation natively; measure with `benchmarks/gpu.sh` before changing that).
* "auto_inference": on CPU the fastest form per layer for a forward pass and *input*
  gradients, which is all `anomaly_maps` and `project` need (they switch an "auto" model to
  it): the 1-channel first convolution as four shifted slices x one matmul, the wide layers
  (>= 32 input channels; decoder >= 64) as lax, the rest s2d. Measured at batch 64 on the
  2-core EPYC (`python -m benchmarks.variants --parts maps projection`): fused maps +13 %,
  projection +4 % over s2d everywhere. Not the default, because the lax transposed
  convolution's *weight* gradient is the slow path s2d avoids: training and any gradient
  with respect to the parameters want "auto".
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

CONV_IMPLS = ("auto", "lax", "s2d", "auto_inference")


NEGATIVE_SLOPE = 0.01


def _leaky(x):
    """LeakyReLU(0.01) whose derivative at exactly 0 is the slope, as PyTorch's (and so the
    reference code's): flax's `x >= 0` form gives 1 there, and with an exact-zero background
    and bias-free convolutions every all-background patch sits at 0, so this decides the
    gradient maps over the whole background."""
    return jnp.where(x > 0, x, NEGATIVE_SLOPE * x)


def resolve_conv_impl(impl: str, *, transpose: bool = False, in_channels: int = 0) -> str:
    """The form one layer uses: "lax", "s2d" or "s2d_dot" (see the module docstring)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; choose from {CONV_IMPLS}")
    if impl in ("lax", "s2d"):
        return impl
    if jax.default_backend() != "cpu":
        return "lax"
    if impl == "auto" or in_channels == 0:
        return "s2d"
    if transpose:  # auto_inference
        return "lax" if in_channels >= 64 else "s2d"
    return "s2d_dot" if in_channels == 1 else "lax" if in_channels >= 32 else "s2d"


def inference_model(model):
    """The model `anomaly_maps` and `project` run: "auto" becomes "auto_inference" (the same
    parameters and maths, the fastest forms for input gradients)."""
    return model.clone(conv_impl="auto_inference") if model.conv_impl == "auto" else model


_NHWC = ("NHWC", "HWIO", "NHWC")


def space_to_depth(x):
    """Pad 1 and fold 2x2 blocks into channels: (N, H, W, C) -> (N, H/2+1, W/2+1, 4C)."""
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xp = xp.reshape(n, h // 2 + 1, 2, w // 2 + 1, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return xp.reshape(n, h // 2 + 1, w // 2 + 1, 4 * c)


def s2d_kernel(k):
    """(4, 4, C, O) -> (2, 2, 4C, O): K2[p, q, (u, v, c)] = K[2p + u, 2q + v, c]."""
    _, _, c, o = k.shape
    return k.reshape(2, 2, 2, 2, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * c, o)


def s2d_transpose_kernel(k):
    """(4, 4, C, O) -> (2, 2, C, 4O): K'[p, q, c, (ry, rx, o)] = K[2p + ry, 2q + rx, c, o]."""
    c, o = k.shape[2:]
    return k.reshape(2, 2, 2, 2, c, o).transpose(0, 2, 4, 1, 3, 5).reshape(2, 2, c, 4 * o)


def phases_to_image(y, h, w, o):
    """(N, H+1, W+1, 4O) phase outputs -> (N, 2H, 2W, O): out[2i+ry, 2j+rx] = y[i+ry, j+rx]."""
    y = y.reshape(*y.shape[:3], 2, 2, o)
    rows = [jnp.stack([y[:, ry:ry + h, rx:rx + w, ry, rx] for rx in (0, 1)], axis=3)
            for ry in (0, 1)]
    return jnp.stack(rows, axis=2).reshape(y.shape[0], 2 * h, 2 * w, o)


def conv_down(x, k, impl="lax"):
    """4x4 stride-2 convolution with padding 1 (NHWC, HWIO kernel): H -> H/2."""
    if impl == "s2d":
        return lax.conv_general_dilated(space_to_depth(x), s2d_kernel(k), (1, 1), "VALID",
                                        dimension_numbers=_NHWC)
    if impl == "s2d_dot":  # the 2x2 convolution as 4 shifted slices x one matmul
        s = space_to_depth(x)
        ho, wo = s.shape[1] - 1, s.shape[2] - 1
        cols = jnp.concatenate([s[:, p:p + ho, q:q + wo] for p in (0, 1) for q in (0, 1)], -1)
        return cols @ s2d_kernel(k).reshape(-1, k.shape[-1])
    return lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def conv_up(h, k, impl="lax"):
    """PyTorch ConvTranspose2d(k=4, s=2, p=1) with an HWIO kernel (flax nn.ConvTranspose,
    padding 2 = k - 1 - p on each side): H -> 2H."""
    if impl == "s2d":
        n, hh, ww, _ = h.shape
        hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = lax.conv_general_dilated(hp, s2d_transpose_kernel(k), (1, 1), "VALID",
                                     dimension_numbers=_NHWC)
        return phases_to_image(y, hh, ww, k.shape[-1])
    return lax.conv_transpose(h, k, (2, 2), ((2, 2), (2, 2)), dimension_numbers=_NHWC)


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
        impl = resolve_conv_impl(self.impl, transpose=self.transpose, in_channels=x.shape[-1])
        return (conv_up if self.transpose else conv_down)(x, k, impl)


class ConvVAE(nn.Module):
    """Convolutional VAE / beta-VAE for 64x64x1 images.

    Attributes:
      latent_dim: size l of the latent code (paper: 32, 64, 256).
      channels: encoder channels of the four stride-2 convolutions.
      image_size: input height = width (64; must be 16 * 2**k for 4 halvings to a 4x4 map).
      conv_impl: "auto", "lax", "s2d" or "auto_inference": how the convolutions are computed
        (see the module docstring); the parameters and the result are the same.
    """

    latent_dim: int = 256
    channels: Sequence[int] = (16, 32, 64, 256)
    image_size: int = 64
    conv_impl: str = "auto"

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
