"""128x128 images and C channels (issue #15): the model, a train step, every map and the
projection, checked against plain jax.grad of the plain loss as the 64x64x1 ones are
(tests/core/test_predictors.py; the reference maps and tolerances of tests/maps_reference.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from maps_reference import assert_maps_close, obvious_grad_maps

import jaxvae
from jaxvae.base.errors import ConfigError, DataError
from jaxvae.core import losses
from jaxvae.core.augment import AugmentConfig, augment_batch
from jaxvae.core.predictors import PREDICTORS, SIGNED_PREDICTORS, VARIANT_PREDICTORS, smooth
from jaxvae.core.projection import energy
from jaxvae.runtime import batching, execution
from jaxvae.training.config import TrainConfig, model_from_config
from jaxvae.training.epoch import check_images, check_val_images
from jaxvae.training.trainer import make_train_step, train

ALL_MAPS = (*PREDICTORS, *SIGNED_PREDICTORS, *VARIANT_PREDICTORS)
CH = (4, 8, 8, 16)  # small widths: the architecture, not the size, is under test
BETA = 0.7


@pytest.fixture(scope="module", params=[(128, 1), (64, 2), (128, 2)],
                ids=lambda p: f"{p[0]}px-{p[1]}ch")
def setup(request):
    size, c = request.param
    model = jaxvae.ConvVAE(latent_dim=8, channels=CH, image_size=size, in_channels=c)
    params = jaxvae.init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, size, size, c)) * 0.5
    x = x.at[:, :size // 4].set(0.0)  # an exact-zero background, as pre-processed slices
    # at init x_hat ~ 0, so every map would be x's own; scale the last layer to x_hat ~ x
    last = f"dec_convs_{len(model.stage_channels) - 1}"
    x_hat = jaxvae.reconstruct(model, params, x)
    params[last] = {"kernel": params[last]["kernel"] * (0.5 / float(jnp.std(x_hat)))}
    return model, params, x


def test_architecture_one_stage_per_halving_to_the_same_head(setup):
    model, params, x = setup
    size, c = model.image_size, model.in_channels
    stages = {64: 4, 128: 5}[size]
    assert len(model.stage_channels) == stages and model.stage_channels[-4:] == CH
    assert params["enc_convs_0"]["kernel"].shape == (4, 4, c, CH[0])
    assert params[f"dec_convs_{stages - 1}"]["kernel"].shape == (4, 4, CH[0], c)
    assert params["enc_head"]["kernel"].shape == (4 * 4 * CH[-1], 2 * 8)  # from a 4x4 map
    assert set(params) == {f"{p}_convs_{i}" for p in ("enc", "dec") for i in range(stages)} | {
        "enc_head", "dec_head"}
    recon, aux = model.apply({"params": params}, x)
    assert recon.shape == x.shape and aux["mu"].shape == (3, 8)


def test_train_step_loss_is_the_plain_beta_elbo_in_every_conv_form(setup):
    model, params, x = setup
    key = jax.random.key(5)
    eps = jax.random.normal(jax.random.fold_in(key, 1), (x.shape[0], model.latent_dim))
    x_hat, aux = model.apply({"params": params}, x, eps=eps)
    want = float(jnp.mean(losses.beta_elbo(x, x_hat, aux["mu"], aux["log_sigma"], BETA)[0]))
    # one channel is fed as (N, S, S), as `train` does; C channels as (N, S, S, C)
    batch = x[..., 0] if model.in_channels == 1 else x
    for form, micro in (("lax", 0), ("s2d", 2)):  # the accelerator's and the CPU's schedule
        step = make_train_step(model.clone(conv_impl=form), lr=1e-3, beta=BETA,
                               micro_batch=micro)
        new, _, metrics = step(params, optax.adam(1e-3).init(params), batch, key)
        np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5, err_msg=form)
        assert not np.allclose(new["enc_convs_0"]["kernel"], params["enc_convs_0"]["kernel"])
    step = make_train_step(model, lr=1e-3, beta=BETA, augment=AugmentConfig())
    _, _, metrics = step(params, optax.adam(1e-3).init(params), batch, key)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) != want


def test_gradient_maps_equal_plain_jax_grad(setup):
    model, params, x = setup
    maps = jaxvae.anomaly_maps(model, params, x, beta=BETA, smooth_sigma=0.0,
                               predictors=ALL_MAPS)
    assert {k: v.shape for k, v in maps.items()} == {k: x.shape[:3] for k in ALL_MAPS}
    ref = obvious_grad_maps(model, params, x, BETA)  # sum over channels of |jax.grad|
    for name in ref:
        assert_maps_close(maps[name], ref[name], name)
    assert_maps_close(maps["elbo_grad_sum"], obvious_grad_maps(model, params, x, 1.0)["elbo_grad"],
                      "elbo_grad")
    g = jax.grad(lambda x: 0.5 * jnp.sum((x - jaxvae.reconstruct(model, params, x)) ** 2))(x)
    assert_maps_close(maps["rec_grad_pos"], jnp.sum(jnp.maximum(g, 0), -1), "rec_grad")
    if model.in_channels > 1:  # the L1 norm over channels, not |sum over channels|
        assert np.any(maps["rec_grad"] > jnp.abs(jnp.sum(g, -1)) + 1e-3 * maps["rec_grad"].max())


def test_reconstruction_terms_are_summed_over_channels(setup):
    model, params, x = setup
    maps = jaxvae.anomaly_maps(model, params, x, smooth_sigma=2.0,
                               predictors="rec_error,rec_pos,combi,kl_grad")
    r = x - jaxvae.reconstruct(model, params, x)
    assert_maps_close(maps["rec_error"], jnp.sum(r**2, -1))
    assert_maps_close(maps["rec_pos"], jnp.sum(jnp.maximum(r, 0) ** 2, -1))
    raw = jaxvae.anomaly_maps(model, params, x, smooth_sigma=0.0, predictors="kl_grad")
    kl = raw["kl_grad"]
    norm = (kl - kl.min()) / (kl.max() - kl.min())
    nll = jnp.sum(0.5 * r**2 + losses.HALF_LOG_2PI, -1)
    assert_maps_close(maps["combi"], smooth(norm, 2.0) * nll)


def test_batch_sum_gradient_is_per_image_gradient(setup):
    model, params, x = setup
    names = ["rec_error", "rec_grad", "kl_grad", "elbo_grad"]
    batched = jaxvae.anomaly_maps(model, params, x, smooth_sigma=0.0, predictors=names)
    single = jax.vmap(lambda xi: jaxvae.anomaly_maps(model, params, xi[None], smooth_sigma=0.0,
                                                     predictors=names))(x)
    for name, m in single.items():
        assert_maps_close(batched[name], m[:, 0], name)


def test_projection_maps_and_the_cpu_schedule(setup):
    model, params, x = setup
    x_t, m = jaxvae.project(model, params, x, steps=3)
    assert x_t.shape == x.shape and m.shape == x.shape[:3]
    assert_maps_close(m, jnp.sum((x - jaxvae.reconstruct(model, params, x_t)) ** 2, -1))
    diff = jaxvae.project(model, params, x, steps=3, map_kind="diff")[1]
    assert_maps_close(diff, jnp.sum(jnp.abs(x - x_t), -1))
    assert float(jnp.sum(energy(model, params, x_t, x, 1.0))) < float(
        jnp.sum(energy(model, params, x, x, 1.0)))
    # the CPU policy: per-layer conv forms chosen by channel count, chunks, unrolled steps;
    # float64, as in test_projection: Adam's first steps are ~lr * sign(g), so a float32
    # rounding difference at a pixel with g ~ 0 moves it by a whole step
    cpu = dataclasses.replace(execution.CPU, chunk_size=2)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        want = jaxvae.project(model, p64, x64, steps=3)[1]
        np.testing.assert_allclose(batching.project(model, p64, x64, steps=3, policy=cpu)[1],
                                   want, rtol=1e-9, atol=1e-12)
        want = jaxvae.anomaly_maps(model, p64, x64, beta=BETA, predictors=ALL_MAPS)
        got = batching.maps(model, p64, x64, beta=BETA, predictors=ALL_MAPS, policy=cpu)
        for name in ALL_MAPS:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-9,
                                       atol=1e-12 * float(jnp.max(want[name])), err_msg=name)


def test_augmentation_moves_the_channels_together():
    img = np.asarray(jax.random.uniform(jax.random.key(0), (2, 32, 32)))
    two = np.stack([img, 2 * img], axis=-1)  # a second sequence: the same anatomy, brighter
    aug = AugmentConfig(contrast=(0.8, 1.2), noise_std=0.0, mirror_prob=0.5)
    out = np.asarray(augment_batch(jax.random.key(3), two, aug))
    assert out.shape == two.shape and not np.allclose(out[..., 0], img)
    np.testing.assert_allclose(out[..., 1], 2 * out[..., 0], rtol=1e-5, atol=1e-6)
    # channel 0 gets the transform a one-channel image gets with the same key (two programs:
    # the sample coordinates round differently by an ulp, ~1e-5 of a pixel step at the edge)
    np.testing.assert_allclose(out[..., 0], augment_batch(jax.random.key(3), img, aug),
                               rtol=0, atol=1e-5)
    noisy = np.asarray(augment_batch(jax.random.key(3), two, AugmentConfig()))
    assert not np.allclose(noisy[..., 1], 2 * noisy[..., 0], atol=1e-3)  # noise per channel


def test_config_and_model_sizes_are_checked():
    cfg = TrainConfig(image_size=128, in_channels=2)
    model = model_from_config(cfg)
    assert (model.image_size, model.in_channels) == (128, 2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in TrainConfig().to_dict().items()
           if k not in ("image_size", "in_channels")}  # a config.json from before #15
    assert (TrainConfig.from_dict(old).image_size, TrainConfig.from_dict(old).in_channels) == (
        64, 1)
    for bad in (dict(image_size=96), dict(image_size="64"), dict(in_channels=0),
                dict(in_channels=True)):
        with pytest.raises(ConfigError, match="image_size|in_channels"):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="64, 128"):
        jaxvae.ConvVAE(image_size=256)
    small = jaxvae.ConvVAE(latent_dim=8, channels=CH, in_channels=2)
    params = jaxvae.init_params(small, jax.random.key(0))
    with pytest.raises(ConfigError, match=r"2 channel\(s\)"):
        jaxvae.anomaly_maps(small, params, jnp.zeros((1, 64, 64, 1)))
    with pytest.raises(ConfigError, match="64x64"):
        jaxvae.project(small, params, jnp.zeros((1, 128, 128, 2)))


def test_training_images_must_fit_the_config():
    one, two = TrainConfig(batch_size=2), TrainConfig(batch_size=2, in_channels=2)
    assert check_images(np.zeros((2, 64, 64, 1)), one, 1).shape == (2, 64, 64)
    assert check_images(np.zeros((2, 64, 64, 2)), two, 1).shape == (2, 64, 64, 2)
    with pytest.raises(ConfigError, match="in_channels=2"):
        check_images(np.zeros((2, 64, 64)), two, 1)
    with pytest.raises(ConfigError, match="128x128 with 1 channel.*image_size=64"):
        check_images(np.zeros((2, 128, 128), np.float32), one, 1)
    with pytest.raises(DataError, match=r"\(N, 64, 64, 2\)"):
        check_images(np.zeros((2, 64, 32, 2)), two, 1)
    with pytest.raises(ConfigError, match="validation images"):
        check_val_images(np.zeros((2, 64, 64, 2)), one)


def test_a_128_two_channel_run_trains():
    cfg = TrainConfig(latent_dim=8, channels=CH, image_size=128, in_channels=2, batch_size=4,
                      lr=1e-3, epochs=1)
    x = np.random.default_rng(0).normal(size=(8, 128, 128, 2)).astype(np.float32) * 0.5
    params, history = train(cfg, x, None, progress=False, val_images=x[:4])
    assert params["dec_convs_4"]["kernel"].shape == (4, 4, 4, 2)
    assert history[-1]["step"] == 2 and np.isfinite(history[-1]["loss"])
    assert np.isfinite(history[-1]["val_loss"])  # the validation loss reads C channels too


def test_cpu_chunks_and_pieces_hold_the_pixels_of_64x64_ones():
    big = jaxvae.ConvVAE(image_size=128)
    cpu = execution.CPU.for_model(big)
    assert (cpu.chunk_size, cpu.micro_batch) == (16, 8)
    assert execution.CPU.for_model(jaxvae.ConvVAE()) == execution.CPU
    assert execution.ACCELERATOR.for_model(big) == execution.ACCELERATOR  # 0: the batch
    assert dataclasses.replace(execution.CPU, micro_batch=2).for_model(big).micro_batch == 1
