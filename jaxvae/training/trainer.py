"""Training of the ConvVAE: the jitted train step and the training loop.

Follows docs/method.md §6 (Zhou, Deng & Wu; Zimmerer et al. reference code): Adam at 1e-4,
batch 64, negative beta-ELBO averaged over the batch, z sampled with the reparameterisation
trick, on-the-fly augmentation (jaxvae.core.augment). The step is the maths only; how it is
scheduled on the machine at hand (the convolution form, micro-batches) comes from the
execution policy (jaxvae.runtime.execution), and the run's files from jaxvae.checkpoint.

Randomness is a pure function of the seed and the position in training, never of how many
epochs ran in this process. With root = key(seed): init key fold_in(root, 0); step key
fold_in(fold_in(root, 1), global step), split inside the step by fold_in into 0 for the
augmentation (image i: fold_in(., i)) and 1 for z. The data order of epoch e is numpy's
default_rng((seed, e)). The last partial batch of an epoch is dropped (one compiled batch
shape; each epoch reshuffles, so every image is used). A resumed run therefore repeats the
uninterrupted one bit for bit (same machine, device count and execution policy):
checkpoints hold params, opt_state, the global step and the partial sums of an epoch cut by
Ctrl-C or max_steps.

Validation: after every epoch the negative beta-ELBO of the held-out slices, averaged over
them, without augmentation, with z = mu + sigma * eps and eps fixed for the whole run
(jaxvae.training.validation; key fold_in(root, 2), which training never uses, one row per image), so
the losses of different epochs compare like with like. An epoch with a new lowest
validation loss (strictly lower) is checkpointed, and that checkpoint is kept besides the
latest ones (jaxvae.training.checkpoint); `load_run` loads it by default.

When to stop is a pure function of the config, the global step and metrics.jsonl
(`stop_reason`), so a resumed run stops where the uninterrupted one does: after `epochs`;
once `patience` optimiser steps have passed since the best validation loss (the plateau
rule, checked at epoch ends); or after exactly `max_steps`
optimiser steps, inside an epoch if need be (that epoch's line is then marked "partial",
with the validation loss of the step reached; a resume with a larger cap continues the
epoch and replaces the line). A checkpoint is saved where training stops, the last line
says why ("stop"), and loss.png shows the train and validation loss against the step.
"""

import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxvae.base.errors import ConfigError, RunError
from jaxvae.core import losses
from jaxvae.core.augment import AugmentConfig, augment_images
from jaxvae.core.model import ConvVAE, init_params
from jaxvae.data.slices import with_channels
from jaxvae.runtime import execution, parallel
from jaxvae.training.checkpoint import prepare_run_dir
from jaxvae.training.config import TrainConfig, model_from_config
from jaxvae.training.epoch import (
    EpochSums,
    NonFinite,
    SigintFlag,
    check_images,
    check_val_images,
    fingerprint,
)
from jaxvae.training.loss_curve import LOSS_CURVE_FILE, write_loss_curve
from jaxvae.training.rundir import RunDir
from jaxvae.training.validation import (
    stop_reason,
    val_step_for,
    validation_eps,
    validation_loss,
)


