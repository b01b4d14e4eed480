"""Training of the ConvVAE: one jitted train step, on-the-fly augmentation, run directories.

Follows REFERENCE.md §6 (Zhou, Deng & Wu; Zimmerer et al. reference code): Adam at 1e-4,
batch 64, negative beta-ELBO averaged over the batch, z sampled with the reparameterisation
trick, augmentation by rotation (±0.1 rad), scaling (0.9-1.2), multiplicative brightness
(0.95-1.1) and Gaussian noise, plus a left-right mirror (the brain is roughly symmetric).

Randomness is a pure function of the seed and the position in training, never of how many
epochs ran in this process. With root = key(seed): init key fold_in(root, 0); step key
fold_in(fold_in(root, 1), global step), split inside the step by fold_in into 0 for the
augmentation (image i: fold_in(., i)) and 1 for z. The data order of epoch e is numpy's
default_rng((seed, e)). The last partial batch of an epoch is dropped (one compiled batch
shape; each epoch reshuffles, so every image is used). A resumed run therefore repeats the
uninterrupted one bit for bit (same machine and device count): checkpoints hold params,
opt_state, the global step and the partial sums of an epoch cut by Ctrl-C.

Run directory:
  config.json           the TrainConfig (written atomically)
  metrics.jsonl         one JSON line per finished epoch (rewritten atomically)
  checkpoints/<step>/   orbax: params, opt_state, meta (JSON: epoch, step, partial epoch sums,
                        data fingerprint, config); the last `keep_checkpoints` are kept
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.scipy.ndimage import map_coordinates

from jaxvae import losses, parallel
from jaxvae.errors import ConfigError, DataError, OutputError, RunError
from jaxvae.io import write_text
from jaxvae.model import ConvVAE, decode, encode, init_params
from jaxvae.predictors import default_chunk_size

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
# Fields a resumed run may change: they set how long to train and what to keep, not what
# the steps compute.
SCHEDULE_FIELDS = ("epochs", "checkpoint_every", "keep_checkpoints")
_FORMAT = 1


# --------------------------------------------------------------------------- config


def _pair(name, value):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"augmentation {name} must be a (low, high) pair, "
                          f"got {value!r}") from None
    if not lo <= hi:
        raise ConfigError(f"augmentation {name} range must have low <= high, got {value!r}")
    return lo, hi


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the on-the-fly augmentation, each drawn uniformly per image.

    Attributes:
      rotation: maximum |angle| in radians (angle ~ U(-rotation, rotation)).
      scale: (low, high) zoom factor; > 1 enlarges the image.
      brightness: (low, high) multiplicative intensity factor.
      contrast: (low, high) factor on the deviation from the image mean (off by default:
        the reference code changes brightness only).
      noise_std: standard deviation of the additive Gaussian noise (z-score units).
      mirror_prob: probability of a left-right mirror (last axis).
    """

    rotation: float = 0.1
    scale: tuple[float, float] = (0.9, 1.2)
    brightness: tuple[float, float] = (0.95, 1.1)
    contrast: tuple[float, float] = (1.0, 1.0)
    noise_std: float = 0.05
    mirror_prob: float = 0.5

    def __post_init__(self):
        for name in ("scale", "brightness", "contrast"):
            object.__setattr__(self, name, _pair(name, getattr(self, name)))
        for name in ("rotation", "noise_std", "mirror_prob"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.rotation < 0 or self.noise_std < 0:
            raise ConfigError("augmentation rotation and noise_std must be >= 0")
        if self.scale[0] <= 0:
            raise ConfigError(f"augmentation scale must be > 0, got {self.scale}")
        if not 0 <= self.mirror_prob <= 1:
            raise ConfigError(f"augmentation mirror_prob must be in [0, 1], got {self.mirror_prob}")

    @classmethod
    def neutral(cls) -> "AugmentConfig":
        """Ranges that leave every image unchanged."""
        return cls(rotation=0.0, scale=(1.0, 1.0), brightness=(1.0, 1.0), contrast=(1.0, 1.0),
                   noise_std=0.0, mirror_prob=0.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved as config.json in the run directory.

    Attributes:
      latent_dim: latent size l (paper: 32, 64, 256).
      beta: KL weight of the beta-VAE loss.
      lr: Adam learning rate.
      batch_size: global batch size (a multiple of the device count).
      epochs: total number of epochs of the run (a resumed run trains up to this).
      seed: seeds initialisation, data order, augmentation and z samples.
      checkpoint_every: save a checkpoint every this many epochs (and at the end).
      keep_checkpoints: number of most recent checkpoints kept.
      augment: apply `augmentation` on the fly.
      augmentation: the augmentation ranges.
      channels: encoder channels of the ConvVAE.
      data: free-form JSON description of the training data (source, modality, fold, ...).
    """

    latent_dim: int = 256
    beta: float = 1.0
    lr: float = 1e-4
    batch_size: int = 64
    epochs: int = 500
    seed: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    augment: bool = True
    augmentation: AugmentConfig = AugmentConfig()
    channels: tuple[int, ...] = (16, 32, 64, 256)
    data: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        aug = self.augmentation
        if isinstance(aug, dict):
            aug = _from_dict(AugmentConfig, aug, "augmentation")
        if not isinstance(aug, AugmentConfig):
            raise ConfigError(f"augmentation must be an AugmentConfig, got {type(aug).__name__}")
        object.__setattr__(self, "augmentation", aug)
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for name in ("latent_dim", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0 or self.beta < 0 or not self.lr > 0:
            raise ConfigError(f"need epochs >= 0, beta >= 0, lr > 0 (got epochs={self.epochs}, "
                              f"beta={self.beta}, lr={self.lr})")
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise ConfigError(f"channels must be 4 positive ints, got {self.channels}")
        try:
            json.dumps(self.data)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data description must be JSON-serialisable ({e})") from None

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Inverse of `to_dict`; unknown keys raise ConfigError."""
        return _from_dict(cls, d, "TrainConfig")


def _from_dict(cls, d, what):
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown {what} field(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


def model_from_config(cfg: TrainConfig) -> ConvVAE:
    """The ConvVAE a config describes."""
    return ConvVAE(latent_dim=int(cfg.latent_dim), channels=tuple(cfg.channels))


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


# --------------------------------------------------------------------------- augmentation


def affine_resample(image, angle, scale, flip):
    """Rotate, zoom and optionally mirror an image about its centre (bilinear, zero outside).

    Output pixel p samples the input at c + A^-1 (p - c), A = mirror . scale . rotation.

    Args:
      image: (H, W) float image.
      angle: rotation in radians (scalar).
      scale: zoom factor (scalar, > 1 enlarges).
      flip: bool scalar, mirror the last axis.

    Returns:
      (H, W) image, same dtype.
    """
    h, w = image.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=image.dtype), jnp.arange(w, dtype=image.dtype),
                          indexing="ij")
    dy, dx = yy - cy, xx - cx
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    sy = (cos * dy + sin * dx) / scale
    sx = (cos * dx - sin * dy) / scale
    sx = jnp.where(flip, -sx, sx)
    return map_coordinates(image, [sy + cy, sx + cx], order=1, mode="constant", cval=0.0)


def augment_image(key, image, aug: AugmentConfig):
    """One random augmentation of one (H, W) image; ops whose range is neutral are skipped.

    Geometry (rotation, scale, mirror) is one bilinear resampling; then brightness,
    contrast about the image mean, and additive Gaussian noise.
    """
    def k(i):
        return jax.random.fold_in(key, i)

    def uniform(i, lo, hi):
        return jax.random.uniform(k(i), (), image.dtype, lo, hi)

    x = image
    if aug.rotation > 0 or aug.scale != (1.0, 1.0) or aug.mirror_prob > 0:
        angle = uniform(0, -aug.rotation, aug.rotation)
        scale = uniform(1, *aug.scale)
        flip = jax.random.uniform(k(2), ()) < aug.mirror_prob
        x = affine_resample(x, angle, scale, flip)
    if aug.brightness != (1.0, 1.0):
        x = x * uniform(3, *aug.brightness)
    if aug.contrast != (1.0, 1.0):
        m = jnp.mean(x)
        x = (x - m) * uniform(4, *aug.contrast) + m
    if aug.noise_std > 0:
        x = x + aug.noise_std * jax.random.normal(k(5), x.shape, x.dtype)
    return x


def _augment_batch(key, images, aug):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(images.shape[0]))
    return jax.vmap(augment_image, in_axes=(0, 0, None))(keys, images, aug)


