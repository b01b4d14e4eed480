"""Benchmark harness and PyTorch reference: structure and agreement, never timings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvae
import jaxvae.core.model
from jaxvae.base.errors import ConfigError
from jaxvae.bench import agreement, harness, timing
from jaxvae.core.predictors import GRADIENT_MAPS


@pytest.fixture(scope="module")
def setup():
    model = jaxvae.ConvVAE(latent_dim=16)
    params = jaxvae.init_params(model, jax.random.key(0))
    x = jnp.clip(jax.random.normal(jax.random.key(1), (3, 64, 64, 1)) * 0.7, -1.5, 1.5)
    return model, params, x


def test_flop_count_matches_the_architecture():
    macs = timing.model_macs(jaxvae.ConvVAE())
    assert 2 * (macs["E"] + macs["D"]) == pytest.approx(40.9e6, rel=1e-3)
    # the fused maps do half the useful work of three separate grads... plus the shared parts
    assert timing.op_flops("grad_maps_naive", macs) > 1.9 * timing.op_flops(
        "grad_maps_fused", macs)


def test_jax_run_rows_have_the_required_keys(tmp_path):
    out = tmp_path / "bench.json"
    report = harness.run(batch_sizes=(2,), ops=("grad_maps_fused", "grad_maps_naive",
                                                "projection", "train_step"),
                         frameworks=("jax",), repeats=1, out=out, latent_dim=16,
                         conv_impl="lax",  # a model no other test compiled: compile_s > 0
                         projection_steps=2, min_sample_s=0.0, peak_n=256, log=lambda *_: None)
    assert {"machine", "peak_gflops", "rows", "ratios", "markdown"} <= set(report)
    assert report["settings"]["conv_impl"] == "lax"
    assert report["peak_gflops"] > 0 and len(report["rows"]) == 4
    for row in report["rows"]:
        assert set(harness.ROW_KEYS) <= set(row)
        assert row["framework"] == "jax" and row["batch_size"] == 2
        assert row["images_per_s"] > 0 and row["compile_s"] > 0 and row["gflops"] > 0
    assert [r["kind"] for r in report["ratios"]] == ["fused/naive"]
    on_disk = json.loads(out.read_text())
    assert on_disk["rows"] == json.loads(json.dumps(report["rows"]))
    assert "| grad_maps_fused | 2 |" in out.with_suffix(".md").read_text()


def test_runs_jax_only_with_a_note_when_torch_is_absent(monkeypatch):
    monkeypatch.setattr(harness, "_torch", lambda: (None, None, "No module named 'torch'"))
    report = harness.run(batch_sizes=(2,), ops=("kl_grad",), repeats=1, latent_dim=16,
                         min_sample_s=0.0, peak_n=256,
                         log=lambda *_: None)
    assert {r["framework"] for r in report["rows"]} == {"jax"}
    assert "PyTorch not installed" in report["notes"][0] and "Note:" in report["markdown"]


def test_unknown_op_is_refused():
    with pytest.raises(ConfigError, match="unknown op"):
        harness.run(ops=("nope",), frameworks=("jax",))


# ---- the PyTorch reference (optional dependency) --------------------------------------------

@pytest.fixture(scope="module")
def torch_ref(setup):
    torch = pytest.importorskip("torch", reason="torch is not installed (the `bench` extra)")
    from jaxvae.bench import torch_reference as tr
    model, params, _ = setup
    return torch, tr, tr.from_flax(model, params).eval().requires_grad_(False)


def _scale_close(got, ref, tol=1e-4, msg=""):
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=tol * np.abs(ref).max(),
                               err_msg=msg)


def test_weight_conversion_reproduces_encoder_and_decoder(setup, torch_ref):
    _, tr, tmodel = torch_ref
    model, params, x = setup
    mu, ls = jaxvae.encode(model, params, x)
    tmu, tls = tmodel.encode(tr.to_torch(x))
    _scale_close(tmu, mu, msg="mu")
    _scale_close(tls, ls, msg="log_sigma")
    # a code far from the tiny untrained mu, so every decoder weight matters
    z = jax.random.normal(jax.random.key(2), mu.shape)
    torch = torch_ref[0]
    _scale_close(tmodel.decode(torch.from_numpy(np.array(z)))[:, 0],
                 jaxvae.decode(model, params, z)[..., 0], msg="reconstruction")


def test_conversion_catches_a_wrong_flatten_order(setup, torch_ref):
    torch, tr, _ = torch_ref
    model, params, x = setup
    sd = tr.convert_params(params, tuple(model.channels))
    wrong = tr.TorchConvVAE(model.latent_dim)
    sd["enc_head.weight"] = torch.from_numpy(np.asarray(params["enc_head"]["kernel"]).T.copy())
    wrong.load_state_dict(sd)
    mu = jaxvae.encode(model, params, x)[0]
    assert not np.allclose(wrong.encode(tr.to_torch(x))[0].detach().numpy(), mu, atol=1e-4)


@pytest.mark.parametrize("variant", ["naive", "retain_graph", "fwd1_bwd2", "batched_vjp"])
def test_torch_gradient_maps_agree_with_jax(setup, torch_ref, variant):
    _, tr, tmodel = torch_ref
    model, params, x = setup
    ref = jaxvae.anomaly_maps(model, params, x, beta=0.5, predictors=GRADIENT_MAPS)
    got = tr.grad_maps(tmodel, tr.to_torch(x), beta=0.5, variant=variant)
    for k in GRADIENT_MAPS:
        _scale_close(got[k], ref[k], msg=f"{variant} {k}")


@pytest.mark.parametrize("name", jaxvae.PREDICTORS)
def test_torch_predictors_agree_with_jax(setup, torch_ref, name):
    _, tr, tmodel = torch_ref
    model, params, x = setup
    ref = jaxvae.anomaly_maps(model, params, x, beta=0.5, predictors=[name])[name]
    _scale_close(tr.predictor(tmodel, tr.to_torch(x), name, beta=0.5), ref, msg=name)


def test_torch_projection_agrees_with_jax(setup, torch_ref):
    _, tr, tmodel = torch_ref
    model, params, x = setup
    ref = jaxvae.project(model, params, x, steps=5)[1]
    _scale_close(tr.project(tmodel, tr.to_torch(x), steps=5)[1], ref)


def test_agreement_check_passes_and_fails_loudly(setup, torch_ref):
    _, tr, tmodel = torch_ref
    model, params, x = setup
    kw = dict(beta=1.0, sigma=3.0, steps=2, lam=1.0, lr=0.03)
    errs = agreement.check_agreement(model, params, tr, tmodel, x,
                                   ops=("grad_maps_fused", "rec_error", "train_step"), **kw)
    assert "train_step.loss" in errs and max(errs.values()) < 1e-4
    other = jaxvae.init_params(model, jax.random.key(7))
    with pytest.raises(agreement.AgreementError, match="disagrees"):
        agreement.check_agreement(model, other, tr, tmodel, x, ops=("kl_grad",), **kw)


def test_torch_rows_and_ratios(torch_ref):
    report = harness.run(batch_sizes=(2,), ops=("grad_maps_fused", "grad_maps_naive"),
                         repeats=1, latent_dim=16, min_sample_s=0.0, peak_n=256,
                         log=lambda *_: None)
    fws = {(r["framework"], r["op"]) for r in report["rows"]}
    assert ("torch", "grad_maps_fused") in fws and ("jax", "grad_maps_naive") in fws
    kinds = sorted(r["kind"] for r in report["ratios"])
    assert kinds == ["fused/naive", "fused/naive", "jax/torch", "jax/torch"]
    fused = next(r for r in report["rows"] if r["framework"] == "torch"
                 and r["op"] == "grad_maps_fused")
    assert fused["variant"] in harness.FUSED_TORCH_VARIANTS
    # the check before timing ran on pre-processed slices (and says which), not random images
    assert "phantom" in report["agreement_inputs"]
    assert any(k.startswith("phantom/grad_maps[") for k in report["agreement"])


# ---- agreement on realistic slices: exact-zero background (issue #16) ------------------------

CHECKED = (*jaxvae.PREDICTORS, "projection")
AGREE_KW = dict(beta=1.0, sigma=3.0, steps=20, lam=1.0, lr=0.03)


@pytest.fixture(scope="module")
def slice_model():
    """A latent-16 ConvVAE after 10 Adam steps on phantom slices (maps not degenerate)."""
    model = jaxvae.ConvVAE(latent_dim=16)
    params = jaxvae.init_params(model, jax.random.key(0))
    init, step = harness.make_jax_train_step(model, lr=1e-3)
    step, state = jax.jit(step), init(params)
    x = jnp.asarray(agreement.phantom_slices(0)[..., None])
    for i in range(10):
        params, state, _ = step(params, state, x, jax.random.key(1), i)
    return model, params


@pytest.fixture(scope="module")
def phantom_x():
    x = agreement.agreement_inputs(8, shared_data=None, log=lambda *_: None)["phantom"][0]
    return np.asarray(x)


def _torch_model(model, params):
    pytest.importorskip("torch", reason="torch is not installed (the `bench` extra)")
    from jaxvae.bench import torch_reference as tr
    return tr, tr.from_flax(model, params).eval().requires_grad_(False)


def test_agreement_inputs_are_preprocessed_brain_slices(phantom_x, tmp_path):
    logged = []
    inputs = agreement.agreement_inputs(8, shared_data=tmp_path, log=logged.append)
    assert set(inputs) == {"phantom"} and "no real slices" in logged[0]
    assert phantom_x.shape == (8, 64, 64, 1) and phantom_x.dtype == np.float32
    background = (phantom_x == 0).mean(axis=(1, 2, 3))
    assert np.all(background > 0.3) and np.all(background < 0.8)  # background and brain
    assert np.abs(phantom_x).max() == pytest.approx(1.5)  # z-scored, clipped


def test_jax_maps_equal_torch_reference_on_phantom_slices(slice_model, phantom_x):
    model, params = slice_model
    tr, tmodel = _torch_model(model, params)
    maps = jaxvae.anomaly_maps(model, params, phantom_x)
    bg = phantom_x[..., 0] == 0
    for k in jaxvae.PREDICTORS:  # non-degenerate: signal on brain and background alike
        assert float(maps[k][~bg].max()) > 0, k
    assert float(maps["kl_grad"][bg].max()) > 0.1 * float(maps["kl_grad"].max())
    errs = agreement.check_agreement(model, params, tr, tmodel, phantom_x, ops=CHECKED,
                                   **AGREE_KW)
    assert set(CHECKED) <= set(errs) and max(errs.values()) <= 1e-4, errs


def test_phantom_agreement_catches_the_old_activation(slice_model, phantom_x, monkeypatch):
    """flax's leaky_relu (derivative 1 at 0) passed on random images; it must fail here."""
    import flax.linen
    model, params = slice_model
    tr, tmodel = _torch_model(model, params)
    kw = dict(AGREE_KW, steps=2)
    try:
        with monkeypatch.context() as m:
            m.setattr(jaxvae.core.model, "leaky", lambda h: flax.linen.leaky_relu(h, 0.01))
            jax.clear_caches()  # the compiled maps hold the activation they were traced with
            errs = agreement.check_agreement(model, params, tr, tmodel, phantom_x,
                                           ops=jaxvae.PREDICTORS, tol=np.inf, **kw)
            with pytest.raises(agreement.AgreementError, match="kl_grad"):
                agreement.check_agreement(model, params, tr, tmodel, phantom_x,
                                        ops=("kl_grad",), **kw)
    finally:
        jax.clear_caches()
    assert errs["kl_grad"] > 1e-2, errs
    assert errs["rec_error"] <= 1e-4  # forward pass alike: only derivatives at 0 differ


