"""Tests of jaxvae.train: config, augmentation, train step, run directory, exact resume,
validation loss, best checkpoint, patience, max_steps and the loss curve."""

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.ndimage as ndi

from jaxvae import losses
from jaxvae.augment import affine_resample, augment_batch
from jaxvae.checkpoint import best_step, load_run
from jaxvae.config import SCHEDULE_FIELDS, AugmentConfig, TrainConfig, model_from_config
from jaxvae.errors import ConfigError, DataError, OutputError, RunError
from jaxvae.model import ConvVAE
from jaxvae.train import (
    convergence,
    epoch_permutation,
    init_state,
    make_train_step,
    stop_reason,
    summarize,
    train,
    val_step_for,
    validation_eps,
    validation_loss,
    write_loss_curve,
)

# the module itself (jaxvae.train, the attribute of the package, is the function)
TRAIN_MODULE = sys.modules["jaxvae.train"]

REPO = Path(__file__).resolve().parents[1]
# one tiny model and optimiser shared by most tests: the compiled step is cached across them
TINY = dict(latent_dim=8, channels=(4, 4, 4, 4), batch_size=16, lr=1e-3)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def images(n=64, seed=0) -> np.ndarray:
    # smooth blobs (not white noise) so that a VAE can actually learn something
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.normal(size=(n, 64, 64)), sigma=(0, 4, 4))
    return (x / x.std()).astype(np.float32)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb, strict=True))


def ckpt_steps(run_dir) -> list[int]:
    d = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def metric_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(line: dict) -> dict:
    """A metrics line without its wall-clock fields (they differ from run to run)."""
    return {k: v for k, v in line.items() if k not in ("seconds", "images_per_s")}


# --------------------------------------------------------------------------- config


def test_config_json_roundtrip_and_validation(tmp_path):
    cfg = tiny(augmentation=AugmentConfig(contrast=(0.9, 1.1)),
               data={"modality": "t2", "fold": 3, "cases": ["a", "b"]})
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert isinstance(again.augmentation, AugmentConfig) and again.channels == (4, 4, 4, 4)
    defaults = TrainConfig()
    assert (defaults.latent_dim, defaults.beta, defaults.lr, defaults.batch_size,
            defaults.keep_checkpoints) == (256, 1.0, 1e-4, 64, 3)
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({**cfg.to_dict(), "latnet_dim": 3})
    for bad in (dict(beta=-1.0), dict(lr=0.0), dict(batch_size=0), dict(data={"x": object()}),
                dict(channels=(4, 4, 4)), dict(augmentation={"rotation": -1})):
        with pytest.raises(ConfigError):
            tiny(**bad)
    with pytest.raises(ConfigError):
        AugmentConfig(scale=(1.2, 0.9))
    with pytest.raises(ConfigError):
        AugmentConfig(mirror_prob=1.5)


def test_model_from_config():
    model = model_from_config(tiny(latent_dim=5))
    assert isinstance(model, ConvVAE) and model.latent_dim == 5
    assert model.channels == (4, 4, 4, 4)


# --------------------------------------------------------------------------- augmentation


def test_augment_keeps_shape_dtype_and_depends_on_key_only():
    x = jnp.asarray(images(4))
    aug = AugmentConfig()
    a = augment_batch(jax.random.key(1), x, aug)
    b = augment_batch(jax.random.key(1), x, aug)
    c = augment_batch(jax.random.key(2), x, aug)
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # each image gets its own draw
    same = jnp.stack([x[0]] * 4)
    d = augment_batch(jax.random.key(1), same, aug)
    assert not np.allclose(d[0], d[1])


def test_augment_is_identity_when_ranges_are_neutral():
    x = jnp.asarray(images(4))
    np.testing.assert_array_equal(augment_batch(jax.random.key(0), x, AugmentConfig.neutral()), x)
    # the resampling path itself is exact at angle 0, scale 1, and an exact mirror
    np.testing.assert_array_equal(affine_resample(x[0], 0.0, 1.0, False), x[0])
    np.testing.assert_array_equal(affine_resample(x[0], 0.0, 1.0, True), x[0, :, ::-1])
    mirror = dataclasses.replace(AugmentConfig.neutral(), mirror_prob=1.0)
    np.testing.assert_array_equal(augment_batch(jax.random.key(0), x, mirror), x[:, :, ::-1])


@pytest.mark.parametrize("angle,scale,flip", [(0.1, 1.0, False), (-0.07, 1.15, True),
                                              (0.0, 0.9, False)])