augment_batch = jax.jit(_augment_batch, static_argnames="aug")
augment_batch.__doc__ = """Augment a batch, image i with key fold_in(key, i) (jitted, vmapped).

Args:
  key: PRNG key.
  images: (N, H, W) float images.
  aug: AugmentConfig (static).

Returns:
  (N, H, W) augmented images, same dtype.
"""


# --------------------------------------------------------------------------- train step


# Images per micro-batch on CPU. The activations of a small micro-batch stay in cache: measured
# on a 2-core EPYC (`python -m benchmarks.variants --parts chunks`), batch 256 trains at 380
# images/s in one piece and 627 / 687 / 676 images/s in micro-batches of 64 / 32 / 16.
TRAIN_CPU_CHUNK = 32


@functools.lru_cache(maxsize=32)
def make_train_step(model: ConvVAE, *, lr: float, beta: float,
                    augment: AugmentConfig | None = None, mesh=None,
                    micro_batch: int | None = None):
    """Build the jitted pure step `train_step(params, opt_state, batch, key)`.

    One compiled function per (model, lr, beta, augment, mesh, micro_batch), cached, so
    repeated calls and repeated training runs do not recompile. With a mesh, the batch is
    split on `data` and params / optimiser state are replicated.

    Args:
      model: the ConvVAE.
      lr: Adam learning rate.
      beta: KL weight.
      augment: augmentation ranges, or None for none.
      mesh: device mesh (parallel.make_mesh), or None for plain jit.
      micro_batch: images per micro-batch of the gradient (the same step, summed in pieces);
        None = TRAIN_CPU_CHUNK on CPU without a mesh, else the whole batch; 0 = whole batch.

    Returns:
      train_step(params, opt_state, batch (B, 64, 64[, 1]) float32, key (a PRNG key or its
        raw uint32 key data)) ->
        (params, opt_state, {"loss", "rec", "kl"}: batch means of the per-image values).
    """
    opt = optax.adam(lr)
    # CPU: the gradient is summed over micro-batches (unrolled in the one compiled step); a
    # sharded batch is one call, as are accelerators
    if micro_batch is not None:
        chunk = int(micro_batch)
    else:
        chunk = default_chunk_size(TRAIN_CPU_CHUNK) if mesh is None else 0

    def sums(p, x, eps):
        # as model.apply(x, key): z = mu + sigma * eps with eps ~ N(0, 1) of shape mu.shape
        mu, log_sigma = encode(model, p, x)
        x_hat = decode(model, p, mu + jnp.exp(log_sigma) * eps)
        loss, rec, kl = losses.beta_elbo(x, x_hat, mu, log_sigma, beta)
        return jnp.sum(loss), jnp.stack([jnp.sum(loss), jnp.sum(rec), jnp.sum(kl)])

    def train_step(params, opt_state, batch, key):
        if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)  # raw uint32 key data, as fed by `train`
        x = batch[..., None] if batch.ndim == 3 else batch
        if augment is not None:
            x = _augment_batch(jax.random.fold_in(key, 0), x[..., 0], augment)[..., None]
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


