"""The training loop's helpers: input checks, the data fingerprint, the Ctrl-C flag, and the
running sums of an epoch (fetched one step behind the device). Used by jaxvae.train.
"""

import contextlib
import hashlib
import math
import signal
import threading
import time

import jax
import numpy as np

from jaxvae.base.errors import ConfigError, DataError
from jaxvae.core.model import IMAGE_SIZES
from jaxvae.runtime import parallel
from jaxvae.training.config import TrainConfig


def fingerprint(images: np.ndarray, what: str = "training") -> str:
    """Check the images are finite and hash them (resume refuses different data)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(images.shape).encode())
    chunk = 1024
    for start in range(0, images.shape[0], chunk):
        block = np.ascontiguousarray(images[start:start + chunk])
        bad = ~np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if bad.any():
            raise DataError(f"{what} image {start + int(np.argmax(bad))} contains NaN or Inf")
        h.update(memoryview(block).cast("B"))
    return h.hexdigest()


def _expected(cfg: TrainConfig, n: str) -> str:
    s, c = cfg.image_size, cfg.in_channels
    return f"({n}, {s}, {s})" if c == 1 else f"({n}, {s}, {s}, {c})"


def check_image_shape(images, cfg: TrainConfig, what: str = "training", n: str = "N"):
    """The slices as a numpy array shaped for cfg: (N, S, S) for one channel (a trailing
    channel axis of 1 is dropped, so both forms are one run's data), else (N, S, S, C).

    Raises:
      ConfigError: well-formed slices of another size or channel count than the config's
        image_size / in_channels (the run would train another model).
      DataError: anything else that is not (N, S, S[, C]) slices.
    """
    s, c = cfg.image_size, cfg.in_channels
    shape = getattr(images, "shape", None)
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    ok = isinstance(images, np.ndarray) and images.ndim in (3, 4)
    if ok and images.shape[1:] == ((s, s) if c == 1 else (s, s, c)):
        return images
    if ok and images.shape[1] == images.shape[2] and images.shape[1] in IMAGE_SIZES:
        got_c = 1 if images.ndim == 3 else images.shape[3]
        raise ConfigError(f"{what} images are {images.shape[1]}x{images.shape[2]} with {got_c} "
                          f"channel(s), but the run's config has image_size={s}, "
                          f"in_channels={c}: pre-process the data to {s}x{s} with {c} "
                          f"sequence(s), or set image_size={images.shape[1]}, "
                          f"in_channels={got_c}")
    raise DataError(f"{what} images must be a {_expected(cfg, n)} numpy array, got {shape}")


def check_images(images, cfg: TrainConfig, n_devices: int) -> np.ndarray:
    """Training slices as float32, shaped by `check_image_shape`; at least one batch."""
    images = check_image_shape(images, cfg)
    if images.dtype != np.float32:
        images = images.astype(np.float32)
    if images.shape[0] < cfg.batch_size:
        raise ConfigError(f"{images.shape[0]} training images are fewer than one batch "
                          f"(batch_size={cfg.batch_size})")
    parallel.check_batch_size(cfg.batch_size, n_devices)
    return images


def check_val_images(val_images, cfg: TrainConfig | None = None) -> np.ndarray | None:
    """The validation slices as float32, or None for none (None or 0 images); shaped as
    `check_image_shape` (cfg None: the default 64x64 one-channel config)."""
    if val_images is None:
        return None
    val_images = check_image_shape(val_images, cfg or TrainConfig(), "validation", "M")
    if val_images.shape[0] == 0:
        return None
    return val_images.astype(np.float32, copy=False)


class SigintFlag(contextlib.AbstractContextManager):
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


class NonFinite(Exception):
    pass


class EpochSums:
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
            raise NonFinite(f"non-finite loss ({vals}) at epoch {self.epoch + 1} (batch "
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
