"""The run directory of a training run: its config, its metrics and its orbax checkpoints.

Layout:
  config.json           the TrainConfig (written atomically)
  metrics.jsonl         one JSON line per finished epoch (rewritten atomically), plus a line
                        marked "partial" for an epoch cut by max_steps
  checkpoints/<step>/   orbax: params, opt_state, meta (JSON: format, step, partial epoch sums,
                        data fingerprints, validation loss, config) and orbax's own metrics
                        (the validation loss, which ranks the checkpoints)
  loss.png              the loss curve (jaxvae.training.loss_curve)

Retention: the last `keep_checkpoints` checkpoints, and the one with the lowest validation
loss (ties: the earliest), both by orbax preservation policies (LatestN, BestN). A
checkpoint without a validation loss (no validation, Ctrl-C inside an epoch) is ranked by
recency only.

The checks and reads are here (`check_run_dir`, `prepare_run_dir`, `load_run`,
`best_step`), the writes of a training run in jaxvae.training.rundir (`RunDir`); a restore checks
the stored shapes against the config's model, and an unreadable checkpoint is a RunError
that names it. `load_run` loads the best checkpoint by validation loss by default (the
latest one in a run without validation).
"""

import functools
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxvae.base.errors import ConfigError, OutputError, RunError
from jaxvae.base.io import write_text
from jaxvae.core.model import ConvVAE, init_params
from jaxvae.training.config import SCHEDULE_FIELDS, TrainConfig, model_from_config
from jaxvae.training.read_noise import read_or_fail

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
RUN_FORMAT = 1


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


def read_metrics(path: Path, upto_epoch: int, partial_step: int | None = None) -> list[dict]:
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


def write_metrics_file(path: Path, history: list[dict]) -> None:
    write_text(path, "".join(json.dumps(h) + "\n" for h in history), overwrite=True)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    # finished orbax steps are plain integer folder names; in-progress saves carry a suffix
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _rank(metrics) -> tuple:
    # BestN keeps the highest: the lowest val_loss, then the earliest step
    return -metrics["val_loss"], -metrics["step"]


def checkpoint_manager(ckpt_dir: Path, keep: int | None, *, create: bool,
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


def _check_shapes(path: Path, mgr, step, expected, cfg):
    stored = read_or_fail(lambda: mgr.item_metadata(step)["params"], path, "checkpoint metadata")
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


def restore_step(mgr, step: int, cfg: TrainConfig, sharding, params, opt_state=None):
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

    out = read_or_fail(lambda: mgr.restore(step, args=ocp.args.Composite(**items)), path,
                       "checkpoint", hint)
    meta = out["meta"]
    if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT or "step" not in meta:
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
    meta_only = ocp.args.Composite(meta=ocp.args.JsonRestore())
    out = read_or_fail(lambda: mgr.restore(step, args=meta_only), path, "checkpoint metadata")
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
    steps = checkpoint_steps(ckpt_dir)
    if not steps:
        raise RunError(f"{ckpt_dir}: no checkpoint found (the run stopped before its first "
                       f"checkpoint?)")
    return cfg, steps, checkpoint_manager(ckpt_dir, None, create=False)


def best_step(run_dir, which="best") -> tuple[int, float | None]:
    """The checkpoint `load_run(run_dir, which)` loads, without loading it.

    Args:
      run_dir: folder written by `jaxvae.training.trainer.train`.
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
      run_dir: folder written by `jaxvae.training.trainer.train`.
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
        params, _, _ = restore_step(mgr, step, cfg, sharding, abstract_params(model))
    finally:
        mgr.close()
    if with_info:
        return model, params, cfg, {"step": step, "val_loss": val_loss, "which": which}
    return model, params, cfg