def test_jax_maps_equal_torch_reference_on_real_slices(slice_model, shared_data):
    model, params = slice_model
    tr, tmodel = _torch_model(model, params)
    inputs = agreement.agreement_inputs(4, shared_data=shared_data, log=lambda *_: None)
    assert "real" in inputs and "brats2018_flair/" in inputs["real"][1]
    x = np.asarray(inputs["real"][0])
    assert np.all((x == 0).mean(axis=(1, 2, 3)) > 0.3)
    errs = agreement.check_agreement(model, params, tr, tmodel, {"real": x}, ops=CHECKED,
                                   **AGREE_KW)
    assert {f"real/{k}" for k in CHECKED} <= set(errs) and max(errs.values()) <= 1e-4, errs


@pytest.mark.parametrize(("n", "group"), [(5, 2), (5, 0), (70, 64)])
def test_torch_combi_normalises_per_group_as_jax(slice_model, phantom_x, n, group):
    model, params = slice_model
    tr, tmodel = _torch_model(model, params)
    x = np.concatenate([phantom_x] * -(-n // len(phantom_x)))[:n]
    x = x * np.linspace(0.2, 1.0, n, dtype=np.float32)[:, None, None, None]  # unequal groups
    ref = jaxvae.anomaly_maps(model, params, x, predictors=["combi"], combi_group=group)
    kw = {} if group == tr.COMBI_GROUP else {"combi_group": group}
    _scale_close(tr.predictor(tmodel, tr.to_torch(x), "combi", **kw), ref["combi"])


# ---- 128x128 and several channels (issue #15) -------------------------------------------------

@pytest.fixture(scope="module")
def wide_slices():
    """8 phantom slices at 128x128 with 2 channels (T2, FLAIR) and a model trained on them."""
    inputs = agreement.agreement_inputs(8, shared_data=None, log=lambda *_: None,
                                        image_size=128, in_channels=2)
    x = np.asarray(inputs["phantom"][0])
    model = jaxvae.ConvVAE(latent_dim=16, image_size=128, in_channels=2)
    params = jaxvae.init_params(model, jax.random.key(0))
    init, step = harness.make_jax_train_step(model, lr=1e-3)
    step, state = jax.jit(step), init(params)
    for i in range(5):
        params, state, _ = step(params, state, jnp.asarray(x), jax.random.key(1), i)
    return model, params, x


def test_agreement_inputs_at_128_with_two_channels(wide_slices):
    x = wide_slices[2]
    assert x.shape == (8, 128, 128, 2) and x.dtype == np.float32
    assert not np.allclose(x[..., 0], x[..., 1])  # two sequences, not one copied
    # one brain mask for both channels: the same background, exactly 0 in each
    np.testing.assert_array_equal(x[..., 0] == 0, x[..., 1] == 0)
    assert np.all((x == 0).mean(axis=(1, 2, 3)) > 0.3)


def test_jax_equals_torch_reference_at_128_with_two_channels(wide_slices):
    model, params, x = wide_slices
    tr, tmodel = _torch_model(model, params)
    assert tr.convert_params(params, tuple(model.channels), 128)["dec_convs.4.weight"].shape == (
        16, 2, 4, 4)
    ops = (*CHECKED, "grad_maps_fused", "train_step")
    errs = agreement.check_agreement(model, params, tr, tmodel, {"phantom": x}, ops=ops,
                                     **AGREE_KW)
    assert {f"phantom/{k}" for k in CHECKED} <= set(errs) and max(errs.values()) <= 1e-4, errs
    other = jaxvae.init_params(model, jax.random.key(7))
    with pytest.raises(agreement.AgreementError, match="disagrees"):
        agreement.check_agreement(model, other, tr, tmodel, x, ops=("rec_grad",), **AGREE_KW)


def test_jax_equals_torch_reference_on_real_two_sequence_slices(wide_slices, shared_data):
    model, params, _ = wide_slices
    tr, tmodel = _torch_model(model, params)
    inputs = agreement.agreement_inputs(4, shared_data=shared_data, log=lambda *_: None,
                                        image_size=128, in_channels=2)
    assert "(flair, t1)" in inputs["real"][1]
    x = np.asarray(inputs["real"][0])
    assert x.shape == (4, 128, 128, 2)
    errs = agreement.check_agreement(model, params, tr, tmodel, {"real": x}, ops=CHECKED,
                                     **AGREE_KW)
    assert max(errs.values()) <= 1e-4, errs


def test_flop_count_at_128_and_with_channels():
    base = timing.model_macs(jaxvae.ConvVAE())
    big = timing.model_macs(jaxvae.ConvVAE(image_size=128, in_channels=2))
    # the extra 128->64 stage (16 -> 16 channels, 16 taps down / 4 up per output pixel) and
    # 2 input / output channels on the outer stages
    assert big["E"] == base["E"] - 32**2 * 16 * 16 + 64**2 * 16 * 16 * 2 + 32**2 * 16 * 16 * 16
    assert big["D"] == base["D"] - 64**2 * 1 * 4 * 16 + 64**2 * 16 * 4 * 16 + 128**2 * 2 * 4 * 16
    assert big["E1"] == 64**2 * 16 * 16 * 2
