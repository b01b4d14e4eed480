"""Tests of jaxvae.training.checkpoint: the run directory (retention of the latest and the best
checkpoint, metrics history), and the failed-read noise dropped only while a checkpoint is
read (nothing process-wide stays installed)."""

import asyncio
import dataclasses
import gc
import json
import logging
import sys
import threading

import jax
import numpy as np
import pytest

from jaxvae.base.errors import RunError
from jaxvae.training import checkpoint, read_noise
from jaxvae.training.checkpoint import load_run
from jaxvae.training.config import TrainConfig
from jaxvae.training.rundir import RunDir
from jaxvae.training.trainer import init_state

CFG = TrainConfig(latent_dim=8, channels=(4, 4, 4, 4), batch_size=16, lr=1e-3, epochs=1)
CLOSED = "Event loop is closed"
TS_TASK = ("Task exception was never retrieved\nfuture: <Task exception=ValueError("
           "'OUT_OF_RANGE: ... [tensorstore_spec=...]')>")


def write_run(run, cfg=CFG, step=1):
    """A run directory with one checkpoint of a fresh model (no training)."""
    params, opt_state = init_state(cfg)
    run.mkdir()
    r = RunDir(run.absolute(), cfg, {"n_images": 16})
    r.open(overwrite=False, restore=False)
    r.save(step, params, opt_state)
    r.close()
    return params


def truncate(run):
    for f in (run / "checkpoints").rglob("*"):
        if f.is_file() and f.parent.name == "d" and "params" in f.parts:
            f.write_bytes(f.read_bytes()[:5])


class Unraisable:
    """An object whose finaliser raises `exc`: deleting it makes an unraisable report."""

    def __init__(self, exc):
        self.exc = exc

    def __del__(self):
        raise self.exc


def report_unraisable(exc):
    Unraisable(exc)  # collected at once: reported through sys.unraisablehook


@pytest.fixture
def recorded():
    """The unraisable reports that reach the hook in place before the code under test."""
    seen, previous = [], sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    yield seen
    sys.unraisablehook = previous


def hooks():
    return sys.unraisablehook, list(logging.getLogger("asyncio").filters)


def test_load_run_returns_the_saved_params_and_leaves_no_hook(tmp_path, recorded):
    params = write_run(tmp_path / "run")
    before = hooks()
    model, loaded, cfg = load_run(tmp_path / "run")
    assert hooks() == before
    assert cfg == CFG and model.latent_dim == 8 and model.conv_impl == "lax"
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_truncated_checkpoint_is_a_run_error_and_the_hooks_are_restored(tmp_path, recorded,
                                                                        caplog):
    write_run(tmp_path / "run")
    truncate(tmp_path / "run")
    before = hooks()
    with pytest.raises(RunError, match=r"checkpoints/1: cannot read checkpoint.*truncated or "
                                       r"corrupt") as exc:
        load_run(tmp_path / "run")
    assert exc.value.__context__ is None and exc.value.__cause__ is None
    del exc
    gc.collect()  # whatever the failed read left behind is collected now, after load_run
    assert hooks() == before
    assert not [e for e in recorded if str(e) == CLOSED]
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    # the hook in place before is the one in use again
    report_unraisable(RuntimeError(CLOSED))
    assert [str(e) for e in recorded] == [CLOSED]


def test_only_failed_read_reports_are_dropped_inside_the_block(recorded, caplog):
    log = logging.getLogger("asyncio")
    with read_noise.FailedReadNoise() as noise:
        report_unraisable(RuntimeError(CLOSED))
        report_unraisable(RuntimeError("another error"))
        report_unraisable(ValueError(CLOSED))
        log.error(TS_TASK)
        log.error(TS_TASK.replace("Task", "Future"))  # asyncio's wording for a Future
        log.error("Task exception was never retrieved\nfuture: <Task exception=KeyError('x')>")
    assert noise.dropped == 3
    assert [(type(e), str(e)) for e in recorded] == [(RuntimeError, "another error"),
                                                     (ValueError, CLOSED)]
    assert [r.getMessage().splitlines()[-1] for r in caplog.records] == [
        "future: <Task exception=KeyError('x')>"]
    # after the block nothing is dropped
    log.error(TS_TASK)
    report_unraisable(RuntimeError(CLOSED))
    assert caplog.records[-1].getMessage() == TS_TASK and str(recorded[-1]) == CLOSED


