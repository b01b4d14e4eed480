"""Tests of jaxvae.core.unet: the DAE's U-Net (shapes at 64 / 128 and C channels, the
reference's group counts, weight standardisation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvae.base.errors import ConfigError
from jaxvae.core.unet import UNet, denoise, groups_for, init_unet, standardise

# jitted: eager Flax applies compile each small op on its own (tens of seconds on CPU)
jdenoise = jax.jit(denoise, static_argnums=0)


@pytest.mark.parametrize("size,channels", [(64, 1), (64, 2),
                                           pytest.param(128, 3, marks=pytest.mark.slow)])
def test_the_unet_maps_images_to_images_of_the_same_shape(size, channels):
    model = UNet(width=4, image_size=size, in_channels=channels)
    params = init_unet(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, size, size, channels))
    y = jdenoise(model, params, x)
    assert y.shape == x.shape and y.dtype == jnp.float32 and bool(jnp.isfinite(y).all())
    # four levels: the deepest map is size / 8, with 8x the first level's channels
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["ConvBlock_3"]["StandardisedConv_0"]["kernel"] == (3, 3, 16, 32)
    assert shapes["Conv_0"]["kernel"] == (1, 1, 4, channels)


def test_group_counts_are_the_references():
    assert [groups_for(c) for c in (64, 128, 256, 512)] == [8, 16, 16, 32]
    assert groups_for(1) == 1 and groups_for(7) == 7


def test_weight_standardisation_makes_the_kernel_scale_free():
    k = jax.random.normal(jax.random.key(0), (3, 3, 5, 7)) * 3 + 1
    s = np.asarray(standardise(k)).reshape(-1, 7)
    np.testing.assert_allclose(s.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(s.std(0, ddof=1), 1, rtol=1e-4)
    # so the network's output does not change when a kernel is scaled (the bias is not)
    model = UNet(width=4, depth=2)
    params = init_unet(model, jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (1, 64, 64, 1))
    scaled = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 5.0 if "StandardisedConv" in jax.tree_util.keystr(p)
        and "kernel" in jax.tree_util.keystr(p) else v, params)
    np.testing.assert_allclose(jdenoise(model, scaled, x), jdenoise(model, params, x),
                               rtol=1e-4, atol=1e-4)


def test_the_network_depends_on_its_input_everywhere():
    model = UNet(width=4)
    params = init_unet(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 64, 64, 1))
    g = jax.jit(jax.grad(lambda x: denoise(model, params, x)[0, 32, 32, 0]))(x)
    assert float(jnp.abs(g).max()) > 0 and int((g != 0).sum()) > 100  # skips and depth


@pytest.mark.parametrize("bad", [{"image_size": 96}, {"depth": 0}, {"width": 0},
                                 {"in_channels": 0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        UNet(**bad)
