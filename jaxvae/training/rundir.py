"""The files of a training run while it trains: config.json, metrics.jsonl, orbax saves.

Reading a finished run (`load_run`) and the checks before a run starts
(`prepare_run_dir`) are in jaxvae.training.checkpoint; `RunDir` is what `train` writes through.
"""

import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxvae.base.errors import RunError
from jaxvae.base.io import write_text
from jaxvae.training.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RUN_FORMAT,
    checkpoint_manager,
    checkpoint_steps,
    read_metrics,
    restore_step,
    write_metrics_file,
)
from jaxvae.training.config import TrainConfig


def _sync(name: str) -> None:
    if jax.process_count() > 1:
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
        self.mgr = checkpoint_manager(self.ckpt_dir, self.cfg.keep_checkpoints, create=True,
                                      validated=self.validated)
        steps = checkpoint_steps(self.ckpt_dir)
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
        params, opt_state, meta = restore_step(self.mgr, step, self.cfg, sharding, *abstract_state)
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
        history = read_metrics(self.dir / METRICS_FILE, step // steps_per_epoch, step)
        if rewrite:
            self.write_metrics(history)
        return history

    def write_metrics(self, history: list[dict]) -> None:
        if self.dir is not None and self.main:
            write_metrics_file(self.dir / METRICS_FILE, history)

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
        meta = {"format": RUN_FORMAT, "step": step, **self.data_meta, "partial": partial,
                "interrupted": interrupted, "val_loss": val_loss, "config": self.cfg.to_dict()}
        metrics = None if val_loss is None else {"val_loss": float(val_loss), "step": step}
        self.mgr.save(step, force=True, metrics=metrics, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))

    def last_good(self) -> str:
        steps = checkpoint_steps(self.ckpt_dir) if self.ckpt_dir is not None else []
        if not steps:
            return "no checkpoint was written yet"
        return f"last good checkpoint kept at {self.ckpt_dir / str(steps[-1])}"

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()
