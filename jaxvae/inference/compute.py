"""The maps of a stack of slices: every requested predictor, batch by batch, through the batcher.

Fixed-size batches from the one batcher (jaxvae.runtime.batching.batches: the last batch padded by
repeating real slices, so one compiled shape serves all and combi's batch min-max is not
changed by padding), the gradient maps fused in one call, the projection beside them.
"""

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxvae.core.predictors import check_predictors
from jaxvae.data.slices import with_channels
from jaxvae.inference.settings import KNOWN_PREDICTORS, EvalSettings, map_names
from jaxvae.runtime import batching, execution


def map_batches(model, params, images, *, beta=1.0, settings=EvalSettings(), progress=False,
                desc="scoring"):
    """Yield (rows, {name: (n, H, W) float32 map}) per batch of `batching.batches`, in order.

    Args:
      model, params, images, beta, settings: as `compute_maps`.
      progress, desc: progress bar.
    """
    wanted = check_predictors(settings.predictors, KNOWN_PREDICTORS)
    names = map_names(settings)
    grad_preds = tuple(p for p in wanted if p != "proj_rec_error")
    policy = execution.current().for_model(model)  # chunks of the model's image size
    key = jax.random.key(settings.seed)
    todo = list(enumerate(batching.batches(len(images), settings.batch_size)))
    for b, (idx, n) in tqdm(todo, desc=desc, disable=not progress, unit="batch"):
        x = with_channels(np.asarray(images[idx], np.float32))  # channels: sequences
        out = {}
        if grad_preds:
            maps = batching.maps(model, params, x, policy=policy, beta=beta,
                              predictors=grad_preds, smooth_sigma=settings.smooth_sigma,
                              unsmoothed=len(names) > len(wanted),
                              n_samples=settings.n_samples, combi_group=settings.combi_group,
                              key=jax.random.fold_in(key, b) if settings.n_samples else None)
            out.update({name: np.asarray(m)[:n] for name, m in maps.items()})
        if "proj_rec_error" in wanted:
            _, m = batching.project(model, params, x, policy=policy, lam=settings.proj_lam,
                                 steps=settings.proj_steps, lr=settings.proj_lr)
            out["proj_rec_error"] = np.asarray(m)[:n]
        yield idx[:n], {p: out[p] for p in names}


def compute_maps(model, params, images, *, beta=1.0, settings=EvalSettings(), progress=False):
    """All requested anomaly maps of a stack of slices, batch by batch, as arrays.

    For metrics, `score_dataset` streams instead: it holds a batch of maps, not S slices.

    Args:
      model, params: the trained ConvVAE and its parameters.
      images: (S, H, W) float32 pre-processed slices, or (S, H, W, C) for a model of C
        sequences (channels).
      beta: the model's beta (for elbo_grad).
      settings: EvalSettings (predictors, batch size, smoothing, projection...).
      progress: show a progress bar.

    Returns:
      {name: (S, H, W) float32 numpy map} for every name of `map_names(settings)`.
    """
    images = np.asarray(images, np.float32)
    out = {p: np.empty(images.shape[:3], np.float32) for p in map_names(settings)}
    for rows, maps in map_batches(model, params, images, beta=beta, settings=settings,
                                   progress=progress):
        for name, m in maps.items():
            out[name][rows] = m
    return out