def test_affine_resample_matches_scipy(angle, scale, flip):
    x = images(1)[0]
    c = np.array([31.5, 31.5])
    f = -1.0 if flip else 1.0
    m = np.array([[np.cos(angle), np.sin(angle)],
                  [-f * np.sin(angle), f * np.cos(angle)]]) / scale
    want = ndi.affine_transform(x.astype(np.float64), m, offset=c - m @ c, order=1,
                                mode="grid-constant", cval=0.0)
    got = affine_resample(jnp.asarray(x), angle, scale, flip)
    # float32 sample coordinates (up to ~64 px) are off by ~1e-5 px, and the bilinear slope
    # reaches max|x| per px at the zero border: atol 1e-4 * max|x| (measured error 2e-6 * max)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(x).max())
    if angle or scale != 1:
        assert not np.allclose(got, x)


def test_intensity_augmentations():
    x = jnp.asarray(images(8))
    neutral = AugmentConfig.neutral()
    bright = dataclasses.replace(neutral, brightness=(2.0, 2.0))
    np.testing.assert_allclose(augment_batch(jax.random.key(0), x, bright), 2 * x, rtol=1e-6)
    noisy = dataclasses.replace(neutral, noise_std=0.1)
    diff = augment_batch(jax.random.key(0), x, noisy) - x
    assert abs(float(jnp.std(diff)) - 0.1) < 0.005 and abs(float(jnp.mean(diff))) < 0.005
    contrast = dataclasses.replace(neutral, contrast=(0.5, 0.5))
    y = augment_batch(jax.random.key(0), x, contrast)
    np.testing.assert_allclose(jnp.std(y, axis=(1, 2)), 0.5 * jnp.std(x, axis=(1, 2)), rtol=1e-4)


# --------------------------------------------------------------------------- train step


def assert_same_adam_step(params, opt_state, ref_params, ref_opt_state, *, lr):
    """Two first Adam steps from the same state agree: the gradients (Adam's first moment,
    0.1 * g, which unlike the step keeps the gradient's scale) and the new parameters."""
    mu, ref_mu = opt_state[0].mu, ref_opt_state[0].mu
    for a, b in zip(jax.tree.leaves(mu), jax.tree.leaves(ref_mu), strict=True):
        b = np.asarray(b)
        # float32 gradients of two programs: atol for entries that nearly cancel
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        # the first step moves each parameter by about +-lr: 1 % of a step
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * lr)


def test_train_step_is_the_reference_step_and_compiles_once():
    model = model_from_config(tiny())
    params, opt_state = init_state(tiny())  # its compiled init is shared with other tests
    opt = optax.adam(1e-3)
    batch = jnp.asarray(images(16))
    step = make_train_step(model, lr=1e-3, beta=0.5, augment=None)
    key = jax.random.key(7)
    p1, o1, m = step(params, opt_state, batch, key)

    def ref_loss(p):  # the documented step, written out: z ~ q(z|x) with key fold_in(key, 1)
        x = batch[..., None]
        x_hat, aux = model.apply({"params": p}, x, key=jax.random.fold_in(key, 1))
        loss, rec, kl = losses.beta_elbo(x, x_hat, aux["mu"], aux["log_sigma"], 0.5)
        return loss.mean(), (rec.mean(), kl.mean())

    @jax.jit
    def ref_step(params, opt_state):
        (loss, (rec, kl)), grads = jax.value_and_grad(ref_loss, has_aux=True)(params)
        updates, state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, loss, rec, kl

    p_ref, o_ref, loss, rec, kl = ref_step(params, opt_state)
    # batch means of per-image sums of 4096 float32 terms: ~1e-6 relative rounding
    np.testing.assert_allclose([m["loss"], m["rec"], m["kl"]], [loss, rec, kl], rtol=1e-5)
    np.testing.assert_allclose(m["loss"], m["rec"] + 0.5 * m["kl"], rtol=1e-5)
    assert_same_adam_step(p1, o1, p_ref, o_ref, lr=1e-3)
    # z is sampled: another key, another loss; and no recompilation from step to step
    _, _, m2 = step(params, opt_state, batch, jax.random.key(8))
    assert float(m2["rec"]) != float(m["rec"])
    first = float(m["loss"])
    for s in range(10):
        p1, o1, m = step(p1, o1, batch, jax.random.fold_in(key, s))
    assert float(m["loss"]) < first
    assert step._cache_size() == 1


