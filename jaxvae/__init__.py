"""jaxvae: unsupervised anomaly localisation in brain MRI with VAEs and beta-VAEs."""

from jaxvae.base.errors import ConfigError, DataError, JaxvaeError, OutputError, RunError
from jaxvae.core.augment import AugmentConfig, augment_batch
from jaxvae.core.losses import beta_elbo, kl_divergence, rec_nll, squared_error
from jaxvae.core.model import ConvVAE, decode, encode, init_params, reconstruct
from jaxvae.core.predictors import PREDICTORS, anomaly_maps, smooth
from jaxvae.core.projection import project
from jaxvae.inference.volumes import volume_maps
from jaxvae.runtime.batching import sharded_maps, sharded_project
from jaxvae.runtime.execution import ExecutionPolicy
from jaxvae.runtime.parallel import initialize_distributed, make_mesh
from jaxvae.training.checkpoint import load_run
from jaxvae.training.config import TrainConfig, model_from_config
from jaxvae.training.trainer import make_train_step, train

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
