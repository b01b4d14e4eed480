"""The 4x4 stride-2 convolution and its transpose, in forms that compute the same thing.

The parameters are those of flax nn.Conv / nn.ConvTranspose (HWIO kernels, no bias); each
form is tested equal to them (tests/core/test_model.py), so a model can switch forms freely:

* "lax": one strided `lax.conv_general_dilated` / `lax.conv_transpose`, the textbook form.
* "s2d" (space-to-depth): the strided convolution as a 2x2 stride-1 convolution on 2x2
  pixel blocks folded into channels, and the transposed convolution as one dense 2x2
  stride-1 convolution to the four output phases. No dilated convolution appears, neither
  forward nor in any gradient (XLA:CPU runs dilated convolutions on a slow generic kernel).
* "s2d_dot": the strided convolution's 2x2 stride-1 form as four shifted slices times one
  matmul (for few input channels, where a convolution kernel is poorly used).
* "cpu_inference" (a per-layer choice, see `layer_form`): "s2d_dot" for the 1-channel first
  convolution, "lax" for the wide layers, "s2d" for the rest; the fastest forms on XLA:CPU
  for a forward pass and *input* gradients, which is all the maps and the projection need.
  Training wants "s2d": the lax transposed convolution's weight gradient is a slow path.

Which form runs where is chosen by `jaxvae.runtime.execution`, never here (README, Performance).
"""

import jax.numpy as jnp
from jax import lax

from jaxvae.base.errors import ConfigError

CONV_IMPLS = ("lax", "s2d", "cpu_inference")


def layer_form(impl: str, *, transpose: bool, in_channels: int) -> str:
    """The form ("lax", "s2d" or "s2d_dot") one layer runs for a model's `conv_impl`."""
    if impl not in CONV_IMPLS:
        raise ConfigError(f"unknown conv_impl {impl!r}; choose from {CONV_IMPLS}")
    if impl != "cpu_inference":
        return impl
    if transpose:
        return "lax" if in_channels >= 64 else "s2d"
    return "s2d_dot" if in_channels == 1 else "lax" if in_channels >= 32 else "s2d"


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
