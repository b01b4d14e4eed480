"""jaxvae: unsupervised anomaly localisation in brain MRI with VAEs and beta-VAEs."""

from jaxvae.errors import ConfigError, DataError, JaxvaeError, OutputError, RunError
from jaxvae.losses import beta_elbo, kl_divergence, rec_nll, squared_error
from jaxvae.model import ConvVAE, decode, encode, init_params
from jaxvae.predictors import PREDICTORS, anomaly_maps, smooth
from jaxvae.projection import project

__all__ = [
    "PREDICTORS",
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
