"""A training run's settings: the TrainConfig (with its AugmentConfig) and the model it names.

One frozen dataclass holds everything that defines a run; it is saved as config.json beside
the run's checkpoints (jaxvae.training.checkpoint) and validated on construction, so a bad value is
refused before any data is loaded. The SCHEDULE_FIELDS (how long to train: epochs,
patience, max_steps; what to keep) may change when a run is resumed; the others may not.
"""

import dataclasses
import json
import operator

from jaxvae.base.errors import ConfigError
from jaxvae.core.augment import AugmentConfig
from jaxvae.core.model import IMAGE_SIZES, ConvVAE
from jaxvae.data.preprocess import PreprocessParams
from jaxvae.data.splits import Split, run_split

# Fields a resumed run may change: they set how long to train and what to keep, not what
# the steps compute.
SCHEDULE_FIELDS = ("epochs", "checkpoint_every", "keep_checkpoints", "patience", "max_steps")

# Where `jaxvae train` and the experiment scripts differ from TrainConfig's defaults (the
# paper's schedule, kept for the Python API): train until the validation loss stops
# improving (the plateau rule: 1000 optimiser steps without a new best), at most 20000 steps,
# no epoch cap, at lr 5e-4. Measured on ixi_t1 (T1) and brats2018_flair (FLAIR): README,
# "Training to convergence". The flags are generated from TrainConfig with these overrides.
CLI_SCHEDULE = {"lr": 5e-4, "epochs": 0, "patience": 1000, "max_steps": 20000}


def _count(value) -> int:
    """value as an int if it is one (numpy's too; not a bool, float or string), else -1."""
    if isinstance(value, bool):
        return -1
    try:
        return operator.index(value)
    except TypeError:
        return -1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved as config.json in the run directory.

    Attributes:
      latent_dim: latent size l (paper: 32, 64, 256).
      beta: KL weight of the beta-VAE loss.
      lr: Adam learning rate.
      batch_size: global batch size (a multiple of the device count).
      epochs: total number of epochs of the run (a resumed run trains up to this); 0 = no
        cap on epochs (then max_steps must be set: the plateau rule or the step budget ends
        the run).
      seed: seeds initialisation, data order, augmentation and z samples.
      checkpoint_every: save a checkpoint every this many epochs (and at the end).
      keep_checkpoints: number of most recent checkpoints kept (the checkpoint with the
        lowest validation loss is kept besides them).
      patience: stop once this many optimiser steps have passed since the lowest
        validation loss (checked at epoch ends; needs validation images); 0 = off. Counted
        in steps, so datasets of any size follow one plateau rule.
      max_steps: stop after this many optimiser steps in total, even inside an epoch;
        0 = no cap (only `epochs` counts).
      augment: apply `augmentation` on the fly.
      augmentation: the augmentation ranges.
      channels: encoder channels of the ConvVAE (its four stages from a 64x64 map down).
      image_size: slice height = width the model takes, 64 or 128 (a config.json written
        before this field existed is a 64 run).
      in_channels: image channels C (co-registered sequences stacked; 1 before this field).
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
    patience: int = 0
    max_steps: int = 0
    augment: bool = True
    augmentation: AugmentConfig = AugmentConfig()
    channels: tuple[int, ...] = (16, 32, 64, 256)
    image_size: int = 64
    in_channels: int = 1
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
        for name in ("patience", "max_steps"):
            value = getattr(self, name)
            count = _count(value)
            if count < 0:
                raise ConfigError(f"{name} must be an integer >= 0 (0 = off), got {value!r}")
            object.__setattr__(self, name, count)
        for name, ok, rule in (("epochs", self.epochs >= 0, ">= 0 (0: no cap)"),
                               ("beta", self.beta >= 0, ">= 0"), ("lr", self.lr > 0, "> 0")):
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)}")
        if not self.epochs and not self.max_steps:
            raise ConfigError("epochs=0 (no epoch cap) needs max_steps > 0: a step budget "
                              "that ends the run if the validation loss never plateaus")
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise ConfigError(f"channels must be 4 positive ints, got {self.channels}")
        size, c = _count(self.image_size), _count(self.in_channels)
        if size not in IMAGE_SIZES:
            raise ConfigError(f"image_size must be one of {', '.join(map(str, IMAGE_SIZES))}, "
                              f"got {self.image_size!r}")
        if c < 1:
            raise ConfigError(f"in_channels must be an integer >= 1, got {self.in_channels!r}")
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "in_channels", c)
        try:
            json.dumps(self.data)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data description must be JSON-serialisable ({e})") from None

    @property
    def data_info(self) -> "DataInfo":
        """The data description as a typed DataInfo."""
        return DataInfo.of(self.data)

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


@dataclasses.dataclass(frozen=True)
class DataInfo:
    """The typed view of a run's data description (`TrainConfig.data`, config.json's "data",
    which stays a JSON object so that every run directory keeps loading).

    Attributes:
      source: "phantom", "brats", "healthy", "volume" (jaxvae.data.datasets) or None.
      path: the data's folder or file as recorded (None: not recorded).
      modality: the sequences trained on ("flair", "flair,t2"); None: not recorded.
      preprocess: the PreprocessParams fields recorded where not the defaults.
      split: the cases' Split (older runs: train / test lists only); None: not recorded.
    """

    source: str | None = None
    path: str | None = None
    modality: str | None = None
    preprocess: dict = dataclasses.field(default_factory=dict)
    split: Split | None = None

    @classmethod
    def of(cls, data: dict | None) -> "DataInfo":
        d = data or {}
        return cls(source=d.get("source"), path=d.get("path"), modality=d.get("modality"),
                    preprocess=dict(d.get("preprocess") or {}), split=run_split(d))

    @property
    def location(self) -> str | None:
        """What `--data` names to load this data again: "phantom", a path, or None."""
        return "phantom" if self.source == "phantom" else self.path


def preprocess_of(cfg: TrainConfig) -> PreprocessParams:
    """The PreprocessParams a run was trained with (its data description; default if none),
    at the model's image size."""
    return PreprocessParams(**{"size": cfg.image_size, **cfg.data_info.preprocess})


def model_from_config(cfg: TrainConfig) -> ConvVAE:
    """The ConvVAE a config describes."""
    return ConvVAE(latent_dim=int(cfg.latent_dim), channels=tuple(cfg.channels),
                   image_size=int(cfg.image_size), in_channels=int(cfg.in_channels))

