"""Training on a split of cases: the one way the CLI, the demo and the experiment scripts train.

The run trains on the training slices it is given (the split's training cases' lesion-free
slices, perhaps subsampled), validates on the lesion-free slices of the split's validation
cases (the plateau rule, the best checkpoint), and keeps the split beside its checkpoints
(split.json), so that `evaluate` scores the run's own test cases.
"""

from pathlib import Path

from jaxvae.data import splits
from jaxvae.training.trainer import train


def train_on_split(cfg, train_set, val_set, split, run_dir, *, resume=False, overwrite=False,
                   progress=True):
    """Train `cfg` on `train_set`, validated on `val_set`, and write `split` as split.json.

    Args:
      cfg: the TrainConfig (its data description names the split).
      train_set, val_set: SliceSets of the split's training and validation cases.
      split: the data.splits.Split they come from.
      run_dir, resume, overwrite, progress: as `train`.

    Returns:
      (final params, history) as `train`. split.json is written whenever the run exists,
      also when training stops with an error (a resumed run finds it).
    """
    run_dir = Path(run_dir)
    try:
        return train(cfg, train_set.images, run_dir, resume=resume, overwrite=overwrite,
                     progress=progress, val_images=val_set.lesion_free().images)
    finally:
        if (run_dir / "config.json").is_file():  # the run exists: its split beside it
            splits.write_split(split, run_dir / "split.json", overwrite=True)
