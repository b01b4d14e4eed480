"""The run directory of a training run: its config, its metrics and its orbax checkpoints.

Layout:
  config.json           the TrainConfig (written atomically)
  metrics.jsonl         one JSON line per finished epoch (rewritten atomically), plus a line
                        marked "partial" for an epoch cut by max_steps
  checkpoints/<step>/   orbax: params, opt_state, meta (JSON: format, step, partial epoch sums,
                        data fingerprints, validation loss, config) and orbax's own metrics
                        (the validation loss, which ranks the checkpoints)
  loss.png              the loss curve (jaxvae.train)

Retention: the last `keep_checkpoints` checkpoints, and the one with the lowest validation
loss (ties: the earliest), both by orbax preservation policies (LatestN, BestN). A
checkpoint without a validation loss (no validation, Ctrl-C inside an epoch) is ranked by
recency only.

Everything that reads or writes these files is here (`check_run_dir`, `prepare_run_dir`,
`RunDir`, `load_run`, `best_step`); a restore checks the stored shapes against the config's
model, and an unreadable checkpoint is a RunError that names it. `load_run` loads the best
checkpoint by validation loss by default (the latest one in a run without validation).
"""

import contextlib
import functools
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxvae.config import SCHEDULE_FIELDS, TrainConfig, model_from_config
from jaxvae.errors import ConfigError, OutputError, RunError
from jaxvae.io import write_text
from jaxvae.model import ConvVAE, init_params

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
_FORMAT = 1


def _read_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{path}: missing; {run_dir} is not a jaxvae run directory")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, ConfigError) as e:
        raise RunError(f"{path}: not a valid training config ({e})") from None


def check_run_dir(run_dir, *, resume: bool, overwrite: bool) -> bool:
    """Refuse a run dir that is a file, or not empty without resume / overwrite (cheap: the
    CLI calls it before loading data). Returns whether it is a non-empty folder."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise OutputError(f"{run_dir}: exists and is not a directory")
    nonempty = run_dir.is_dir() and any(run_dir.iterdir())
    if nonempty and not resume and not overwrite:
        raise OutputError(f"{run_dir}: not empty; pass resume=True (--resume) to continue the "
                          f"run there or overwrite=True (--overwrite) to replace it")
    return nonempty


def prepare_run_dir(run_dir: Path, cfg: TrainConfig | None, *, resume: bool, overwrite: bool):
    """Validate the run dir; return (cfg to use, whether to restore). Writes nothing.

    On resume the stored config wins when `cfg` is None; otherwise the two may differ only
    in SCHEDULE_FIELDS.
    """
    nonempty = check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    if resume and (run_dir / CONFIG_FILE).exists():
        stored = _read_config(run_dir)
        if cfg is None:
            return stored, True
        a, b = stored.to_dict(), cfg.to_dict()
        diff = sorted(k for k in a if k not in SCHEDULE_FIELDS and a[k] != b[k])
        if diff:
            raise RunError(f"{run_dir / CONFIG_FILE}: cannot resume with a different config "
                           f"({', '.join(f'{k}: {a[k]} -> {b[k]}' for k in diff)}); only "
                           f"{', '.join(SCHEDULE_FIELDS)} may change")
        return cfg, True
    if resume and nonempty:
        raise RunError(f"{run_dir}: cannot resume, no {CONFIG_FILE} (not a jaxvae run dir)")
    if cfg is None:
        raise ConfigError(f"{run_dir}: nothing to resume; pass a TrainConfig to start a run")
    return cfg, False


def _read_metrics(path: Path, upto_epoch: int, partial_step: int | None = None) -> list[dict]:
    """Epoch lines 1..upto_epoch of metrics.jsonl, then the line of epoch upto_epoch + 1 if
    it is marked partial and ends at `partial_step` (later or broken lines are dropped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if not isinstance(rec, dict) or not isinstance(rec.get("epoch"), int) or \
                rec["epoch"] != len(out) + 1:
            continue
        if rec["epoch"] <= upto_epoch and not rec.get("partial"):
            out.append(rec)
        elif rec["epoch"] == upto_epoch + 1 and rec.get("partial") and \
                partial_step is not None and rec.get("step") == partial_step:
            out.append(rec)
            break
    return out


def _write_metrics(path: Path, history: list[dict]) -> None:
    write_text(path, "".join(json.dumps(h) + "\n" for h in history), overwrite=True)


# --------------------------------------------------------------------------- checkpoints


def _steps(ckpt_dir: Path) -> list[int]:
    # finished orbax steps are plain integer folder names; in-progress saves carry a suffix
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _rank(metrics) -> tuple:
    # BestN keeps the highest: the lowest val_loss, then the earliest step
    return -metrics["val_loss"], -metrics["step"]


def _manager(ckpt_dir: Path, keep: int | None, *, create: bool,
             validated: bool = False) -> ocp.CheckpointManager:
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        create=create, enable_async_checkpointing=False,  # a checkpoint is on disk on return
        cleanup_tmp_directories=create,  # half-written saves of a killed run
        # best_fn only makes orbax write the metrics that BestN ranks (orbax reads them back
        # when a run is reopened); without validation it would warn at every save
        best_fn=(lambda m: m["val_loss"]) if validated else None, best_mode="min",
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_rank, n=1, keep_checkpoints_without_metrics=False)]))
    # handlers named up front so that metadata reads work before any save/restore call
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(ckpt_dir, item_handlers=handlers, options=options)


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)


