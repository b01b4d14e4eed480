"""jaxvae: unsupervised anomaly localisation in brain MRI with VAEs and beta-VAEs."""

from jaxvae.augment import augment_batch
from jaxvae.checkpoint import load_run
from jaxvae.config import AugmentConfig, TrainConfig, model_from_config
from jaxvae.errors import ConfigError, DataError, JaxvaeError, OutputError, RunError
from jaxvae.execution import ExecutionPolicy
from jaxvae.losses import beta_elbo, kl_divergence, rec_nll, squared_error
from jaxvae.model import ConvVAE, decode, encode, init_params, reconstruct
from jaxvae.parallel import initialize_distributed, make_mesh
from jaxvae.predictors import PREDICTORS, anomaly_maps, smooth
from jaxvae.projection import project
from jaxvae.score import sharded_maps, sharded_project, volume_maps
from jaxvae.train import make_train_step, train

__all__ = [
    "PREDICTORS",
    "AugmentConfig",
    "ExecutionPolicy",
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
    "volume_maps",
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
    "reconstruct",
    "smooth",
    "squared_error",
]
