"""Tests of jaxvae.training.validation: the validation loss at fixed eps, the best checkpoint,
the plateau rule and the step budget (stop_reason, convergence)."""

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import (
    ckpt_steps,
    images,
    leaves_equal,
    metric_lines,
    tiny,
    without_timing,
)

from jaxvae.base.errors import ConfigError, RunError
from jaxvae.core import losses
from jaxvae.training import trainer as TRAIN_MODULE
from jaxvae.training.checkpoint import best_step, load_run
from jaxvae.training.config import model_from_config
from jaxvae.training.trainer import train
from jaxvae.training.validation import (
    convergence,
    stop_reason,
    summarize,
    val_step_for,
    validation_eps,
    validation_loss,
)

# --------------------------------------------------------------------------- validation


def test_validation_loss_is_the_beta_elbo_at_fixed_eps():
    # 21 val images: two batches of 16, the second padded; augmentation on for training only
    cfg, val = tiny(epochs=2, beta=0.5), images(21, seed=5)
    params, hist = train(cfg, images(32), None, progress=False, val_images=val)
    for h in hist:
        assert np.isclose(h["val_loss"], h["val_rec"] + 0.5 * h["val_kl"], rtol=1e-6)
    assert hist[0]["val_loss"] != hist[1]["val_loss"]
    # by hand, with the textbook model: z = mu + sigma * eps, eps from fold_in(key(seed), 2)
    eps = jax.random.normal(jax.random.fold_in(jax.random.key(cfg.seed), 2), (21, 8))
    np.testing.assert_array_equal(validation_eps(cfg.seed, 21, 8), eps)
    x = jnp.asarray(val)[..., None]
    x_hat, aux = model_from_config(cfg).apply({"params": params}, x, eps=eps)
    loss, rec, kl = losses.beta_elbo(x, x_hat, aux["mu"], aux["log_sigma"], 0.5)
    # means of per-image sums of 4096 float32 terms, another conv form: ~1e-6 relative
    np.testing.assert_allclose([hist[-1]["val_loss"], hist[-1]["val_rec"], hist[-1]["val_kl"]],
                               [loss.mean(), rec.mean(), kl.mean()], rtol=1e-5)
    # deterministic, and the padding is ignored whatever the batch size
    fn = val_step_for(cfg)
    first = validation_loss(fn, params, val, np.asarray(eps), None, 16)
    assert first == validation_loss(fn, params, val, np.asarray(eps), None, 16)
    assert first == {k: hist[-1][k] for k in ("val_loss", "val_rec", "val_kl")}
    for bsz in (4, 64):
        other = validation_loss(val_step_for(cfg), params, val, np.asarray(eps), None, bsz)
        np.testing.assert_allclose(list(other.values()), list(first.values()), rtol=1e-5)
    # no validation: no val keys; an empty array is no validation too
    _, plain = train(cfg, images(32), None, progress=False,
                     val_images=np.zeros((0, 64, 64), np.float32))
    assert "val_loss" not in plain[-1] and plain[-1]["loss"] == hist[-1]["loss"]