def test_a_hook_installed_inside_the_block_is_left_in_place(recorded):
    def mine(unraisable):
        pass

    with read_noise.FailedReadNoise():
        sys.unraisablehook = mine
    assert sys.unraisablehook is mine


def test_a_failed_read_keeps_its_late_reports_inside_the_block(recorded, caplog):
    """The reads still in flight report after the failure (from other threads), and the
    failed tasks log when collected: both must happen before the hooks are removed."""
    loop = asyncio.new_event_loop()

    async def fail():
        raise ValueError("OUT_OF_RANGE [tensorstore_spec=...]")

    def read():
        task = loop.create_task(fail())  # fails; its exception is never retrieved
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        late = threading.Timer(0.05, report_unraisable, (RuntimeError(CLOSED),))
        late.start()
        raise RuntimeError(f"read failed ({task.done()})")  # this frame holds the task

    before = hooks()
    with pytest.raises(RunError, match=r"^f: cannot read x \(RuntimeError: read failed "
                                       r"\(True\)\); it is truncated or corrupt!$"):
        read_noise.read_or_fail(read, "f", "x", lambda: "!")
    gc.collect()
    assert hooks() == before
    assert recorded == []
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_retention_keeps_the_latest_and_the_best_across_reopen(tmp_path):
    cfg = dataclasses.replace(CFG, keep_checkpoints=2)
    params, opt_state = init_state(cfg)
    run = tmp_path / "run"
    run.mkdir()

    def save_all(restore, steps):
        r = RunDir(run.absolute(), cfg, {"n_images": 16}, validated=True)
        r.open(overwrite=False, restore=restore)
        for step, val_loss in steps:  # params tell the steps apart
            r.save(step, jax.tree.map(lambda a, s=step: a + s, params), opt_state,
                   val_loss=val_loss)
        r.close()
        return checkpoint.checkpoint_steps(run / "checkpoints")

    # step 4: no val loss (as a Ctrl-C inside an epoch), kept by recency only
    assert save_all(False, [(1, 5.0), (2, 3.0), (3, 4.0), (4, None)]) == [2, 3, 4]
    # reopened (a resumed run): the best is still known; a tie does not replace it
    assert save_all(True, [(5, 3.0), (6, 9.0)]) == [2, 5, 6]
    assert checkpoint.best_step(run) == (2, 3.0)
    assert checkpoint.best_step(run, "latest") == (6, 9.0)
    _, loaded, _, info = load_run(run, with_info=True)
    assert info == {"step": 2, "val_loss": 3.0, "which": "best"}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b) + 2)
    _, loaded, _ = load_run(run, 5)
    np.testing.assert_array_equal(jax.tree.leaves(loaded)[0], jax.tree.leaves(params)[0] + 5)


def test_history_keeps_the_partial_line_of_the_step_resumed_from(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"epoch": 1, "step": 3}, {"epoch": 2, "step": 6},
             {"epoch": 3, "step": 7, "partial": True}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in lines))
    r = RunDir(run.absolute(), CFG, {})
    assert r.history(7, 3, rewrite=False) == lines  # stopped by max_steps at step 7
    assert r.history(8, 3, rewrite=False) == lines[:2]  # a later checkpoint of epoch 3
    assert r.history(6, 3, rewrite=False) == lines[:2]
    assert r.history(3, 3, rewrite=True) == lines[:1]
    assert (run / "metrics.jsonl").read_text() == json.dumps(lines[0]) + "\n"
