"""Helpers of the training tests: a tiny config, random images, run-directory readers."""

import json
from pathlib import Path

import jax
import numpy as np
import scipy.ndimage as ndi

from jaxvae.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
# one tiny model and optimiser shared by most tests: the compiled step is cached across them
TINY = dict(latent_dim=8, channels=(4, 4, 4, 4), batch_size=16, lr=1e-3)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def images(n=64, seed=0) -> np.ndarray:
    # smooth blobs (not white noise) so that a VAE can actually learn something
    rng = np.random.default_rng(seed)
    x = ndi.gaussian_filter(rng.normal(size=(n, 64, 64)), sigma=(0, 4, 4))
    return (x / x.std()).astype(np.float32)


def leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb, strict=True))


def ckpt_steps(run_dir) -> list[int]:
    d = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def metric_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(line: dict) -> dict:
    """A metrics line without its wall-clock fields (they differ from run to run)."""
    return {k: v for k, v in line.items() if k not in ("seconds", "images_per_s")}