def train_step_for(cfg: TrainConfig, mesh=None):
    """`make_train_step` with the model, lr, beta and augmentation of a config."""
    return make_train_step(model_from_config(cfg), lr=float(cfg.lr), beta=float(cfg.beta),
                           augment=cfg.augmentation if cfg.augment else None, mesh=mesh)


# one compiled function: eager Flax init compiles every small op separately (seconds)
_init_params = jax.jit(init_params, static_argnums=0)


def init_state(cfg: TrainConfig):
    """Initial (params, opt_state) of a run, from the config's seed."""
    params = _init_params(model_from_config(cfg), _root_keys(cfg.seed)[0])
    return params, optax.adam(cfg.lr).init(params)


def _abstract_state(cfg: TrainConfig):
    return jax.eval_shape(lambda: init_state(cfg))


# --------------------------------------------------------------------------- run directory


def _read_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise RunError(f"{path}: missing; {run_dir} is not a jaxvae run directory")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, ConfigError) as e:
        raise RunError(f"{path}: not a valid training config ({e})") from None


def _manager(ckpt_dir: Path, keep: int | None, *, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        create=create, enable_async_checkpointing=False,  # a checkpoint is on disk on return
        cleanup_tmp_directories=create,  # half-written saves of a killed run
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep))
    # handlers named up front so that metadata reads work before any save/restore call
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(ckpt_dir, item_handlers=handlers, options=options)


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)


