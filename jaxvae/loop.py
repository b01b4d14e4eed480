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

from jaxvae import parallel
from jaxvae.config import TrainConfig
from jaxvae.errors import ConfigError, DataError


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


def check_images(images, cfg: TrainConfig, n_devices: int) -> np.ndarray:
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


def check_val_images(val_images) -> np.ndarray | None:
    """The validation slices as float32, or None for none (None or 0 images)."""
    if val_images is None:
        return None
    if not isinstance(val_images, np.ndarray) or val_images.ndim != 3 or \
            val_images.shape[1:] != (64, 64):
        shape = getattr(val_images, "shape", None)
        raise DataError(f"validation images must be a (M, 64, 64) numpy array, got {shape}")
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
