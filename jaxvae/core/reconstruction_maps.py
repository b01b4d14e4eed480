"""Anomaly maps of any reconstruction model x -> f(x): the denoising auto-encoder's maps.

The maps that need only a reconstruction, defined as the VAE's (jaxvae.core.predictors,
docs/method.md §2) with f(x) in place of decoder(mu(x)): rec_error = (x - f(x))**2, the
one-signed residuals rec_pos / rec_neg, and the input gradient of the reconstruction loss
L(x) = 0.5 * sum (x - f(x))**2 with its one-signed parts. The gradient is
(x - f(x)) - J_f(x)^T (x - f(x)): one forward pass and one VJP with the residual as the
cotangent, fused as the VAE's maps are. C channels are reduced as there: residuals summed,
gradient maps the sum over channels of |grad| (or of its positive / negative part), before
smoothing. The maps the VAE's latent defines (kl_grad, elbo_grad, elbo_grad_sum, combi) do
not exist here and are refused by name.
"""

import functools

import jax
import jax.numpy as jnp

from jaxvae.base.errors import ConfigError
from jaxvae.core.predictors import smooth, unsmoothed_name

RECONSTRUCTION_MAPS = ("rec_error", "rec_grad", "rec_pos", "rec_grad_pos", "rec_neg",
                       "rec_grad_neg")
_GRADIENTS = {"rec_grad": jnp.abs, "rec_grad_pos": lambda g: jnp.maximum(g, 0),
              "rec_grad_neg": lambda g: jnp.maximum(-g, 0)}


def check_reconstruction_maps(predictors) -> tuple[str, ...]:
    """The requested maps as a sorted tuple; ConfigError naming those a reconstruction
    model does not have (the VAE's latent maps) or that do not exist."""
    names = [p for p in predictors.split(",") if p] if isinstance(predictors, str) else \
        list(predictors)
    bad = sorted(set(names) - set(RECONSTRUCTION_MAPS))
    if bad or not names:
        raise ConfigError(f"map(s) {bad or names} do not exist for a reconstruction model "
                          f"(a DAE): it has {', '.join(RECONSTRUCTION_MAPS)}; kl_grad, "
                          "elbo_grad and combi need a VAE's latent")
    return tuple(sorted(set(names)))


def reconstruction_maps(model, params, x, *, predictors=("rec_error", "rec_grad"),
                        smooth_sigma=3.0, unsmoothed=False) -> dict:
    """Per-pixel maps of a batch from one forward pass and at most one VJP.

    A pure function of (params, x): `jax.jit` (model and the options static) and
    `jax.vmap` of it work.

    Args:
      model: a Flax module whose output is the reconstruction of its input, (N, H, W, C)
        -> (N, H, W, C) (the DAE's UNet); static: its fields select the compiled function.
      params: its parameters.
      x: (N, H, W, C) float32 images.
      predictors: among RECONSTRUCTION_MAPS.
      smooth_sigma: Gaussian sigma (pixels) of the gradient maps; 0 = off.
      unsmoothed: also each gradient map before smoothing, as `unsmoothed_name(name)`.

    Returns:
      {name: (N, H, W) map}.
    """
    return _maps(model, params, x, check_reconstruction_maps(predictors), float(smooth_sigma),
                 bool(unsmoothed))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _maps(model, params, x, predictors, smooth_sigma, unsmoothed):
    x_hat, vjp = jax.vjp(lambda v: model.apply({"params": params}, v), x)
    r = x - x_hat
    out = {}
    residual = {"rec_error": r ** 2, "rec_pos": jnp.maximum(r, 0) ** 2,
                "rec_neg": jnp.maximum(-r, 0) ** 2}
    for name in set(predictors) & set(residual):
        out[name] = jnp.sum(residual[name], axis=-1)
    if set(predictors) & set(_GRADIENTS):
        g = r - vjp(r)[0]  # d/dx of 0.5 * sum (x - f(x))**2
        for name in set(predictors) & set(_GRADIENTS):
            raw = jnp.sum(_GRADIENTS[name](g), axis=-1)
            out[name] = smooth(raw, smooth_sigma)
            if unsmoothed:
                out[unsmoothed_name(name)] = raw
    return out