class _FailedReadTasks(logging.Filter):
    """Drops asyncio's reports of unretrieved tensorstore read errors; keeps everything else."""

    def filter(self, record):
        msg = record.getMessage()
        return not (msg.startswith("Task exception was never retrieved") and "tensorstore" in msg)


def _drop_closed_loop_reports() -> None:
    """Silence the noise of a failed checkpoint read (once per process).

    After one read fails, orbax closes its asyncio loop while tensorstore's other reads are
    still running; each then reports RuntimeError('Event loop is closed') as an unraisable
    traceback on stderr, before, after and interleaved with the RunError. Nothing awaits
    those reads, so these reports, and only these, are dropped.
    """
    previous = sys.unraisablehook
    if getattr(previous, "jaxvae_drops_closed_loop", False):
        return
    # the reads that failed too but were not the one raised are logged by asyncio when their
    # tasks are collected ("Task exception was never retrieved", tensorstore's error inside)
    logging.getLogger("asyncio").addFilter(_FailedReadTasks())

    def hook(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            previous(unraisable)

    hook.jaxvae_drops_closed_loop = True
    sys.unraisablehook = hook


def _check_shapes(path: Path, mgr, step, expected, cfg):
    try:
        stored = mgr.item_metadata(step)["params"]
    except Exception as e:  # orbax raises many types for unreadable metadata
        msg = str(e).splitlines()[0] if str(e) else ""
        raise RunError(f"{path}: cannot read checkpoint metadata ({type(e).__name__}: "
                       f"{msg[:300]}); it is truncated or corrupt") from None
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


def _restore(mgr, step: int, cfg: TrainConfig, sharding, *, with_opt: bool):
    """Restore (params, opt_state or None, meta) of one checkpoint step, or raise RunError."""
    path = Path(mgr.directory) / str(step)
    _drop_closed_loop_reports()  # before reading: some reports come while the read fails
    params0, opt0 = _abstract_state(cfg)
    _check_shapes(path, mgr, step, params0, cfg)
    items = {"params": ocp.args.StandardRestore(_abstract(params0, sharding)),
             "meta": ocp.args.JsonRestore()}
    if with_opt:
        items["opt_state"] = ocp.args.StandardRestore(_abstract(opt0, sharding))
    try:
        out = mgr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # tensorstore / orbax / OS errors: all mean "unreadable"
        older = [s for s in mgr.all_steps() if s < step]
        hint = (f"; delete it to fall back to the checkpoint of step {max(older)}" if older
                else "")
        msg = str(e).splitlines()[0] if str(e) else ""
        raise RunError(f"{path}: cannot read checkpoint ({type(e).__name__}: {msg[:300]}); it "
                       f"is truncated or corrupt{hint}") from None
    meta = out["meta"]
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or "step" not in meta:
        raise RunError(f"{path}: checkpoint has no valid jaxvae metadata")
    stored = meta.get("config", {})
    for name in ("latent_dim", "channels"):
        if name in stored and stored[name] != cfg.to_dict()[name]:
            raise RunError(f"{path}: checkpoint was written with {name}={stored[name]}, "
                           f"config.json says {cfg.to_dict()[name]}")
    return out["params"], out.get("opt_state") if with_opt else None, meta


def load_run(run_dir):
    """Load the model and latest checkpointed parameters of a run directory.

    Args:
      run_dir: folder written by `train`.

    Returns:
      (model ConvVAE, params pytree on the default device, cfg TrainConfig).

    Raises:
      RunError: the folder, config.json or a checkpoint is missing, unreadable, truncated,
        or of a different model than config.json describes.
    """
    run_dir = Path(run_dir).absolute()  # orbax needs absolute paths
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    cfg = _read_config(run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    steps = _steps(ckpt_dir)
    if not steps:
        raise RunError(f"{ckpt_dir}: no checkpoint found (the run stopped before its first "
                       f"checkpoint?)")
    mgr = _manager(ckpt_dir, None, create=False)
    try:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        params, _, _ = _restore(mgr, max(steps), cfg, sharding, with_opt=False)
    finally:
        mgr.close()
    return model_from_config(cfg), params, cfg


def _steps(ckpt_dir: Path) -> list[int]:
    # finished orbax steps are plain integer folder names; in-progress saves carry a suffix
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _read_metrics(path: Path, upto_epoch: int) -> list[dict]:
    """Epoch lines 1..upto_epoch of metrics.jsonl (later or broken lines are dropped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int) and \
                rec["epoch"] <= upto_epoch and rec["epoch"] == len(out) + 1:
            out.append(rec)
    return out


def _write_metrics(path: Path, history: list[dict]) -> None:
    write_text(path, "".join(json.dumps(h) + "\n" for h in history), overwrite=True)


def _fingerprint(images: np.ndarray) -> str:
    """Check the images are finite and hash them (resume refuses different data)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(images.shape).encode())
    chunk = 1024
    for start in range(0, images.shape[0], chunk):
        block = np.ascontiguousarray(images[start:start + chunk])
        bad = ~np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if bad.any():
            raise DataError(f"training image {start + int(np.argmax(bad))} contains NaN or Inf")
        h.update(memoryview(block).cast("B"))
    return h.hexdigest()


def _check_images(images, cfg: TrainConfig, n_devices: int) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 3 or images.shape[1:] != (64, 64):
        shape = getattr(images, "shape", None)
        raise DataError(f"training images must be a (N, 64, 64) numpy array, got {shape}")
    if images.dtype != np.float32:
        images = images.astype(np.float32)
    if images.shape[0] < cfg.batch_size:
        raise ConfigError(f"{images.shape[0]} training images are fewer than one batch "
                          f"(batch_size={cfg.batch_size})")
    parallel.check_batch_size(cfg.batch_size, n_devices)
    return images


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


def _prepare_run_dir(run_dir: Path, cfg, *, resume: bool, overwrite: bool):
    """Validate the run dir; return (cfg to use, whether to restore). Writes nothing."""
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


class _SigintFlag(contextlib.AbstractContextManager):
    """Turn the first Ctrl-C into a flag checked between steps; a second one interrupts."""

    def __init__(self, enabled: bool):
        self.set = False
        self._prev = None
        self._enabled = enabled and threading.current_thread() is threading.main_thread()

    def _handler(self, signum, frame):
        self.set = True
        signal.signal(signal.SIGINT, self._prev or signal.default_int_handler)

    def __enter__(self):
        if self._enabled:
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._enabled and self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False


class _NonFinite(Exception):
    pass


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class _Run:
    """The files of a training run (or nothing, for run_dir=None).

    Every process opens it and joins the orbax saves; only process 0 writes config.json
    and metrics.jsonl.
    """

    def __init__(self, run_dir: Path | None, cfg: TrainConfig, data_meta: dict):
        self.dir, self.cfg, self.data_meta = run_dir, cfg, data_meta
        self.main = jax.process_index() == 0
        self.ckpt_dir = None if run_dir is None else run_dir / CHECKPOINT_DIR
        self.mgr = None

    def open(self, *, overwrite: bool, restore: bool, sharding):
        """Write config.json; return (params, opt_state, meta) of the latest checkpoint or None."""
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
        self.mgr = _manager(self.ckpt_dir, self.cfg.keep_checkpoints, create=True)
        steps = _steps(self.ckpt_dir)
        if not (restore and steps):
            return None
        params, opt_state, meta = _restore(self.mgr, steps[-1], self.cfg, sharding,
                                           with_opt=True)
        if any(meta.get(k) != v for k, v in self.data_meta.items()):
            raise RunError(f"{self.ckpt_dir / str(steps[-1])}: the checkpoint was trained on "
                           f"other data ({meta.get('n_images')} images, fingerprint "
                           f"{meta.get('fingerprint')}, batch {meta.get('batch_size')}); "
                           f"resume needs the same images and batch size")
        return params, opt_state, meta

    def history(self, epochs_done: int, *, rewrite: bool) -> list[dict]:
        """metrics.jsonl up to the checkpointed epoch; rewrite drops the lines after it."""
        if self.dir is None:
            return []
        history = _read_metrics(self.dir / METRICS_FILE, epochs_done)
        if rewrite:
            self.write_metrics(history)
        return history

    def write_metrics(self, history: list[dict]) -> None:
        if self.dir is not None and self.main:
            _write_metrics(self.dir / METRICS_FILE, history)

    def save(self, step: int, params, opt_state, *, partial=None, interrupted=False) -> None:
        """Checkpoint a step (no-op without run_dir or if that step is already saved)."""
        if self.mgr is None or step in self.mgr.all_steps():
            return
        meta = {"format": _FORMAT, "step": step, **self.data_meta, "partial": partial,
                "interrupted": interrupted, "config": self.cfg.to_dict()}
        self.mgr.save(step, force=True, args=ocp.args.Composite(
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


class _Epoch:
    """Running sums of one epoch's step metrics, fetched one step behind the device.

    Reading step k's metrics after dispatching step k+1 keeps the device busy while the
    host checks them (NaN guard) and updates the progress bar.
    """

    def __init__(self, epoch: int, spe: int, batch_size: int, partial: dict | None, bar):
        self.epoch, self.spe, self.batch_size, self.bar = epoch, spe, batch_size, bar
        self.sums = dict(partial or {"loss": 0.0, "rec": 0.0, "kl": 0.0, "steps": 0,
                                     "seconds": 0.0})
        self.pending = None
        self.t0 = time.perf_counter()

    def push(self, step: int, metrics) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics = self.pending
        self.pending = None
        vals = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in vals.values()):
            raise _NonFinite(f"non-finite loss ({vals}) at epoch {self.epoch + 1} (batch "
                             f"{step - self.epoch * self.spe + 1} of {self.spe}), global step "
                             f"{step}")
        for k, v in vals.items():
            self.sums[k] += v
        self.sums["steps"] += 1
        if self.bar is not None:
            self.bar.set_postfix(epoch=self.epoch + 1, loss=f"{vals['loss']:.1f}", refresh=False)
            self.bar.update(self.batch_size)

    def finish(self) -> dict:
        """Flush, add this session's time; return the sums (a checkpoint's `partial`)."""
        self.flush()
        self.sums["seconds"] += time.perf_counter() - self.t0
        self.t0 = time.perf_counter()
        return dict(self.sums)

    def record(self, step: int) -> dict:
        """The metrics.jsonl line of the finished epoch."""
        s, k = self.sums, self.sums["steps"]
        return {"epoch": self.epoch + 1, "step": step,
                **{m: s[m] / k for m in ("loss", "rec", "kl")},
                "seconds": round(s["seconds"], 4),
                "images_per_s": round(k * self.batch_size / max(s["seconds"], 1e-9), 1)}


def train(cfg: TrainConfig | None, images: np.ndarray, run_dir, *, resume: bool = False,
          progress: bool = True, overwrite: bool = False, mesh=None):
    """Train a ConvVAE on slices, with checkpoints, exact resume and a NaN guard.

    Args:
      cfg: the run's TrainConfig; None with resume=True reads run_dir/config.json.
      images: (N, 64, 64) float32 pre-processed slices, N >= batch_size. In a
        multi-process job every process passes the same array (mmap is fine: each
        process reads only the rows of its devices).
      run_dir: output folder (config.json, metrics.jsonl, checkpoints/), or None to train
        in memory only.
      resume: continue from the latest checkpoint in run_dir (from scratch if there is
        none yet). Only epochs / checkpoint_every / keep_checkpoints may differ from the
        stored config; the data must be the same.
      progress: show a tqdm bar (loss, images/s) on process 0.
      overwrite: replace the config, metrics and checkpoints of an existing run (other
        files in run_dir are left alone).
      mesh: device mesh (default: parallel.make_mesh(), all devices).

    Returns:
      (params of the final step as host numpy arrays, history: list of per-epoch dicts
       with epoch, step, loss, rec, kl (means of the per-step batch means), seconds,
       images_per_s; on resume it includes the epochs before the checkpoint).

    Raises:
      OutputError: run_dir is not empty and neither resume nor overwrite is set.
      RunError: non-finite loss (the last good checkpoint is kept), a stored checkpoint
        or config that cannot be resumed.
      DataError, ConfigError: invalid images or config.
      KeyboardInterrupt: after Ctrl-C (SIGINT), once a checkpoint of the current step is
        saved (single-process runs).
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    run_dir = None if run_dir is None else Path(run_dir).absolute()  # orbax: absolute
    restore = False
    if run_dir is not None:
        cfg, restore = _prepare_run_dir(run_dir, cfg, resume=resume, overwrite=overwrite)
    elif cfg is None:
        raise ConfigError("train needs a TrainConfig when run_dir is None")
    images = _check_images(images, cfg, mesh.size)
    n, bsz = images.shape[0], cfg.batch_size
    spe = n // bsz  # steps per epoch: the last partial batch is dropped
    total = cfg.epochs * spe
    run = _Run(run_dir, cfg, {"n_images": n, "batch_size": bsz, "steps_per_epoch": spe,
                              "fingerprint": _fingerprint(images)})
    step_fn = train_step_for(cfg, mesh)
    base_key = _root_keys(cfg.seed)[1]
    rows = parallel.process_rows(mesh, bsz)
    bar = None
    try:
        restored = run.open(overwrite=overwrite, restore=restore,
                            sharding=parallel.replicated(mesh))
        if restored is None:
            params, opt_state = parallel.replicate(init_state(cfg), mesh)
            start, partial = 0, None
        else:
            params, opt_state, meta = restored
            start, partial = int(meta["step"]), meta.get("partial")
        history = run.history(start // spe, rewrite=restore)
        if start >= total:
            run.save(start, params, opt_state)  # e.g. epochs=0: still leave a loadable run
            return jax.device_get(params), history

        t0 = time.perf_counter()
        step_fn.lower(params, opt_state,
                      jax.ShapeDtypeStruct((bsz, 64, 64), jnp.float32,
                                           sharding=parallel.batch_sharding(mesh)),
                      jax.ShapeDtypeStruct(jax.random.key_data(base_key).shape, jnp.uint32,
                                           sharding=parallel.replicated(mesh))).compile()
        if progress and run.main:
            from tqdm.auto import tqdm
            bar = tqdm(total=total * bsz, initial=start * bsz, unit="img", unit_scale=True,
                       dynamic_ncols=True,
                       desc=f"train (compiled in {time.perf_counter() - t0:.1f}s)")

        with _SigintFlag(enabled=jax.process_count() == 1) as sigint:
            for epoch in range(start // spe, cfg.epochs):
                perm = epoch_permutation(cfg.seed, epoch, n)
                keys = step_keys(base_key, epoch * spe, spe)
                acc = _Epoch(epoch, spe, bsz, partial, bar)
                partial = None
                for i in range(max(start - epoch * spe, 0), spe):
                    batch = parallel.shard_batch(images[perm[i * bsz:(i + 1) * bsz][rows]],
                                                 mesh, bsz)
                    params, opt_state, metrics = step_fn(params, opt_state, batch,
                                                         parallel.replicate(keys[i], mesh))
                    acc.push(epoch * spe + i, metrics)
                    if sigint.set:
                        break
                sums = acc.finish()
                done = epoch * spe + sums["steps"]
                if done < (epoch + 1) * spe:  # stopped by Ctrl-C inside the epoch
                    run.save(done, params, opt_state, partial=sums, interrupted=True)
                    raise KeyboardInterrupt(f"training interrupted at global step {done}; "
                                            f"{run.last_good()}; resume with resume=True")
                history.append(acc.record(done))
                run.write_metrics(history)  # before the checkpoint: resume trims extra lines
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs \
                        or sigint.set:
                    run.save(done, params, opt_state)
                if sigint.set:
                    raise KeyboardInterrupt(f"training interrupted after epoch {epoch + 1}; "
                                            f"{run.last_good()}; resume with resume=True")
    except _NonFinite as e:
        raise RunError(f"{run_dir or 'train'}: {e}; {run.last_good()}. Lower the learning "
                       f"rate or check the data") from None
    finally:
        if bar is not None:
            bar.close()
        run.close()
    return jax.device_get(params), history
