import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvae
from jaxvae.base.errors import ConfigError
from jaxvae.core import losses


def _count(params):
    return sum(a.size for a in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize("latent", [32, 64, 256])
def test_parameter_count_matches_reference_architecture(latent):
    params = jaxvae.init_params(jaxvae.ConvVAE(latent_dim=latent), jax.random.key(0))
    convs = 16 * (1 * 16 + 16 * 32 + 32 * 64 + 64 * 256)  # 4x4 kernels, no biases
    head = 4 * 4 * 256 * 2 * latent + latent * 4 * 4 * 256
    assert _count(params) == 2 * convs + head


# The 64x64x1 model's parameter tree (names and kernel shapes) as of every release before
# issue #15, for a latent_dim: a checkpoint saved then must still load and score.
def _frozen_64_tree(latent):
    convs = {"enc_convs_0": (4, 4, 1, 16), "enc_convs_1": (4, 4, 16, 32),
             "enc_convs_2": (4, 4, 32, 64), "enc_convs_3": (4, 4, 64, 256),
             "dec_convs_0": (4, 4, 256, 64), "dec_convs_1": (4, 4, 64, 32),
             "dec_convs_2": (4, 4, 32, 16), "dec_convs_3": (4, 4, 16, 1)}
    heads = {"enc_head": (4 * 4 * 256, 2 * latent), "dec_head": (latent, 4 * 4 * 256)}
    return {k: {"kernel": v} for k, v in {**convs, **heads}.items()}


@pytest.mark.parametrize("latent", [32, 256])
def test_the_64_model_parameter_tree_is_unchanged(latent):
    for model in (jaxvae.ConvVAE(latent_dim=latent),
                  jaxvae.ConvVAE(latent_dim=latent, image_size=64, in_channels=1)):
        shapes = jax.eval_shape(lambda m=model: jaxvae.init_params(m, jax.random.key(0)))
        assert jax.tree_util.tree_map(lambda a: a.shape, shapes) == _frozen_64_tree(latent)


def test_128_and_multichannel_parameter_counts():
    def count(**kw):
        return _count(jax.eval_shape(lambda: jaxvae.init_params(jaxvae.ConvVAE(**kw),
                                                                jax.random.key(0))))
    base = count(latent_dim=256)
    # 128: one more 16 -> 16 stage each way; C channels: C x the first and last kernels
    assert count(latent_dim=256, image_size=128) == base + 2 * 16 * 16 * 16
    assert count(latent_dim=256, in_channels=2) == base + 2 * 16 * 16
    assert count(latent_dim=256, image_size=128, in_channels=3) == base + 2 * 16 * 16 * (16 + 2)
    with pytest.raises(jaxvae.ConfigError, match="64, 128"):
        jaxvae.ConvVAE(image_size=32)
    with pytest.raises(jaxvae.ConfigError, match="4 positive ints"):
        jaxvae.ConvVAE(channels=(16, 32, 64))


def test_encode_decode_shapes():
    model = jaxvae.ConvVAE(latent_dim=32)
    params = jaxvae.init_params(model, jax.random.key(0))
    x = jnp.zeros((5, 64, 64, 1))
    mu, log_sigma = jaxvae.encode(model, params, x)
    assert mu.shape == log_sigma.shape == (5, 32)
    assert jaxvae.decode(model, params, mu).shape == (5, 64, 64, 1)
    recon, aux = model.apply({"params": params}, x)
    assert recon.shape == x.shape and set(aux) == {"mu", "log_sigma"}
    sampled, _ = model.apply({"params": params}, x + 1.0, key=jax.random.key(1))
    deterministic, _ = model.apply({"params": params}, x + 1.0)
    assert not np.allclose(sampled, deterministic)


def test_losses_hand_values():
    x = jnp.array([[1.0, 2.0]])
    x_hat = jnp.array([[0.0, 4.0]])
    np.testing.assert_allclose(losses.squared_error(x, x_hat), [[1.0, 4.0]])
    np.testing.assert_allclose(losses.rec_nll(x, x_hat),
                               [[0.5 + losses.HALF_LOG_2PI, 2.0 + losses.HALF_LOG_2PI]],
                               rtol=1e-6)
    # KL of N(mu, sigma^2) vs N(0, 1) for mu=1, sigma=1 is 0.5; mu=0, sigma=e: (e^2-1-2)/2
    kl = losses.kl_divergence(jnp.array([[1.0], [0.0]]), jnp.array([[0.0], [1.0]]))
    np.testing.assert_allclose(kl, [0.5, 0.5 * (np.e**2 - 3.0)], rtol=1e-6)
    loss, rec, kl2 = losses.beta_elbo(x[..., None], x_hat[..., None], jnp.ones((1, 1)),
                                      jnp.zeros((1, 1)), beta=2.0)
    np.testing.assert_allclose(rec, [2.5 + 2 * losses.HALF_LOG_2PI], rtol=1e-6)
    np.testing.assert_allclose(loss, rec + 2.0 * kl2, rtol=1e-6)


class _FlaxLayersVAE(jaxvae.ConvVAE):
    """The textbook model: flax nn.Conv / nn.ConvTranspose layers (the plain formulation)."""

    def setup(self):
        import flax.linen as nn
        kw = dict(kernel_size=(4, 4), strides=(2, 2), use_bias=False)
        ch = self.stage_channels
        self.enc_convs = [nn.Conv(c, padding=((1, 1), (1, 1)), **kw) for c in ch]
        self.enc_head = nn.Dense(2 * self.latent_dim, use_bias=False)
        self.dec_head = nn.Dense(self._bottom**2 * ch[-1], use_bias=False)
        self.dec_convs = [nn.ConvTranspose(c, padding=((2, 2), (2, 2)), **kw)
                          for c in [*ch[-2::-1], self.in_channels]]


def _loss(model, params, x):
    recon, aux = model.apply({"params": params}, x)
    return jnp.sum(jnp.sin(3 * recon)) + jnp.sum(aux["mu"] ** 2) + jnp.sum(aux["log_sigma"])


@pytest.mark.parametrize("impl", ["lax", "s2d", "cpu_inference"])
@pytest.mark.parametrize("size, c", [(64, 1), (128, 2)])
def test_conv_impls_equal_flax_conv_layers(impl, size, c):
    # (128, 2): cpu_inference picks its per-layer forms by the input channels (2, 16...)
    kw = dict(latent_dim=32, image_size=size, in_channels=c)
    if size != 64:
        kw["channels"] = (8, 16, 16, 32)  # small widths: the stages are under test
    ref_model = _FlaxLayersVAE(**kw)
    model = jaxvae.ConvVAE(**kw, conv_impl=impl)
    ref = jaxvae.init_params(ref_model, jax.random.key(3))
    params = jaxvae.init_params(model, jax.random.key(3))
    # same names, shapes and initial values: checkpoints are interchangeable
    jax.tree_util.tree_map(np.testing.assert_array_equal, ref, params)
    x = jax.random.normal(jax.random.key(4), (3, size, size, c))
    with jax.enable_x64(True):  # float64: no LeakyReLU branch flips from rounding
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        want = jax.grad(_loss, argnums=(1, 2))(ref_model, p64, x64)
        got = jax.grad(_loss, argnums=(1, 2))(model, p64, x64)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9,
                                                                       atol=1e-12), want, got)
        np.testing.assert_allclose(model.apply({"params": p64}, x64)[0],
                                   ref_model.apply({"params": p64}, x64)[0], rtol=1e-9, atol=1e-12)


def test_conv_impl_choices_and_names_are_checked():
    from jaxvae.core.convs import layer_form
    # a plain attribute: the same forms on every backend
    assert {layer_form(i, transpose=False, in_channels=64) for i in ("lax", "s2d")} == {
        "lax", "s2d"}
    forms = {layer_form("cpu_inference", transpose=t, in_channels=c)
             for t in (False, True) for c in (1, 16, 32, 64, 256)}
    assert forms == {"lax", "s2d", "s2d_dot"}
    with pytest.raises(ConfigError, match="conv_impl"):
        layer_form("fast", transpose=False, in_channels=1)
    with pytest.raises(ConfigError, match="conv_impl"):
        jaxvae.ConvVAE(conv_impl="auto")


def test_the_backend_is_read_in_one_module():
    import pathlib
    pkg = pathlib.Path(jaxvae.__file__).parent
    readers = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                     if "default_backend()" in p.read_text())
    assert readers == ["runtime/execution.py"]
