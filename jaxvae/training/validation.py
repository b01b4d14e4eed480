"""The validation of a training run: its loss and when to stop.

After every epoch, `train` (jaxvae.training.trainer) computes the negative beta-ELBO of the
validation
cases' slices, averaged over them, without augmentation, with z = mu + sigma * eps and eps
fixed for the whole run (`validation_eps`), so that the losses of different epochs compare
like with like. When to stop is a pure function of the config, the global step and
metrics.jsonl (`stop_reason`), so a resumed run stops where an uninterrupted one does.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxvae.core import losses
from jaxvae.core.model import ConvVAE
from jaxvae.data.slices import with_channels
from jaxvae.runtime import execution, parallel
from jaxvae.runtime.batching import batches
from jaxvae.training.config import TrainConfig, model_from_config


def validation_eps(seed: int, n: int, latent_dim: int) -> np.ndarray:
    """The fixed noise of the validation loss: z_i = mu_i + sigma_i * eps[i] at every epoch.

    Args:
      seed: the run's seed; the key is fold_in(key(seed), 2), never used by training.
      n: number of validation images.
      latent_dim: latent size l.

    Returns:
      (n, l) float32 numpy array of N(0, 1) draws, row i for validation image i.
    """
    key = jax.random.fold_in(jax.random.key(seed), 2)
    return np.asarray(jax.random.normal(key, (n, latent_dim), jnp.float32))


# --------------------------------------------------------------------------- validation


@functools.lru_cache(maxsize=32)
def make_val_step(model: ConvVAE, *, beta: float, mesh=None):
    """Build the jitted `val_step(params, x, eps)`: per-image losses, no augmentation.

    Args:
      model: the ConvVAE (as in `make_train_step`, its conv_impl is only how it runs).
      beta: KL weight.
      mesh: device mesh (the batch split on `data`, params replicated), or None.

    Returns:
      val_step(params, x (B, 64, 64) float32, eps (B, l) float32) -> (B, 3) float32:
        per image the loss, rec and kl of `losses.beta_elbo` at z = mu + sigma * eps.
    """

    def val_step(params, x, eps):
        x = with_channels(x)  # (N, H, W, C): sequences as channels
        x_hat, aux = model.apply({"params": params}, x, eps=eps)
        return jnp.stack(losses.beta_elbo(x, x_hat, aux["mu"], aux["log_sigma"], beta), axis=1)

    if mesh is None:
        return jax.jit(val_step)
    repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    return jax.jit(val_step, in_shardings=(repl, data, data), out_shardings=repl)


def val_step_for(cfg: TrainConfig, mesh=None, policy: execution.ExecutionPolicy | None = None):
    """`make_val_step` for a config, with the training conv form of the execution policy.

    Args:
      cfg: the run's TrainConfig (model, beta).
      mesh: device mesh, or None for plain jit on the default device.
      policy: execution policy (default: execution.current()).
    """
    policy = execution.current() if policy is None else policy
    return make_val_step(policy.training_model(model_from_config(cfg)), beta=float(cfg.beta),
                         mesh=mesh)


def validation_loss(val_step, params, images: np.ndarray, eps: np.ndarray, mesh,
                    batch_size: int) -> dict:
    """Mean negative beta-ELBO of validation images, in fixed-size padded batches.

    The last batch is padded by repeating the last image (score.batches); the padding is
    dropped before averaging, so the result does not depend on `batch_size` beyond float
    rounding, and is the same at every call with the same params.

    Args:
      val_step: from `make_val_step` / `val_step_for` (with the same mesh).
      params: model parameters (replicated on the mesh).
      images: (M, 64, 64) float32 validation slices, M >= 1; every process passes the same.
      eps: (M, l) noise, `validation_eps`.
      mesh: device mesh, or None for the default device.
      batch_size: images per compiled call (a multiple of the mesh size).

    Returns:
      {"val_loss", "val_rec", "val_kl"}: means over the M images (Python floats).
    """
    rows = slice(None) if mesh is None else parallel.process_rows(mesh, batch_size)
    parts = []
    for idx, n_real in batches(images.shape[0], batch_size):
        x, e = images[idx[rows]], eps[idx[rows]]
        if mesh is not None:
            x, e = (parallel.shard_batch(a, mesh, batch_size) for a in (x, e))
        parts.append(np.asarray(val_step(params, x, e))[:n_real])
    mean = np.concatenate(parts).astype(np.float64).mean(axis=0)
    return {"val_loss": float(mean[0]), "val_rec": float(mean[1]), "val_kl": float(mean[2])}


# --------------------------------------------------------------------------- stopping


def stop_reason(history: list[dict], cfg: TrainConfig, step: int,
                steps_per_epoch: int) -> str | None:
    """Why training stops at global step `step` after `history`, or None to go on.

    A pure function of its arguments, so a resumed run stops where an uninterrupted one
    does. Lines marked "partial" (an epoch cut by max_steps) do not count for patience.
    Patience counts optimiser steps, not epochs, so that a 400-slice and a 9,000-slice
    dataset follow the same plateau rule; the validation loss is measured at epoch ends,
    so the rule is checked there.

    Args:
      history: metrics.jsonl lines so far (a line without "step" is taken to end its epoch:
        epoch * steps_per_epoch).
      cfg: the run's config (epochs, patience, max_steps).
      step: global optimiser steps done.
      steps_per_epoch: optimiser steps per epoch.

    Returns:
      "patience": at least `cfg.patience` optimiser steps were done since the step of the
      lowest val_loss (the first of equal ones: a tie is no better); "epochs": all epochs
      are done (cfg.epochs > 0); "max_steps": `step` reached cfg.max_steps; None otherwise
      (checked in this order).
    """
    scored = [(h["val_loss"], h.get("step", h["epoch"] * steps_per_epoch)) for h in history
              if not h.get("partial") and h.get("val_loss") is not None]
    if cfg.patience and scored:
        best_step = scored[int(np.argmin([v for v, _ in scored]))][1]  # the first minimum
        if step - best_step >= cfg.patience:
            return "patience"
    if cfg.epochs and step >= cfg.epochs * steps_per_epoch:
        return "epochs"
    if cfg.max_steps and step >= cfg.max_steps:
        return "max_steps"
    return None


def convergence(history: list[dict], cfg: TrainConfig) -> str:
    """How a finished run ended, in words: converged by the plateau rule, or not.

    Args:
      history: metrics.jsonl lines (the last one carries "stop").
      cfg: the run's config (patience).

    Returns:
      e.g. "converged: no lower validation loss in the last 1000 steps" or "NOT converged:
      stopped by max_steps with the validation loss still falling (new best within the last
      1000 steps)".
    """
    s = summarize(history)
    if s["stop"] == "patience":
        return f"converged: no lower validation loss in the last {cfg.patience} steps"
    if s["best_val_loss"] is None:
        return f"no validation: stopped by {s['stop']}, convergence unknown"
    since = s["steps"] - s["best_step"]
    if not cfg.patience:
        return (f"stopped by {s['stop']} without a plateau rule (patience 0); the best "
                f"validation loss is {since} steps old")
    return (f"NOT converged: stopped by {s['stop']} with the validation loss still falling "
            f"(new best {since} steps before the end, patience {cfg.patience})")


def summarize(history: list[dict]) -> dict:
    """What a finished run did, for a one-line report.

    Args:
      history: the list `train` returns (or metrics.jsonl's lines).

    Returns:
      {"steps": optimiser steps done, "epoch": the last epoch line, "stop": why it stopped
       (None if unknown), "best_val_loss", "best_step": the lowest validation loss and its
       step, the earliest of equal ones (None without validation)}.
    """
    last = history[-1] if history else {}
    scored = [(h["val_loss"], h["step"]) for h in history if h.get("val_loss") is not None]
    best = min(scored) if scored else (None, None)
    return {"steps": last.get("step", 0), "epoch": last.get("epoch", 0),
            "stop": last.get("stop"), "best_val_loss": best[0], "best_step": best[1]}