def params_hash(params) -> str:
    h = hashlib.blake2b(digest_size=16)
    for leaf in jax.tree.leaves(jax.device_get(params)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


class ScriptedVal:
    """A stand-in for train.validation_loss that returns scripted values, yet is a pure
    function of the params (as the real one is): the i-th distinct params seen get
    values[i], and the same params later (a resumed run) get the same value again."""

    def __init__(self, values):
        self.values, self.seen = list(values), {}

    def __call__(self, val_step, params, images, eps, mesh, batch_size):
        key = params_hash(params)
        if key not in self.seen:
            self.seen[key] = self.values[len(self.seen)]
        v = float(self.seen[key])
        return {"val_loss": v, "val_rec": v, "val_kl": 0.0}


VAL = images(5, seed=7)  # fewer than a batch


def test_best_checkpoint_is_kept_and_loaded_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(TRAIN_MODULE, "validation_loss", ScriptedVal([5, 3, 4, 3, 6, 7]))
    run = tmp_path / "run"
    cfg = tiny(epochs=6, checkpoint_every=10, keep_checkpoints=1)  # 32 images: 2 steps/epoch
    params, hist = train(cfg, images(32), run, progress=False, val_images=VAL)
    assert [h["val_loss"] for h in metric_lines(run)] == [5, 3, 4, 3, 6, 7]
    # new bests at epochs 1, 2 (epoch 4 only equals the best); keep 1 latest + the best
    assert ckpt_steps(run) == [4, 12]
    assert best_step(run) == (4, 3.0) and best_step(run, "latest") == (12, 7.0)
    assert summarize(hist) == {"steps": 12, "epoch": 6, "stop": "epochs",
                               "best_val_loss": 3.0, "best_step": 4}
    _, best, _, info = load_run(run, with_info=True)
    assert info == {"step": 4, "val_loss": 3.0, "which": "best"}
    at_step_4, _ = train(tiny(epochs=2), images(32), None, progress=False)
    assert leaves_equal(best, at_step_4) and not leaves_equal(best, params)
    assert leaves_equal(load_run(run, "latest")[1], params)
    with pytest.raises(ConfigError, match="which"):
        load_run(run, "newest")
    with pytest.raises(RunError, match="no checkpoint of step 6"):
        load_run(run, 6)
    # strictly lower: a tie does not count; with more kept, each new best was saved
    monkeypatch.setattr(TRAIN_MODULE, "validation_loss", ScriptedVal([5, 3, 4, 3, 6, 7]))
    train(dataclasses.replace(cfg, keep_checkpoints=3), images(32), tmp_path / "run3",
          progress=False, val_images=VAL)
    assert ckpt_steps(tmp_path / "run3") == [2, 4, 12]
    # without validation "best" is the latest checkpoint
    plain = tmp_path / "plain"
    params, _ = train(tiny(epochs=2, checkpoint_every=1, keep_checkpoints=2), images(32), plain,
                      progress=False)
    assert ckpt_steps(plain) == [2, 4] and best_step(plain) == (4, None)
    assert leaves_equal(load_run(plain)[1], params)


def test_patience_stops_and_a_resumed_run_stops_at_the_same_epoch(tmp_path, monkeypatch):
    # best 3.0 at epoch 4 (step 8), then 3 epochs (6 steps) without a lower one: patience 6
    # (steps) stops after epoch 7
    scripted = ScriptedVal([5, 4, 4.5, 3, 3.5, 3.2, 3.0, 2.0, 2.5, 2.6, 2.7, 2.0, 1.0])
    monkeypatch.setattr(TRAIN_MODULE, "validation_loss", scripted)
    data, cfg = images(32), tiny(epochs=20, patience=6, checkpoint_every=2)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    params, hist = train(cfg, data, whole, progress=False, val_images=VAL)
    assert [h["epoch"] for h in hist] == list(range(1, 8))
    assert hist[-1]["stop"] == "patience" and all("stop" not in h for h in hist[:-1])
    assert max(ckpt_steps(whole)) == 14  # saved where it stopped
    assert best_step(whole) == (8, 3.0)
    assert (whole / "loss.png").is_file()
    # the same run cut after epoch 5 (by epochs), then resumed with the full schedule
    train(dataclasses.replace(cfg, epochs=5), data, cut, progress=False, val_images=VAL)
    assert metric_lines(cut)[-1]["stop"] == "epochs"
    params2, hist2 = train(cfg, data, cut, resume=True, progress=False, val_images=VAL)
    assert leaves_equal(params2, params)
    assert [without_timing(h) for h in metric_lines(cut)] == [without_timing(h) for h in hist]
    assert [without_timing(h) for h in hist2] == [without_timing(h) for h in hist]
    # a finished run resumed as it is: nothing trained, same answer
    params3, hist3 = train(None, data, whole, resume=True, progress=False, val_images=VAL)
    assert leaves_equal(params3, params) and hist3[-1]["stop"] == "patience"
    assert len(metric_lines(whole)) == 7
    # more patience (a schedule field) continues: 2.0 at epoch 8 is a new best, then 4
    # epochs (8 steps) without a lower one (epoch 12 only equals it)
    _, hist4 = train(dataclasses.replace(cfg, patience=8), data, whole, resume=True,
                     progress=False, val_images=VAL)
    assert [h.get("stop") for h in hist4][6:] == [None] * 5 + ["patience"]
    assert metric_lines(whole) == hist4 and best_step(whole) == (16, 2.0)
    # the validation images are part of the run: others are refused
    with pytest.raises(RunError, match="validation images"):
        train(cfg, data, cut, resume=True, progress=False, val_images=images(5, seed=8))


def test_stop_reason_is_a_function_of_the_history():
    cfg = tiny(epochs=10, patience=4)  # steps: two epochs of 2 steps

    def lines(*vals):
        return [{"epoch": i + 1, "val_loss": v} for i, v in enumerate(vals)]

    assert stop_reason(lines(3, 2), cfg, 4, 2) is None
    assert stop_reason(lines(3, 2, 2.5), cfg, 6, 2) is None
    assert stop_reason(lines(3, 2, 2.5, 2.0), cfg, 8, 2) == "patience"  # a tie is no better
    assert stop_reason(lines(3, 2, 2.5, 1.9), cfg, 8, 2) is None
    # a partial line (epoch cut by max_steps) does not count
    assert stop_reason(lines(3, 2, 2.5) + [{"epoch": 4, "val_loss": 9, "partial": True}],
                       cfg, 7, 2) is None
    assert stop_reason(lines(3, 2), dataclasses.replace(cfg, patience=100), 20, 2) == "epochs"
    assert stop_reason([], dataclasses.replace(cfg, max_steps=5), 5, 2) == "max_steps"
    assert stop_reason([], dataclasses.replace(cfg, max_steps=5), 4, 2) is None
    assert stop_reason(lines(1, 2, 3), dataclasses.replace(cfg, patience=0), 6, 2) is None


def test_patience_counts_optimiser_steps_whatever_the_epoch_length():
    # one rule for a 400-slice and a 9,000-slice dataset: 1000 steps since the best
    cfg = tiny(epochs=0, max_steps=20000, patience=1000)
    small = [{"epoch": e, "step": 6 * e, "val_loss": 10.0 - (e == 50)} for e in range(1, 218)]
    large = [{"epoch": e, "step": 136 * e, "val_loss": 10.0 - (e == 3)} for e in range(1, 11)]
    assert stop_reason(small[:216], cfg, 6 * 216, 6) is None  # 996 steps since step 300
    assert stop_reason(small, cfg, 6 * 217, 6) == "patience"  # 1002
    assert stop_reason(large[:9], cfg, 136 * 9, 136) is None  # 816 steps since step 408
    assert stop_reason(large, cfg, 1360, 136) is None  # 952
    assert stop_reason(large + [{"epoch": 11, "step": 1496, "val_loss": 10.0}], cfg, 1496,
                       136) == "patience"  # 1088 >= 1000
    # no epoch cap: only the budget or the plateau ends the run
    falling = [{"epoch": e, "step": 136 * e, "val_loss": 1e4 - e} for e in range(1, 147)]
    assert stop_reason(falling, cfg, 19856, 136) is None
    assert stop_reason(falling, cfg, 20000, 136) == "max_steps"
    with pytest.raises(ConfigError, match="epochs=0 .*needs max_steps"):
        tiny(epochs=0, max_steps=0)


def test_convergence_says_whether_the_plateau_rule_ended_the_run():
    cfg = tiny(epochs=0, max_steps=3000, patience=1000)
    hist = [{"epoch": 1, "step": 1000, "val_loss": 3.0}, {"epoch": 2, "step": 2000,
                                                           "val_loss": 2.0, "stop": "patience"}]
    assert convergence(hist, cfg).startswith("converged: no lower validation loss in the "
                                             "last 1000 steps")
    hist[-1]["stop"] = "max_steps"
    assert convergence(hist, cfg).startswith("NOT converged: stopped by max_steps with the "
                                             "validation loss still falling")
    assert "convergence unknown" in convergence([{"epoch": 1, "step": 5, "stop": "epochs"}],
                                                 cfg)


def test_max_steps_stops_exactly_and_resume_continues_bit_identically(tmp_path):
    data, val = images(48), images(6, seed=4)  # 48 images, batch 16: 3 steps per epoch
    cfg = tiny(epochs=4, checkpoint_every=10, max_steps=5)
    ref_params, ref_hist = train(dataclasses.replace(cfg, max_steps=0), data, None,
                                 progress=False, val_images=val)
    run = tmp_path / "run"
    params5, hist = train(cfg, data, run, progress=False, val_images=val)
    # epoch 2 cut after its 2nd step: checkpointed there, its line marked, val of step 5
    assert [(h["epoch"], h["step"], h.get("partial"), h.get("stop")) for h in hist] == [
        (1, 3, None, None), (2, 5, True, "max_steps")]
    assert metric_lines(run) == hist and max(ckpt_steps(run)) == 5
    assert hist[0] == {**ref_hist[0], "seconds": hist[0]["seconds"],
                       "images_per_s": hist[0]["images_per_s"]}
    eps = validation_eps(cfg.seed, 6, cfg.latent_dim)
    want = validation_loss(val_step_for(cfg), params5, val, eps, None, 16)
    assert {k: hist[1][k] for k in want} == want
    assert (run / "loss.png").is_file()
    # exactly 5 steps: 6 steps (max_steps at an epoch end) = 2 whole epochs differ from it
    params6, hist6 = train(dataclasses.replace(cfg, max_steps=6), data, None, progress=False,
                           val_images=val)
    at_epoch_2, _ = train(tiny(epochs=2), data, None, progress=False, val_images=val)
    assert leaves_equal(params6, at_epoch_2) and not leaves_equal(params6, params5)
    assert hist6[-1]["stop"] == "max_steps" and "partial" not in hist6[-1]
    # resume with a larger cap, then with none: the same as never stopping
    _, hist_b = train(dataclasses.replace(cfg, max_steps=6), data, run, resume=True,
                      progress=False, val_images=val)
    assert [without_timing(h) for h in hist_b] == [without_timing(h) for h in hist6]
    params, hist = train(dataclasses.replace(cfg, max_steps=0), data, run, resume=True,
                         progress=False, val_images=val)
    assert leaves_equal(params, ref_params)
    assert [without_timing(h) for h in metric_lines(run)] == \
        [without_timing(h) for h in ref_hist]
    # max_steps beyond the epochs: the epochs win
    _, hist = train(dataclasses.replace(cfg, max_steps=100), data, None, progress=False)
    assert hist[-1]["step"] == 12 and hist[-1]["stop"] == "epochs"
