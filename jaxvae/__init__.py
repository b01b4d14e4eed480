"""jaxvae: unsupervised anomaly localisation in brain MRI with VAEs and beta-VAEs."""

from jaxvae.errors import ConfigError, DataError, JaxvaeError, OutputError, RunError
from jaxvae.losses import beta_elbo, kl_divergence, rec_nll, squared_error
from jaxvae.model import ConvVAE, decode, encode, init_params
from jaxvae.parallel import initialize_distributed, make_mesh, sharded_maps, sharded_project
from jaxvae.predictors import PREDICTORS, anomaly_maps, smooth
from jaxvae.projection import project
from jaxvae.train import (
                          AugmentConfig,
                          TrainConfig,
                          augment_batch,
                          load_run,
                          make_train_step,
                          model_from_config,
                          train,
)

__all__ = [
    "PREDICTORS",
    "AugmentConfig",
    "TrainConfig",
    "augment_batch",
    "initialize_distributed",
    "load_run",
    "make_mesh",
    "make_train_step",
    "model_from_config",
    "sharded_maps",
    "sharded_project",
    "train",
    "ConfigError",
    "ConvVAE",
    "DataError",
    "JaxvaeError",
    "OutputError",
    "RunError",
    "anomaly_maps",
    "beta_elbo",
    "decode",
    "encode",
    "init_params",
    "kl_divergence",
    "project",
    "rec_nll",
    "smooth",
    "squared_error",
]
