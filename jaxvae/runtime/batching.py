"""The one batcher: pads, shards and chunks batches and applies the execution policy.

`jaxvae.anomaly_maps` and `jaxvae.project` are the pure maths; this module is how they are
run on many images: an `ExecutionPolicy` (jaxvae.runtime.execution) picks the convolution forms,
the chunk size and the projection's step schedule; several local devices split each batch
(padded by repeating its last image, so that no batch statistic changes); `batches` cuts a
stack of slices into fixed-size, padded batches so one compiled program serves them all.
The evaluation, `jaxvae score` and the demo all go through here, and so do the maps of
one volume on its own grid: `volume_maps` (Python) and `score_volume` (NIfTI files), with
the lesion probability and mask of a run's segmenter (jaxvae.inference.segment); `find_inputs`
picks the volumes of a folder to score (those three live in jaxvae.inference.volumes).
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxvae.core import projection
from jaxvae.core.predictors import COMBI_GROUP, anomaly_maps
from jaxvae.runtime import execution, parallel


def spans(n: int, size: int) -> list[slice]:
    """range(n) cut into consecutive slices of `size` (the last one shorter); one slice of
    everything when size <= 0 or size >= n. The one cut every batching here is made of."""
    if size <= 0 or n <= size:
        return [slice(0, n)]
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def batches(n: int, batch_size: int):
    """Yield (indices, n_real) covering range(n) in batches of exactly `batch_size`.

    The last batch is padded by repeating index n - 1: the real rows are indices[:n_real].
    """
    for s in spans(n, batch_size) if n else ():
        yield np.minimum(np.arange(s.start, s.start + batch_size), n - 1), s.stop - s.start


def pad_to_multiple(x: np.ndarray, m: int) -> np.ndarray:
    """Pad the leading axis to a multiple of m by repeating the last row."""
    # a duplicate changes no batch-level statistic (combi's min-max), zeros could
    pad = -x.shape[0] % m
    return x if pad == 0 else np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])


def _placed(params, x, policy, mesh):
    """(params, x, n, policy): on several devices padded, sharded and replicated."""
    if mesh is None and jax.local_device_count() == 1:
        return params, x, x.shape[0], policy
    mesh = parallel.make_mesh() if mesh is None else mesh
    x = np.asarray(x, np.float32)
    xs = jax.device_put(pad_to_multiple(x, mesh.size), parallel.batch_sharding(mesh))
    return parallel.replicate(params, mesh), xs, x.shape[0], policy.sharded()


def maps(model, params, x, *, policy=None, mesh=None, key=None, combi_group=COMBI_GROUP,
         **kwargs) -> dict:
    """`jaxvae.anomaly_maps` of a batch, run as the execution policy says.

    Args:
      model, params: the ConvVAE (any conv_impl: the policy's form is used) and parameters.
      x: (N, H, W, C) float32 images.
      policy: an ExecutionPolicy (default: execution.current() at the model's image
        size, `ExecutionPolicy.for_model`).
      mesh: a device mesh to split the batch over; None = every local device when there
        are several, else none.
      key: PRNG key of the Monte-Carlo draws (n_samples > 0); chunk i draws with
        fold_in(key, i).
      combi_group, **kwargs: as `anomaly_maps` (beta, predictors, smooth_sigma, n_samples,
        reference_kl). Chunks never split a combi group; combi_group=0 (the whole batch)
        runs the batch in one call.

    Returns:
      dict name -> (N, H, W) map (jax.Array), the same maps as one `anomaly_maps` call.
    """
    policy = execution.current().for_model(model) if policy is None else policy
    params, x, n, policy = _placed(params, x, policy, mesh)
    model = policy.inference_model(model)
    chunk = policy.chunk_size
    if chunk > 0 and "combi" in (kwargs.get("predictors") or "combi"):
        chunk = 0 if combi_group <= 0 else max(combi_group, chunk - chunk % combi_group)
    parts = spans(x.shape[0], chunk)
    outs = [anomaly_maps(model, params, x[s], combi_group=combi_group, **kwargs,
                         key=key if key is None or len(parts) == 1
                         else jax.random.fold_in(key, i)) for i, s in enumerate(parts)]
    return {k: (jnp.concatenate([o[k] for o in outs]) if len(outs) > 1 else outs[0][k])[:n]
            for k in outs[0]}


def project(model, params, x, *, policy=None, mesh=None, lam=1.0, steps=100, lr=0.03,
            map_kind="rec"):
    """`jaxvae.project` of a batch, run as the execution policy says.

    Args:
      model, params, x, policy, mesh: as in `maps`.
      lam, steps, lr, map_kind: as in `jaxvae.project`.

    Returns:
      (x_projected (N, H, W, C), map (N, H, W)), as one `jaxvae.project` call.
    """
    projection.check_args(lam=lam, steps=steps, lr=lr, map_kind=map_kind)
    policy = execution.current().for_model(model) if policy is None else policy
    params, x, n, policy = _placed(params, x, policy, mesh)
    model = policy.inference_model(model)
    x = jnp.asarray(x)
    outs = []
    for s in spans(x.shape[0], policy.chunk_size):
        x0 = x[s].astype(jnp.result_type(x.dtype, jnp.float32))
        if policy.projection_unroll <= 0:
            outs.append(projection.project(model, params, x0, lam=lam, steps=steps, lr=lr,
                                           map_kind=map_kind))
            continue
        # a Python loop over one compiled program of `unroll` straight-line Adam steps
        lam_, lr_ = jnp.asarray(lam, x0.dtype), jnp.asarray(lr, x0.dtype)
        xt, state = x0, projection.init(x0, lr_)
        k = policy.projection_unroll
        for m in [k] * (int(steps) // k) + [int(steps) % k]:
            if m:
                xt, state = projection.adam_steps(model, params, xt, state, x0, lam_, lr_,
                                                  steps=m, unroll=True)
        outs.append((xt, projection.projection_map(model, params, xt, x0, map_kind=map_kind)))
    return tuple((jnp.concatenate(a) if len(outs) > 1 else a[0])[:n]
                 for a in zip(*outs, strict=True))


def sharded_maps(model, params, x, *, mesh=None, **kwargs) -> dict:
    """`maps` with the batch split over the devices of `mesh` (default: all devices)."""
    return maps(model, params, x, mesh=parallel.make_mesh() if mesh is None else mesh,
                **kwargs)


def sharded_project(model, params, x, *, mesh=None, **kwargs):
    """`project` with the batch split over the devices of `mesh` (default: all devices)."""
    return project(model, params, x, mesh=parallel.make_mesh() if mesh is None else mesh,
                   **kwargs)

