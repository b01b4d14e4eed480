"""Tests of jaxvae.training.config: TrainConfig's JSON round trip, validation and schedule
fields, the model it names."""

import json

import numpy as np
import pytest
from run_helpers import (
    images,
    tiny,
)

from jaxvae.base.errors import ConfigError, DataError
from jaxvae.core.augment import AugmentConfig
from jaxvae.core.model import ConvVAE
from jaxvae.training.config import SCHEDULE_FIELDS, TrainConfig, model_from_config
from jaxvae.training.trainer import train

# --------------------------------------------------------------------------- config


def test_config_json_roundtrip_and_validation(tmp_path):
    cfg = tiny(augmentation=AugmentConfig(contrast=(0.9, 1.1)),
               data={"modality": "t2", "fold": 3, "cases": ["a", "b"]})
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert isinstance(again.augmentation, AugmentConfig) and again.channels == (4, 4, 4, 4)
    defaults = TrainConfig()
    assert (defaults.latent_dim, defaults.beta, defaults.lr, defaults.batch_size,
            defaults.keep_checkpoints) == (256, 1.0, 1e-4, 64, 3)
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict({**cfg.to_dict(), "latnet_dim": 3})
    for bad in (dict(beta=-1.0), dict(lr=0.0), dict(batch_size=0), dict(data={"x": object()}),
                dict(channels=(4, 4, 4)), dict(augmentation={"rotation": -1})):
        with pytest.raises(ConfigError):
            tiny(**bad)
    with pytest.raises(ConfigError):
        AugmentConfig(scale=(1.2, 0.9))
    with pytest.raises(ConfigError):
        AugmentConfig(mirror_prob=1.5)


def test_model_from_config():
    model = model_from_config(tiny(latent_dim=5))
    assert isinstance(model, ConvVAE) and model.latent_dim == 5
    assert model.channels == (4, 4, 4, 4)



def test_patience_and_max_steps_are_validated_schedule_fields():
    assert {"patience", "max_steps"} <= set(SCHEDULE_FIELDS)
    for bad in (dict(patience=-1), dict(max_steps=-3), dict(patience=1.5),
                dict(max_steps="10")):
        with pytest.raises(ConfigError, match="patience|max_steps"):
            tiny(**bad)
    assert TrainConfig.from_dict({k: v for k, v in tiny().to_dict().items()
                                  if k not in ("patience", "max_steps")}) == tiny()
    with pytest.raises(ConfigError, match="patience=2 .*no validation images"):
        train(tiny(epochs=1, patience=2), images(16), None, progress=False)
    with pytest.raises(ConfigError, match="validation images"):
        train(tiny(epochs=1, patience=2), images(16), None, progress=False,
              val_images=np.zeros((0, 64, 64), np.float32))
    with pytest.raises(DataError, match=r"validation images must be a \(M, 64, 64\)"):
        train(tiny(epochs=1), images(16), None, progress=False, val_images=images(3)[:, :32])
    bad = images(3)
    bad[1, 0, 0] = np.nan
    with pytest.raises(DataError, match="validation image 1"):
        train(tiny(epochs=1), images(16), None, progress=False, val_images=bad)
