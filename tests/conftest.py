"""Shared test fixtures: a tiny trained run, and the real BraTS data in ../shared/data
(skipped where absent)."""

from pathlib import Path

import numpy as np
import pytest

from jaxvae.training.config import TrainConfig
from jaxvae.training.trainer import train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real BraTS scans, or a clean skip where this checkout has none."""
    if not (SHARED_DATA / "brats2018_flair").is_dir():
        pytest.skip(f"real BraTS data not found at {SHARED_DATA} (only present beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run directory of a tiny model trained for one epoch on noise (one per test module,
    so that a module may change its run without touching another's)."""
    run = tmp_path_factory.mktemp("run") / "r"
    images = np.random.default_rng(0).normal(size=(32, 64, 64)).astype(np.float32)
    train(TrainConfig(latent_dim=8, channels=(4, 4, 4, 4), epochs=1, batch_size=16,
                      data={"source": "test"}), images, run, progress=False)
    return run
