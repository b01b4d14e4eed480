"""Tests of jaxvae.training.trainer: the train step, the run directory, exact resume after
SIGKILL and SIGINT."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from run_helpers import (
    REPO,
    ckpt_steps,
    images,
    leaves_equal,
    metric_lines,
    tiny,
    without_timing,
)

from jaxvae.base.errors import ConfigError, DataError, OutputError, RunError
from jaxvae.core import losses
from jaxvae.training.checkpoint import load_run
from jaxvae.training.config import TrainConfig, model_from_config
from jaxvae.training.trainer import epoch_permutation, init_state, make_train_step, train

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
    code = ("import sys\nfrom jaxvae.base.errors import RunError\nfrom jaxvae import load_run\n"
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
    from jaxvae.training.config import TrainConfig
    from jaxvae.training.trainer import train
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