def test_micro_batched_gradient_is_the_whole_batch_gradient():
    model = model_from_config(tiny())
    params, opt_state = init_state(tiny())
    batch, key = jnp.asarray(images(10)), jax.random.key(3)
    whole = make_train_step(model, lr=1e-3, beta=0.5, micro_batch=0)
    micro = make_train_step(model, lr=1e-3, beta=0.5, micro_batch=4)  # 4 + 4 + 2 images
    p_whole, o_whole, m_whole = whole(params, opt_state, batch, key)
    p_micro, o_micro, m_micro = micro(params, opt_state, batch, key)
    for k in ("loss", "rec", "kl"):
        # sums of 10 per-image sums in another order: ~1e-6 relative (rtol ~ 80 float32 ulps)
        np.testing.assert_allclose(m_micro[k], m_whole[k], rtol=1e-5)
    assert_same_adam_step(p_micro, o_micro, p_whole, o_whole, lr=1e-3)


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    a = epoch_permutation(0, 3, 50)
    assert sorted(a) == list(range(50))
    np.testing.assert_array_equal(a, epoch_permutation(0, 3, 50))
    assert not np.array_equal(a, epoch_permutation(0, 4, 50))
    assert not np.array_equal(a, epoch_permutation(1, 3, 50))


# --------------------------------------------------------------------------- run directory


def test_train_writes_run_dir_and_load_run_returns_final_params(tmp_path):
    run = tmp_path / "run"
    cfg = tiny(epochs=3, checkpoint_every=2, keep_checkpoints=1, data={"source": "random"})
    params, history = train(cfg, images(40), run, progress=False)
    # 40 images, batch 16: 2 steps per epoch, the last 8 images dropped
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["step"] == 6
    assert metric_lines(run) == history
    for h in history:
        assert {"epoch", "loss", "rec", "kl", "images_per_s", "seconds"} <= set(h)
        assert np.isclose(h["loss"], h["rec"] + cfg.beta * h["kl"])
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == cfg
    assert ckpt_steps(run) == [6]  # saved at epochs 2 and 3, only the last one kept
    model, loaded, cfg2 = load_run(run)
    assert cfg2 == cfg and model == model_from_config(cfg)
    assert leaves_equal(loaded, params)
    assert not list(run.glob("**/*.tmp*"))


def test_relative_run_dir_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # orbax rejects relative checkpoint paths unless we resolve them
    params, _ = train(tiny(epochs=1), images(16), "rel/run", progress=False)
    assert leaves_equal(load_run("rel/run")[1], params)


def test_refuses_non_empty_run_dir_unless_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        train(tiny(epochs=1), images(32), run, progress=False)
    with pytest.raises(RunError, match="config.json"):
        train(tiny(epochs=1), images(32), run, resume=True, progress=False)
    train(tiny(epochs=1), images(32), run, overwrite=True, progress=False)
    assert (run / "notes.txt").read_text() == "mine"  # only our own files are replaced
    assert len(metric_lines(run)) == 1
    with pytest.raises(OutputError):
        train(tiny(epochs=1), images(32), run, progress=False)


def test_resume_continues_bit_identically_and_checks_config_and_data(tmp_path):
    run = tmp_path / "run"
    data = images(48)
    ref_params, ref_hist = train(tiny(epochs=4), data, None, progress=False)
    train(tiny(epochs=2, checkpoint_every=1), data, run, progress=False)
    with pytest.raises(RunError, match="beta"):
        train(tiny(epochs=4, beta=2.0), data, run, resume=True, progress=False)
    with pytest.raises(RunError, match="other data"):
        train(tiny(epochs=4), images(48, seed=1), run, resume=True, progress=False)
    # as if killed after writing epoch 3's metrics but before its checkpoint, mid-line
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**metric_lines(run)[-1], "epoch": 3}) + "\n" + '{"epoch": 4, "lo')
    params, hist = train(tiny(epochs=4), data, run, resume=True, progress=False)
    assert leaves_equal(params, ref_params)
    assert [h["epoch"] for h in metric_lines(run)] == [1, 2, 3, 4]
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]
    # resuming a finished run is a no-op that returns its params
    params2, _ = train(None, data, run, resume=True, progress=False)
    assert leaves_equal(params2, ref_params)


class CtrlCAt(np.ndarray):
    """Training images that press Ctrl-C while the `countdown`-th batch is gathered."""

    def __getitem__(self, key):
        if isinstance(key, np.ndarray):  # a batch gather (the data checks slice instead)
            self.countdown -= 1
            if self.countdown == 0:
                signal.raise_signal(signal.SIGINT)
        return np.asarray(self)[key]