def _root_keys(seed: int):
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)  # (init, step base)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Image order of epoch `epoch` (0-based): a function of (seed, epoch) only.

    Returns:
      (n,) int permutation; batch i of the epoch is perm[i*B:(i+1)*B], the last n % B
      images are dropped this epoch.
    """
    return np.random.default_rng((seed, epoch)).permutation(n)


def step_keys(base_key, first_step: int, n: int) -> np.ndarray:
    """Raw key data of the step keys fold_in(base_key, step), step = first_step .. + n - 1.

    Host arrays are what every process can turn into the same replicated key, and one call
    per epoch keeps key derivation out of the per-step dispatch.

    Args:
      base_key: typed PRNG key (in `train`: fold_in(key(seed), 1)).
      first_step: global index of the first step.
      n: number of steps.

    Returns:
      (n, 2) uint32 numpy array; row i is the key data of step first_step + i.
    """
    steps = jnp.arange(first_step, first_step + n, dtype=jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, steps)
    return np.asarray(jax.random.key_data(keys))


# --------------------------------------------------------------------------- train step


@functools.lru_cache(maxsize=32)
def make_train_step(model: ConvVAE, *, lr: float, beta: float,
                    augment: AugmentConfig | None = None, mesh=None, micro_batch: int = 0):
    """Build the jitted pure step `train_step(params, opt_state, batch, key)`.

    The loss is the model's own reparameterised forward pass, `model.apply(x, eps=eps)`,
    under `losses.beta_elbo`, averaged over the batch. eps ~ N(0, I) is drawn once per batch
    with fold_in(key, 1), so the step's result does not depend on `micro_batch`: the
    per-image losses are independent, and the gradient of their sum is summed piece by
    piece (up to float rounding).

    One compiled function per (model, lr, beta, augment, mesh, micro_batch), cached, so
    repeated calls and repeated training runs do not recompile. With a mesh, the batch is
    split on `data` and params / optimiser state are replicated.

    Args:
      model: the ConvVAE (its conv_impl is how the convolutions run, not what they compute).
      lr: Adam learning rate.
      beta: KL weight.
      augment: augmentation ranges, or None for none.
      mesh: device mesh (parallel.make_mesh), or None for plain jit.
      micro_batch: images per piece of the gradient, the pieces unrolled inside the one
        compiled step; 0 = the whole batch in one piece (execution.ExecutionPolicy says
        which suits a backend).

    Returns:
      train_step(params, opt_state, batch (B, S, S[, C]) float32, key (a PRNG key or its
        raw uint32 key data)) ->
        (params, opt_state, {"loss", "rec", "kl"}: batch means of the per-image values).
    """
    opt = optax.adam(lr)
    chunk = int(micro_batch)

    def sums(p, x, eps):
        x_hat, aux = model.apply({"params": p}, x, eps=eps)
        loss, rec, kl = losses.beta_elbo(x, x_hat, aux["mu"], aux["log_sigma"], beta)
        return jnp.sum(loss), jnp.stack([jnp.sum(loss), jnp.sum(rec), jnp.sum(kl)])

    def train_step(params, opt_state, batch, key):
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # raw uint32 key data, as fed by `train`
        x = with_channels(batch)
        if augment is not None:  # one channel: augmented as an (H, W) image, as before
            one = x.shape[-1] == 1
            x = augment_images(jax.random.fold_in(key, 0), x[..., 0] if one else x, augment)
            x = x[..., None] if one else x
        n = x.shape[0]
        eps = jax.random.normal(jax.random.fold_in(key, 1), (n, model.latent_dim), x.dtype)
        size = chunk if 0 < chunk < n else n
        grads, total = None, None
        for i in range(0, n, size):  # unrolled: one compiled step
            g, t = jax.grad(sums, has_aux=True)(params, x[i:i + size], eps[i:i + size])
            grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
            total = t if total is None else total + t
        grads = jax.tree_util.tree_map(lambda g: g / n, grads)  # gradient of the batch mean
        metrics = dict(zip(("loss", "rec", "kl"), total / n, strict=True))
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    if mesh is None:
        return jax.jit(train_step)
    repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(repl, repl, data, repl),
                   out_shardings=(repl, repl, repl))


def train_step_for(cfg: TrainConfig, mesh=None, policy: execution.ExecutionPolicy | None = None):
    """`make_train_step` for a config, scheduled by an execution policy.

    Args:
      cfg: the run's TrainConfig (model, lr, beta, augmentation).
      mesh: device mesh, or None for plain jit on the default device.
      policy: execution policy (default: execution.current()); its training conv form is
        used, and its micro_batch (scaled to the image size, `for_model`) on one device
        (a batch split over several devices is one piece per device).
    """
    model = model_from_config(cfg)
    policy = (execution.current() if policy is None else policy).for_model(model)
    if mesh is not None and mesh.size > 1:
        policy = policy.sharded()
    return make_train_step(policy.training_model(model), lr=float(cfg.lr),
                           beta=float(cfg.beta),
                           augment=cfg.augmentation if cfg.augment else None, mesh=mesh,
                           micro_batch=policy.micro_batch)


# --------------------------------------------------------------------------- state


# one compiled function: eager Flax init compiles every small op separately (seconds)
_init_params = jax.jit(init_params, static_argnums=0)


def init_state(cfg: TrainConfig):
    """Initial (params, opt_state) of a run, from the config's seed."""
    params = _init_params(model_from_config(cfg), _root_keys(cfg.seed)[0])
    return params, optax.adam(cfg.lr).init(params)