def abstract_params(model: ConvVAE):
    """Shapes and dtypes of the model's parameters (nothing is computed)."""
    return jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))


# A failed read waits for the reports of the reads still in flight until this long passes
# without a new one.
_QUIET_S = 0.2


_UNRETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


class _FailedReadNoise(contextlib.AbstractContextManager):
    """Drops the noise of a failed checkpoint read, and only that, while the block runs.

    After one read fails, orbax closes its asyncio loop while tensorstore's other reads are
    still running; each then reports RuntimeError('Event loop is closed') as an unraisable
    traceback on stderr, and asyncio logs "Task (or Future) exception was never retrieved"
    (tensorstore's error inside) for the reads that failed too, when collected. Nothing
    awaits those reads. On entry this installs an unraisable hook and an asyncio log filter
    that drop exactly these reports and pass everything else on; on exit it puts the
    previous hook back and removes the filter. `settle` keeps a failed read's late reports
    inside the block.
    """

    def __init__(self):
        self.dropped = 0

    def _drop_closed_loop(self, unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            self.dropped += 1
        else:
            self._previous(unraisable)

    def filter(self, record) -> bool:
        """logging filter: False (drop) for an unretrieved failed tensorstore read."""
        msg = record.getMessage()
        if msg.startswith(_UNRETRIEVED) and "tensorstore" in msg:
            self.dropped += 1
            return False
        return True

    def __enter__(self):
        self._previous, self._hook = sys.unraisablehook, self._drop_closed_loop
        sys.unraisablehook = self._hook
        logging.getLogger("asyncio").addFilter(self)
        return self

    def settle(self) -> None:
        """After a failed read: collect its tasks and wait until its reads stop reporting."""
        seen = -1
        while seen != self.dropped:
            seen = self.dropped
            gc.collect()  # the failed tasks log now, while the filter is installed
            time.sleep(_QUIET_S)

    def __exit__(self, *exc):
        logging.getLogger("asyncio").removeFilter(self)
        if sys.unraisablehook is self._hook:  # a hook installed meanwhile by others stays
            sys.unraisablehook = self._previous
        return False


def _read(read, path: Path, what: str, hint=lambda: ""):
    """`read()`, its failure (of any type: tensorstore, orbax, OS) a RunError naming path.

    The RunError is raised without the original exception attached: its traceback holds
    the failed read's tasks, which must be collected while their reports are dropped.
    """
    with _FailedReadNoise() as noise:
        try:
            return read()
        except Exception as e:  # every error here means "unreadable"
            msg = str(e).splitlines()[0] if str(e) else ""
            error = RunError(f"{path}: cannot read {what} ({type(e).__name__}: {msg[:300]}); "
                             f"it is truncated or corrupt{hint()}")
        noise.settle()
    raise error


def _check_shapes(path: Path, mgr, step, expected, cfg):
    stored = _read(lambda: mgr.item_metadata(step)["params"], path, "checkpoint metadata")
    stored = getattr(stored, "tree", stored)
    got = {jax.tree_util.keystr(k): tuple(v.shape)
           for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    want = {jax.tree_util.keystr(k): tuple(v.shape)
            for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        k = diff[0]
        raise RunError(f"{path}: checkpoint is of a different model than config.json "
                       f"(latent_dim={cfg.latent_dim}, channels={list(cfg.channels)}): "
                       f"params{k} is {got.get(k)} in the checkpoint, {want.get(k)} expected")


def _restore(mgr, step: int, cfg: TrainConfig, sharding, params, opt_state=None):
    """Restore (params, opt_state or None, meta) of one checkpoint step, or raise RunError.

    Args:
      params, opt_state: abstract trees (shapes, dtypes) of what to restore; opt_state None
        restores the params only.
    """
    path = Path(mgr.directory) / str(step)
    _check_shapes(path, mgr, step, params, cfg)
    items = {"params": ocp.args.StandardRestore(_abstract(params, sharding)),
             "meta": ocp.args.JsonRestore()}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state, sharding))

    def hint():
        older = [s for s in mgr.all_steps() if s < step]
        return f"; delete it to fall back to the checkpoint of step {max(older)}" if older else ""

    out = _read(lambda: mgr.restore(step, args=ocp.args.Composite(**items)), path, "checkpoint",
                hint)
    meta = out["meta"]
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or "step" not in meta:
        raise RunError(f"{path}: checkpoint has no valid jaxvae metadata")
    stored = meta.get("config", {})
    for name in ("latent_dim", "channels"):
        if name in stored and stored[name] != cfg.to_dict()[name]:
            raise RunError(f"{path}: checkpoint was written with {name}={stored[name]}, "
                           f"config.json says {cfg.to_dict()[name]}")
    return out["params"], out.get("opt_state"), meta


def _val_loss(mgr, step: int):
    """The validation loss stored in a checkpoint's meta, or None (none was computed)."""
    path = Path(mgr.directory) / str(step)
    out = _read(lambda: mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())),
                path, "checkpoint metadata")
    meta = out["meta"]
    return meta.get("val_loss") if isinstance(meta, dict) else None