def test_ctrl_c_mid_epoch_saves_and_resume_is_bit_identical(tmp_path):
    run, data, cfg = tmp_path / "run", images(64), tiny(epochs=3, checkpoint_every=1)
    trap = data.view(CtrlCAt)
    trap.countdown = 6  # 4 steps per epoch: interrupted in epoch 2, after global step 5
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with pytest.raises(KeyboardInterrupt, match="interrupted at global step 6"):
        train(cfg, trap, run, progress=False)
    assert ckpt_steps(run) == [4, 6] and len(metric_lines(run)) == 1
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    params, hist = train(cfg, data, run, resume=True, progress=False)
    ref_params, ref_hist = train(cfg, data, None, progress=False)
    assert leaves_equal(params, ref_params)
    assert [h["loss"] for h in metric_lines(run)] == [h["loss"] for h in ref_hist]
    assert [h["epoch"] for h in hist] == [1, 2, 3]


def test_load_run_errors_name_the_path_and_problem(tmp_path):
    with pytest.raises(RunError, match="not found"):
        load_run(tmp_path / "nope")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunError, match="config.json: missing"):
        load_run(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(RunError, match="config.json: not a valid"):
        load_run(run)
    (run / "config.json").write_text(tiny().to_json())
    with pytest.raises(RunError, match="no checkpoint"):
        load_run(run)

    good = tmp_path / "good"
    train(tiny(epochs=1), images(32), good, progress=False)
    (step,) = ckpt_steps(good)
    # a checkpoint of another model under this config.json
    other = json.loads((good / "config.json").read_text())
    other["latent_dim"] = 16
    (good / "config.json").write_text(json.dumps(other))
    with pytest.raises(RunError, match=f"checkpoints/{step}: .*different model"):
        load_run(good)
    (good / "config.json").write_text(tiny(epochs=1).to_json())
    load_run(good)
    # truncate every data file of the params item. Checked in a child process: after a
    # failed read, orbax's in-flight tensorstore reads report to a closed event loop later,
    # as "unraisable" warnings that would land in whichever test runs next.
    for f in (good / "checkpoints" / str(step) / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:5])
    code = ("import sys\nfrom jaxvae.errors import RunError\nfrom jaxvae import load_run\n"
            "try:\n    load_run(sys.argv[1])\nexcept RunError as e:\n    print('RunError:', e)")
    out = subprocess.run([sys.executable, "-c", code, str(good)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300).stdout
    assert f"RunError: {good}/checkpoints/{step}: cannot read checkpoint" in out
    assert "truncated or corrupt" in out


def test_non_finite_loss_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    # one step per epoch at lr 1e6: epoch 1 is finite, its update blows the weights up,
    # so epoch 2 overflows
    run = tmp_path / "run"
    cfg = tiny(epochs=4, lr=1e6, checkpoint_every=1, augment=False)
    with pytest.raises(RunError, match=r"non-finite loss .* at epoch 2 .*last good checkpoint "
                                       r"kept at .*checkpoints/1"):
        train(cfg, images(16), run, progress=False)
    assert ckpt_steps(run) == [1]
    assert [h["epoch"] for h in metric_lines(run)] == [1]
    _, params, _ = load_run(run)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


def test_rejects_bad_training_images(tmp_path):
    bad = images(32)
    bad[5, 3, 3] = np.inf
    with pytest.raises(DataError, match="image 5"):
        train(tiny(epochs=1), bad, None, progress=False)
    with pytest.raises(DataError, match=r"\(N, 64, 64\)"):
        train(tiny(epochs=1), images(32)[:, :32], None, progress=False)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train(tiny(epochs=1), images(8), None, progress=False)


# --------------------------------------------------------------------------- kill / resume

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jaxvae.config import TrainConfig
    from jaxvae.train import train
    run_dir, cfg_json, data, mode = sys.argv[1:5]
    val = np.load(sys.argv[5]) if len(sys.argv) > 5 else None
    train(TrainConfig.from_dict(json.loads(cfg_json)), np.load(data), run_dir,
          resume=mode == "resume", progress=False, val_images=val)
""")


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
    """Environment for training subprocesses; they share a persistent compilation cache."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _start_child(tmp_path, run, cfg, data, mode, env, val=None):
    script, npy, val_npy = tmp_path / "child.py", tmp_path / "data.npy", tmp_path / "val.npy"
    script.write_text(CHILD)
    np.save(npy, data)
    extra = []
    if val is not None:
        np.save(val_npy, val)
        extra = [str(val_npy)]
    return subprocess.Popen([sys.executable, str(script), str(run), cfg.to_json(), str(npy), mode,
                             *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, run, timeout=120.0):
    t0 = time.monotonic()
    while not ckpt_steps(run):
        if proc.poll() is not None:
            pytest.fail(f"training child exited early ({proc.returncode}): "
                        f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("no checkpoint appeared")
        time.sleep(0.01)


EXACT = dict(epochs=10, checkpoint_every=1, keep_checkpoints=2)  # 4 steps/epoch on 64 images


def _resume_equals_uninterrupted(tmp_path, run, cfg, data, child_env, val=None) -> list:
    """Resume `run` in a child; its final params must equal an uninterrupted run's, whose
    history is returned."""
    resumed = _start_child(tmp_path, run, cfg, data, "resume", child_env, val)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    ref_params, ref_hist = train(cfg, data, None, progress=False, val_images=val)
    _, params, _ = load_run(run, "latest")
    assert leaves_equal(params, ref_params)
    return ref_hist


def test_sigkill_then_resume_is_bit_identical(tmp_path, child_env):
    # with validation and patience: the val losses, and so where patience would stop, must
    # repeat too (on this data the val loss keeps falling: the run ends by epochs)
    run, data, cfg = tmp_path / "run", images(64), tiny(**EXACT, patience=8)
    val = images(12, seed=3)
    proc = _start_child(tmp_path, run, cfg, data, "fresh", child_env, val)
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(ckpt_steps(run))
    assert killed_at < cfg.epochs * 4, "the child finished before it was killed"
    ref_hist = _resume_equals_uninterrupted(tmp_path, run, cfg, data, child_env, val)
    lines = metric_lines(run)
    assert [h["epoch"] for h in lines] == [h["epoch"] for h in ref_hist]
    assert [without_timing(h) for h in lines] == [without_timing(h) for h in ref_hist]
    assert lines[-1]["stop"] == ref_hist[-1]["stop"]


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_then_resumes_exactly(tmp_path, child_env):
    run, data, cfg = tmp_path / "run", images(64), tiny(**EXACT)
    proc = _start_child(tmp_path, run, cfg, data, "fresh", child_env)
    _wait_for_checkpoint(proc, run)
    first = ckpt_steps(run)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signal.SIGINT, 130, 1), err[-2000:]
    assert "KeyboardInterrupt" in err and "interrupted" in err
    after = ckpt_steps(run)
    assert max(after) > max(first) and max(after) < cfg.epochs * 4  # saved where it stopped
    ref_hist = _resume_equals_uninterrupted(tmp_path, run, cfg, data, child_env)
    assert [h["loss"] for h in metric_lines(run)] == [h["loss"] for h in ref_hist]


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


def test_loss_curve_is_a_png_written_atomically(tmp_path):
    import matplotlib.image

    run = tmp_path / "run"
    train(tiny(epochs=2), images(32), run, progress=False, val_images=VAL)
    png = run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0  # something is drawn
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    # also without validation, and in-memory runs write nothing
    train(tiny(epochs=1), images(32), tmp_path / "plain", progress=False)
    assert (tmp_path / "plain" / "loss.png").is_file()
    assert write_loss_curve(tmp_path / "none.png", []) is None
    assert not (tmp_path / "none.png").exists()


def test_patience_and_max_steps_are_validated_schedule_fields():
    assert {"patience", "max_steps"} <= set(SCHEDULE_FIELDS)
    for bad in (dict(patience=-1), dict(max_steps=-3), dict(patience=1.5),
                dict(max_steps="10")):
        with pytest.raises(ConfigError, match="patience|max_steps"):
            tiny(**bad)
    assert TrainConfig.from_dict({k: v for k, v in tiny().to_dict().items()
                                  if k not in ("patience", "max_steps")}) == tiny()
    with pytest.raises(ConfigError, match="patience=2 .*no validation images"):
        train(tiny(epochs=1, patience=2), images(16), None, progress=False)
    with pytest.raises(ConfigError, match="validation images"):
        train(tiny(epochs=1, patience=2), images(16), None, progress=False,
              val_images=np.zeros((0, 64, 64), np.float32))
    with pytest.raises(DataError, match=r"validation images must be a \(M, 64, 64\)"):
        train(tiny(epochs=1), images(16), None, progress=False, val_images=images(3)[:, :32])
    bad = images(3)
    bad[1, 0, 0] = np.nan
    with pytest.raises(DataError, match="validation image 1"):
        train(tiny(epochs=1), images(16), None, progress=False, val_images=bad)
