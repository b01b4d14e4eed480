"""Tests of jaxvae.runtime.batching and the execution policy: jit / vmap of the maps and the
projection equal the eager calls, and the policy's chunks, forms and schedules give the plain
results; the batches and their padding."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvae
from jaxvae.core.predictors import PREDICTORS
from jaxvae.runtime import batching, execution


@pytest.fixture(scope="module")
def setup():
    model = jaxvae.ConvVAE(latent_dim=16)  # conv_impl "lax": the plain form
    params = jaxvae.init_params(model, jax.random.key(0))
    x = jnp.clip(jax.random.normal(jax.random.key(1), (6, 64, 64, 1)) * 0.7, -1.5, 1.5)
    return model, params, x.at[:, :12].set(0.0)  # an exact-zero band, as a background


def _close(got, want, what, rel=1e-5):
    """Equal up to float32 rounding of a different summation order (scaled to the map)."""
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=rel,
                               atol=rel * float(np.abs(want).max()), err_msg=what)


def test_jit_and_vmap_of_anomaly_maps_equal_the_eager_call(setup):
    model, params, x = setup
    kw = dict(beta=0.5, predictors=PREDICTORS, combi_group=3)
    eager = jaxvae.anomaly_maps(model, params, x, **kw)
    jitted = jax.jit(functools.partial(jaxvae.anomaly_maps, model, **kw))(params, x)
    # vmap over two groups of 3 images: combi's groups of 3 are the vmapped batches
    vmapped = jax.vmap(lambda xg: jaxvae.anomaly_maps(model, params, xg, **kw))(
        x.reshape(2, 3, 64, 64, 1))
    for name in PREDICTORS:
        _close(jitted[name], eager[name], f"jit {name}")
        _close(vmapped[name].reshape(6, 64, 64), eager[name], f"vmap {name}")


def test_jit_and_vmap_of_project_equal_the_eager_call(setup):
    model, params, x = setup
    kw = dict(lam=0.2, steps=5, lr=0.03)
    eager = jaxvae.project(model, params, x, **kw)
    jitted = jax.jit(functools.partial(jaxvae.project, model, **kw))(params, x)
    vmapped = jax.vmap(lambda xg: jaxvae.project(model, params, xg, **kw))(
        x.reshape(2, 3, 64, 64, 1))
    for i in (0, 1):
        _close(jitted[i], eager[i], f"jit output {i}")
        _close(vmapped[i].reshape(eager[i].shape), eager[i], f"vmap output {i}")


def test_jitted_projection_is_one_loop_not_a_copy_per_step(setup):
    model, params, x = setup

    def hlo(steps):
        f = jax.jit(functools.partial(jaxvae.project, model, steps=steps))
        return f.lower(params, x).as_text()

    h100, h1 = hlo(100), hlo(1)
    assert "while" in h100
    # one copy of the step's convolutions, however many steps
    assert h100.count("convolution") == h1.count("convolution")


def test_cpu_policy_reproduces_the_plain_maps(setup):
    """Chunks of 4 (combi groups of 2 never split), CPU convolution forms, MC draws per chunk."""
    model, params, x = setup
    policy = dataclasses.replace(execution.CPU, chunk_size=4)
    got = batching.maps(model, params, x, policy=policy, beta=0.5, combi_group=2)
    want = jaxvae.anomaly_maps(model, params, x, beta=0.5, combi_group=2)
    for name in PREDICTORS:
        _close(got[name], want[name], name)
    # combi over the whole batch: one call, not chunks
    got = batching.maps(model, params, x, policy=policy, predictors=["combi"], combi_group=0)
    _close(got["combi"], jaxvae.anomaly_maps(model, params, x, predictors=["combi"],
                                              combi_group=0)["combi"], "combi whole batch")
    # Monte-Carlo z: chunk i draws with fold_in(key, i)
    key = jax.random.key(7)
    got = batching.maps(model, params, x, policy=policy, predictors=["rec_grad"], n_samples=2,
                     key=key)["rec_grad"]
    want = jnp.concatenate([jaxvae.anomaly_maps(model, params, x[s], predictors=["rec_grad"],
                                                n_samples=2, key=jax.random.fold_in(key, i))
                            ["rec_grad"] for i, s in enumerate([slice(0, 4), slice(4, 6)])])
    _close(got, want, "rec_grad with samples")


def test_cpu_policy_reproduces_the_plain_projection(setup):
    """Chunks of 4 images, 3-step unrolled programs in a Python loop (7 = 3 + 3 + 1)."""
    model, params, x = setup
    policy = dataclasses.replace(execution.CPU, chunk_size=4, projection_unroll=3)
    got = batching.project(model, params, x, policy=policy, lam=0.2, steps=7)
    want = jaxvae.project(model, params, x, lam=0.2, steps=7)
    _close(got[0], want[0], "projected images")
    _close(got[1], want[1], "projection map", rel=1e-4)  # 7 Adam steps amplify rounding


def test_no_chunks_policy_runs_one_call_whatever_the_combi_group(setup, monkeypatch):
    model, params, x = setup
    calls = []
    real = batching.anomaly_maps
    monkeypatch.setattr(batching, "anomaly_maps", lambda m, p, xs, **kw: calls.append(
        xs.shape[0]) or real(m, p, xs, **kw))
    batching.maps(model, params, x, policy=execution.ACCELERATOR, combi_group=2)
    assert calls == [6]


def test_batches_pad_by_repeating_the_last_index():
    got = [(idx.tolist(), n) for idx, n in batching.batches(5, 2)]
    assert got == [([0, 1], 2), ([2, 3], 2), ([4, 4], 1)]
    assert batching.pad_to_multiple(np.arange(5), 4).tolist() == [0, 1, 2, 3, 4, 4, 4, 4]


def test_policy_per_backend():
    assert execution.policy_for("cpu") == execution.CPU
    assert execution.policy_for("gpu") == execution.policy_for("tpu") == execution.ACCELERATOR
    assert execution.ACCELERATOR.chunk_size == execution.ACCELERATOR.micro_batch == 0
    assert execution.CPU.sharded().chunk_size == 0 and execution.CPU.sharded().micro_batch == 0
    model = jaxvae.ConvVAE()
    assert execution.CPU.training_model(model).conv_impl == "s2d"
    assert execution.CPU.inference_model(model).conv_impl == "cpu_inference"


def test_spans_and_batches_cover_every_index_once():
    assert batching.spans(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert batching.spans(5, 0) == batching.spans(5, 8) == [slice(0, 5)]
    assert list(batching.batches(0, 4)) == []  # nothing to score: no batch
    real = [i for idx, n in batching.batches(7, 3) for i in idx[:n].tolist()]
    assert real == list(range(7))