# --------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig | None, images: np.ndarray, run_dir, *, resume: bool = False,
          progress: bool = True, overwrite: bool = False, mesh=None,
          policy: execution.ExecutionPolicy | None = None, val_images: np.ndarray | None = None):
    """Train a ConvVAE on slices, with validation, checkpoints, exact resume and a NaN guard.

    Args:
      cfg: the run's TrainConfig; None with resume=True reads run_dir/config.json.
      images: (N, S, S) or (N, S, S, C) float32 pre-processed slices, N >= batch_size,
        S = cfg.image_size and C = cfg.in_channels (a 3-d array for C = 1). In a
        multi-process job every process passes the same array (mmap is fine: each
        process reads only the rows of its devices).
      run_dir: output folder (config.json, metrics.jsonl, checkpoints/, loss.png), or None
        to train in memory only.
      resume: continue from the latest checkpoint in run_dir (from scratch if there is
        none yet). Only config.SCHEDULE_FIELDS (epochs, checkpoint_every,
        keep_checkpoints, patience, max_steps) may differ from the stored config; the
        training and validation images must be the same.
      progress: show a tqdm bar (loss, images/s) on process 0.
      overwrite: replace the config, metrics and checkpoints of an existing run (other
        files in run_dir are left alone).
      mesh: device mesh (default: parallel.make_mesh(), all devices).
      policy: how the step runs on this machine (default: execution.current()); see
        `train_step_for`.
      val_images: (M, S, S[, C]) float32 slices of held-out cases (any M; None or M = 0: no
        validation). Every process passes the same array. Needed for cfg.patience > 0.

    Returns:
      (params of the final step as host numpy arrays, history: list of per-epoch dicts
       with epoch, step (global steps done), loss, rec, kl (means of the per-step batch
       means), seconds, images_per_s; with validation val_loss, val_rec, val_kl; an epoch
       cut by max_steps has "partial": True; the last line has "stop": "epochs" |
       "patience" | "max_steps". On resume it includes the epochs before the checkpoint).

    Raises:
      OutputError: run_dir is not empty and neither resume nor overwrite is set.
      RunError: non-finite training or validation loss (the last good checkpoint is
        kept), a stored checkpoint or config that cannot be resumed.
      DataError, ConfigError: invalid images or config (e.g. patience without validation).
      KeyboardInterrupt: after Ctrl-C (SIGINT), once a checkpoint of the current step is
        saved (single-process runs).
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    run_dir = None if run_dir is None else Path(run_dir).absolute()  # orbax: absolute
    restore = False
    if run_dir is not None:
        cfg, restore = prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    elif cfg is None:
        raise ConfigError("train needs a TrainConfig when run_dir is None")
    images = check_images(images, cfg, mesh.size)
    val_images = check_val_images(val_images, cfg)
    if cfg.patience and val_images is None:
        raise ConfigError(f"patience={cfg.patience} stops on the validation loss, but no "
                          f"validation images were given; pass val_images or set patience=0")
    n, bsz = images.shape[0], cfg.batch_size
    spe = n // bsz  # steps per epoch: the last partial batch is dropped
    limit = min(c for c in (cfg.epochs * spe, cfg.max_steps) if c)  # 0 = no cap
    run = RunDir(run_dir, cfg, {
        "n_images": n, "batch_size": bsz, "steps_per_epoch": spe,
        "fingerprint": fingerprint(images),
        "val_fingerprint": None if val_images is None else fingerprint(val_images,
                                                                         "validation")},
                 validated=val_images is not None)
    step_fn = train_step_for(cfg, mesh, policy)
    if val_images is not None:
        val_fn = val_step_for(cfg, mesh, policy)
        val_eps = validation_eps(cfg.seed, val_images.shape[0], cfg.latent_dim)
    base_key = _root_keys(cfg.seed)[1]
    rows = parallel.process_rows(mesh, bsz)
    bar = None
    try:
        latest = run.open(overwrite=overwrite, restore=restore)
        if latest is None:
            params, opt_state = parallel.replicate(init_state(cfg), mesh)
            start, partial = 0, None
        else:
            params, opt_state, meta = run.restore(latest, jax.eval_shape(lambda: init_state(cfg)),
                                                  parallel.replicated(mesh))
            start, partial = int(meta["step"]), meta.get("partial")
        # why a run stopped is recomputed: a resume may change epochs, patience, max_steps
        history = [{k: v for k, v in h.items() if k != "stop"}
                   for h in run.history(start, spe, rewrite=restore)]
        step = start
        reason = stop_reason(history, cfg, step, spe)
        if reason is None and history and history[-1].get("partial"):
            history.pop()  # the epoch cut by max_steps goes on; its full line replaces this

        if reason is None:
            t0 = time.perf_counter()
            step_fn.lower(params, opt_state,
                          jax.ShapeDtypeStruct((bsz, *images.shape[1:]), jnp.float32,
                                               sharding=parallel.batch_sharding(mesh)),
                          jax.ShapeDtypeStruct(jax.random.key_data(base_key).shape, jnp.uint32,
                                               sharding=parallel.replicated(mesh))).compile()
            if progress and run.main:
                bar = tqdm(total=limit * bsz, initial=start * bsz, unit="img", unit_scale=True,
                           dynamic_ncols=True,
                           desc=f"train (compiled in {time.perf_counter() - t0:.1f}s)")

        with SigintFlag(enabled=jax.process_count() == 1) as sigint:
            while reason is None:
                epoch = step // spe
                end = min((epoch + 1) * spe, limit)  # max_steps may cut the epoch
                perm = epoch_permutation(cfg.seed, epoch, n)
                keys = step_keys(base_key, epoch * spe, spe)
                acc = EpochSums(epoch, spe, bsz, partial, bar)
                partial = None
                for i in range(step - epoch * spe, end - epoch * spe):
                    batch = parallel.shard_batch(images[perm[i * bsz:(i + 1) * bsz][rows]],
                                                 mesh, bsz)
                    params, opt_state, metrics = step_fn(params, opt_state, batch,
                                                         parallel.replicate(keys[i], mesh))
                    acc.push(epoch * spe + i, metrics)
                    if sigint.set:
                        break
                sums = acc.finish()
                step = epoch * spe + sums["steps"]
                if step < end:  # stopped by Ctrl-C inside the epoch
                    run.save(step, params, opt_state, partial=sums, interrupted=True)
                    raise KeyboardInterrupt(f"training interrupted at global step {step}; "
                                            f"{run.last_good()}; resume with resume=True")
                cut = step < (epoch + 1) * spe
                record = acc.record(step)
                if cut:
                    record["partial"] = True
                if val_images is not None:
                    record.update(validation_loss(val_fn, params, val_images, val_eps, mesh,
                                                  bsz))
                    if not math.isfinite(record["val_loss"]):
                        raise NonFinite(f"non-finite validation loss ({record['val_loss']}) "
                                         f"after epoch {epoch + 1}, global step {step}")
                new_best = _is_new_best(history, record)
                history.append(record)
                reason = stop_reason(history, cfg, step, spe)
                if reason is not None:
                    record["stop"] = reason
                run.write_metrics(history)  # before the checkpoint: resume trims extra lines
                if reason is not None or new_best or sigint.set or \
                        (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    run.save(step, params, opt_state, partial=sums if cut else None,
                             val_loss=record.get("val_loss"))
                if sigint.set and reason is None:
                    raise KeyboardInterrupt(f"training interrupted after epoch {epoch + 1}; "
                                            f"{run.last_good()}; resume with resume=True")
        # stopped before any step of this call (a finished run resumed, epochs=0...)
        if history and history[-1].get("stop") != reason:
            history[-1]["stop"] = reason
            run.write_metrics(history)
        run.save(step, params, opt_state)  # no-op when saved above: still a loadable run
        if run.dir is not None and run.main:
            write_loss_curve(run.dir / LOSS_CURVE_FILE, history)
    except NonFinite as e:
        raise RunError(f"{run_dir or 'train'}: {e}; {run.last_good()}. Lower the learning "
                       f"rate or check the data") from None
    finally:
        if bar is not None:
            bar.close()
        run.close()
    return jax.device_get(params), history


def _is_new_best(history: list[dict], record: dict) -> bool:
    """Whether a finished epoch's val_loss is strictly below every earlier epoch's."""
    if record.get("val_loss") is None or record.get("partial"):
        return False
    earlier = [h["val_loss"] for h in history
               if not h.get("partial") and h.get("val_loss") is not None]
    return not earlier or record["val_loss"] < min(earlier)