def _choose(mgr, steps: list[int], which) -> tuple[int, float | None]:
    """(step, its val_loss or None) of the checkpoint `which` names among `steps`."""
    if which == "latest":
        return steps[-1], _val_loss(mgr, steps[-1])
    if which == "best":
        scored = [(v, s) for s in steps if (v := _val_loss(mgr, s)) is not None]
        if not scored:  # a run without validation
            return steps[-1], None
        v, s = min(scored)  # ties: the earliest step, as the checkpoints are kept
        return s, v
    if isinstance(which, int) and not isinstance(which, bool):
        if which not in steps:
            raise RunError(f"{mgr.directory}: no checkpoint of step {which} (have {steps})")
        return which, _val_loss(mgr, which)
    raise ConfigError(f"which must be 'best', 'latest' or a checkpointed step, got {which!r}")


def _open_run(run_dir):
    """(cfg, checkpoint steps, manager that deletes nothing) of a run to load."""
    run_dir = Path(run_dir).absolute()  # orbax needs absolute paths
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    cfg = _read_config(run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    steps = _steps(ckpt_dir)
    if not steps:
        raise RunError(f"{ckpt_dir}: no checkpoint found (the run stopped before its first "
                       f"checkpoint?)")
    return cfg, steps, _manager(ckpt_dir, None, create=False)


def best_step(run_dir, which="best") -> tuple[int, float | None]:
    """The checkpoint `load_run(run_dir, which)` loads, without loading it.

    Args:
      run_dir: folder written by `jaxvae.train.train`.
      which: as in `load_run`.

    Returns:
      (global optimiser step of the checkpoint, its validation loss or None when the run
       had no validation or the checkpoint was cut inside an epoch by Ctrl-C).

    Raises:
      RunError: as `load_run`.
    """
    _, steps, mgr = _open_run(run_dir)
    try:
        return _choose(mgr, steps, which)
    finally:
        mgr.close()


def load_run(run_dir, which="best", *, with_info: bool = False):
    """Load the model and the checkpointed parameters of a run directory.

    Args:
      run_dir: folder written by `jaxvae.train.train`.
      which: "best": the stored checkpoint with the lowest validation loss (the earliest of
        equal ones; a run without validation: the latest checkpoint); "latest": the
        latest checkpoint; or an int, the checkpoint of that global step.
      with_info: also return which checkpoint was loaded.

    Returns:
      (model ConvVAE (conv_impl "lax"), params pytree on the default device,
       cfg TrainConfig), and with with_info a 4th item, a dict {"step": global optimiser
       step of the checkpoint, "val_loss": its validation loss or None, "which": which}.

    Raises:
      RunError: the folder, config.json or a checkpoint is missing, unreadable, truncated,
        or of a different model than config.json describes.
      ConfigError: `which` is none of the above.
    """
    cfg, steps, mgr = _open_run(run_dir)
    try:
        model = model_from_config(cfg)
        step, val_loss = _choose(mgr, steps, which)
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params, _, _ = _restore(mgr, step, cfg, sharding, abstract_params(model))
    finally:
        mgr.close()
    if with_info:
        return model, params, cfg, {"step": step, "val_loss": val_loss, "which": which}
    return model, params, cfg


# --------------------------------------------------------------------------- a training run


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class RunDir:
    """The files of a training run (or nothing, for run_dir=None).

    Every process opens it and joins the orbax saves; only process 0 writes config.json
    and metrics.jsonl.

    Args:
      run_dir: absolute path of the run directory (checked by `prepare_run_dir`), or None.
      cfg: the run's TrainConfig.
      data_meta: JSON description of the training and validation data (image count, batch
        size, fingerprints...), stored in every checkpoint; a restore refuses other data.
      validated: the run computes validation losses (passed to `save`), which rank the
        checkpoints for retention.
    """

    def __init__(self, run_dir: Path | None, cfg: TrainConfig, data_meta: dict, *,
                 validated: bool = False):
        self.dir, self.cfg, self.data_meta, self.validated = run_dir, cfg, data_meta, validated
        self.main = jax.process_index() == 0
        self.ckpt_dir = None if run_dir is None else run_dir / CHECKPOINT_DIR
        self.mgr = None

    def open(self, *, overwrite: bool, restore: bool) -> int | None:
        """Write config.json and open the checkpoints; return the step to resume from.

        Args:
          overwrite, restore: as given to / returned by `prepare_run_dir`.

        Returns:
          the latest checkpointed step when `restore` and there is one, else None.
        """
        if self.dir is None:
            return None
        _sync("jaxvae-train-checked")  # every process checked run_dir before any writes
        if self.main:
            if overwrite and not restore:
                for name in (CONFIG_FILE, METRICS_FILE):
                    (self.dir / name).unlink(missing_ok=True)
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            write_text(self.dir / CONFIG_FILE, self.cfg.to_json(), overwrite=True)
        _sync("jaxvae-train-prepared")
        self.mgr = _manager(self.ckpt_dir, self.cfg.keep_checkpoints, create=True,
                            validated=self.validated)
        steps = _steps(self.ckpt_dir)
        return steps[-1] if restore and steps else None

    def restore(self, step: int, abstract_state, sharding):
        """(params, opt_state, meta) of a checkpointed step of this run, on `sharding`.

        Args:
          step: a step returned by `open`.
          abstract_state: (params, opt_state) shapes and dtypes of a fresh run.
          sharding: where the restored arrays go.

        Raises:
          RunError: unreadable checkpoint, another model, or other training data.
        """
        params, opt_state, meta = _restore(self.mgr, step, self.cfg, sharding, *abstract_state)
        diff = [k for k, v in self.data_meta.items() if meta.get(k) != v]
        if diff:
            what = ", ".join(f"{k}: {meta.get(k)} -> {self.data_meta[k]}" for k in diff)
            raise RunError(f"{self.ckpt_dir / str(step)}: the checkpoint was trained on "
                           f"other data ({what}); resume needs the same training images, "
                           f"batch size and validation images")
        return params, opt_state, meta

    def history(self, step: int, steps_per_epoch: int, *, rewrite: bool) -> list[dict]:
        """metrics.jsonl up to a checkpointed step; rewrite drops the lines after it.

        Args:
          step: the global step of the checkpoint resumed from (0 for a fresh run).
          steps_per_epoch: optimiser steps per epoch.
          rewrite: rewrite metrics.jsonl with the lines kept.

        Returns:
          the lines of the epochs finished by `step`, then the partial line ending at
          `step` when training stopped there inside an epoch (max_steps).
        """
        if self.dir is None:
            return []
        history = _read_metrics(self.dir / METRICS_FILE, step // steps_per_epoch, step)
        if rewrite:
            self.write_metrics(history)
        return history

    def write_metrics(self, history: list[dict]) -> None:
        if self.dir is not None and self.main:
            _write_metrics(self.dir / METRICS_FILE, history)

    def save(self, step: int, params, opt_state, *, partial=None, interrupted=False,
             val_loss: float | None = None) -> None:
        """Checkpoint a step (no-op without run_dir or if that step is already saved).

        Args:
          step: global optimiser step.
          params, opt_state: the state after that step.
          partial: running sums of an epoch cut at this step (resume continues them).
          interrupted: saved because of Ctrl-C.
          val_loss: validation loss of these params, stored in meta and ranked for
            retention (None: not computed; the checkpoint is kept by recency only).
        """
        if self.mgr is None or step in self.mgr.all_steps():
            return
        meta = {"format": _FORMAT, "step": step, **self.data_meta, "partial": partial,
                "interrupted": interrupted, "val_loss": val_loss, "config": self.cfg.to_dict()}
        metrics = None if val_loss is None else {"val_loss": float(val_loss), "step": step}
        self.mgr.save(step, force=True, metrics=metrics, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def last_good(self) -> str:
        steps = _steps(self.ckpt_dir) if self.ckpt_dir is not None else []
        if not steps:
            return "no checkpoint was written yet"
        return f"last good checkpoint kept at {self.ckpt_dir / str(steps[-1])}"

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()
