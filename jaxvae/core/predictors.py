"""Per-pixel anomaly maps of a trained VAE: rec_error, rec_grad, kl_grad, elbo_grad, combi.

Definitions follow docs/method.md §2 (Zimmerer et al. 2019; Zhou, Deng & Wu). All maps come
from one encoder pass and at most one decoder pass: the rec and KL gradients with respect to
the input are two VJPs of the same forward pass, and their encoder parts are computed as one
batched VJP with the cotangents stacked. Because images are independent, the gradient of
the batch *sum* of the per-image losses is every image's own gradient.

Images of C channels (co-registered sequences; issue #15) give one (N, H, W) map per
predictor, the channels reduced as follows. The likelihood factorises over channels, so a
pixel's reconstruction terms add up: rec_error, rec_pos, rec_neg and combi's NLL factor are
summed over channels. A gradient map is the sum over channels of |grad| (rec_grad, kl_grad,
elbo_grad, elbo_grad_sum, combi's KL factor; rec_grad_pos / rec_grad_neg sum the positive /
negative parts): the L1 norm of the pixel's gradient vector, which, as the reconstruction
sum, adds the evidence of each sequence rather than letting opposite signs in two sequences
cancel (|sum_c g_c| would), and which a lesion visible in one sequence only still reaches.
The channels are reduced before smoothing (smoothing is linear, so it is the same as after)
and before combi's min-max. For C = 1 every map is exactly the single-channel map.
"""

import functools
import math

import jax
import jax.numpy as jnp

from jaxvae.base.errors import ConfigError
from jaxvae.core import losses
from jaxvae.core.model import ConvVAE, check_input, decode, encode

PREDICTORS = ("rec_error", "rec_grad", "kl_grad", "elbo_grad", "combi")
# Not in the paper: one-signed maps. For hyperintense lesions (FLAIR, T2): rec_pos =
# max(x - x_hat, 0)**2, the positive residual of Baur et al. (2021), and rec_grad_pos = the
# smoothed positive part of the reconstruction-loss gradient, which is > 0 where a brighter
# pixel costs more, i.e. where the image is brighter than its reconstruction. For
# hypointense lesions (tumours in T1): rec_neg = max(x_hat - x, 0)**2 and rec_grad_neg = the
# smoothed negative part of that gradient (where the image is darker than its reconstruction).
SIGNED_PREDICTORS = ("rec_pos", "rec_grad_pos", "rec_neg", "rec_grad_neg")
# A variant the paper leaves open: ELBO-grad as the plain sum |g_rec + g_kl| (the gradient of
# the unweighted ELBO) instead of the beta-weighted |g_rec + beta g_kl|; equal at beta = 1.
VARIANT_PREDICTORS = ("elbo_grad_sum",)
GRADIENT_MAPS = ("rec_grad", "kl_grad", "elbo_grad")
# the maps smoothed at smooth_sigma (combi smooths its KL factor only); `unsmoothed=True`
# also returns each of them before smoothing, as unsmoothed_name(name)
SMOOTHED_MAPS = ("rec_grad", "rec_grad_pos", "rec_grad_neg", "kl_grad", "elbo_grad",
                 "elbo_grad_sum")


def unsmoothed_name(name: str) -> str:
    """The key of a smoothed map's unsmoothed twin (`anomaly_maps(..., unsmoothed=True)`)."""
    return f"{name}_unsmoothed"


def is_unsmoothed(name: str) -> bool:
    """Whether `name` is an unsmoothed twin (a source of tuned rows, not a row itself)."""
    return name.endswith("_unsmoothed")


def gaussian_matrix(size: int, sigma: float):
    """(size, size) matrix K such that K @ img @ K.T is a zero-padded Gaussian blur.

    The kernel has radius ceil(sigma) (kernel 7 at sigma 3, as in the reference code) and
    sums to one. Written as two small matmuls because on CPU that is faster than a depthwise
    convolution and exact.
    """
    radius = max(1, math.ceil(sigma))
    offsets = jnp.arange(-radius, radius + 1)
    kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    idx = jnp.arange(size)
    diff = idx[None, :] - idx[:, None]
    return jnp.where(jnp.abs(diff) <= radius, kernel[jnp.clip(diff + radius, 0, 2 * radius)], 0.0)


def smooth(maps, sigma: float):
    """Gaussian blur of (N, H, W) maps (zero padding); sigma <= 0 returns them unchanged."""
    if sigma <= 0:
        return maps
    k = gaussian_matrix(maps.shape[-1], sigma).astype(maps.dtype)
    kh = gaussian_matrix(maps.shape[-2], sigma).astype(maps.dtype)
    return jnp.einsum("ij,njk,lk->nil", kh, maps, k)


# The reference code min-max normalises |KL-grad| for combi per test-loader batch of 64
# slices, so 64 consecutive images form one normalisation group by default.
COMBI_GROUP = 64


def _minmax_groups(a, group: int):
    """Min-max normalise (N, H, W) maps over consecutive groups of `group` images (the last
    group may be shorter); group <= 0 normalises over all N together."""
    n = a.shape[0]
    if group <= 0 or group >= n:
        lo, hi = jnp.min(a), jnp.max(a)
    else:
        ids = jnp.arange(n) // group
        flat = a.reshape(n, -1)
        segs = -(-n // group)
        lo = jax.ops.segment_min(flat.min(1), ids, segs)[ids][:, None, None]
        hi = jax.ops.segment_max(flat.max(1), ids, segs)[ids][:, None, None]
    return (a - lo) / jnp.maximum(hi - lo, jnp.finfo(a.dtype).tiny)


def _combi(kl_abs, nll, smooth_sigma, group):
    """Zimmerer's combi: smooth(min-max per group of |kl_grad|) * rec NLL, (N, H, W)."""
    return smooth(_minmax_groups(kl_abs, group), smooth_sigma) * nll


@functools.partial(jax.jit, static_argnames=("model", "predictors", "n_samples", "smooth_sigma",
                                             "combi_group", "reference_kl", "unsmoothed"))
def _anomaly_maps(model, params, x, beta, key, *, predictors, n_samples, smooth_sigma,
                  combi_group=COMBI_GROUP, reference_kl=False, unsmoothed=False):
    want = set(predictors)
    rec_grads = {"rec_grad", "elbo_grad", "rec_grad_pos", "rec_grad_neg", "elbo_grad_sum"}
    need_rec = bool(want & {"rec_error", "rec_pos", "rec_neg", "combi", *rec_grads})
    need_rec_grad = bool(want & rec_grads)
    need_kl_grad = bool(want & {"kl_grad", "elbo_grad", "combi", "elbo_grad_sum"})
    out = {}

    (mu, log_sigma), enc_vjp = jax.vjp(lambda x: encode(model, params, x), x)

    def rec_loss(mu, log_sigma, x):
        # z = mu (deterministic, the default) or the mean over n_samples reparameterised draws
        if n_samples == 0:
            z = mu[None]
        else:
            eps = jax.random.normal(key, (n_samples,) + mu.shape, mu.dtype)
            z = mu + jnp.exp(log_sigma) * eps
        x_hat = decode(model, params, z.reshape(-1, mu.shape[-1]))
        x_hat = x_hat.reshape(z.shape[:2] + x.shape[1:])
        nll = jnp.mean(losses.rec_nll(x[None], x_hat), axis=0)
        sq = jnp.mean(losses.squared_error(x[None], x_hat), axis=0)
        pos = jnp.mean(jnp.square(jnp.maximum(x[None] - x_hat, 0)), axis=0)
        neg = jnp.mean(jnp.square(jnp.maximum(x_hat - x[None], 0)), axis=0)
        return jnp.sum(nll), (nll, sq, pos, neg)

    if need_rec_grad:
        _, rec_vjp, (nll, sq, pos, neg) = jax.vjp(rec_loss, mu, log_sigma, x, has_aux=True)
        g_mu, g_ls, g_direct = rec_vjp(jnp.ones((), x.dtype))
    elif need_rec:
        _, (nll, sq, pos, neg) = rec_loss(mu, log_sigma, x)

    if need_kl_grad:
        # reference_kl: the reference code passes sigma where log sigma is expected
        kl = (lambda m, s: losses.kl_divergence(m, jnp.exp(s))) if reference_kl \
            else losses.kl_divergence
        kl_mu, kl_ls = jax.grad(lambda m, s: jnp.sum(kl(m, s)), argnums=(0, 1))(mu, log_sigma)

    if need_rec_grad and need_kl_grad:
        # one batched encoder VJP for both cotangents (the VJP is linear, vmap stacks them)
        g = jax.vmap(lambda cm, cs: enc_vjp((cm, cs))[0])(jnp.stack([g_mu, kl_mu]),
                                                            jnp.stack([g_ls, kl_ls]))
        g_rec, g_kl = g[0] + g_direct, g[1]
    elif need_rec_grad:
        g_rec = enc_vjp((g_mu, g_ls))[0] + g_direct
    elif need_kl_grad:
        g_kl = enc_vjp((kl_mu, kl_ls))[0]

    def to_map(a):  # (N, H, W, C) -> (N, H, W): the sum over channels (module docstring)
        return a[..., 0] if a.shape[-1] == 1 else jnp.sum(a, axis=-1)

    if "rec_error" in want:
        out["rec_error"] = to_map(sq)
    if "rec_pos" in want:
        out["rec_pos"] = to_map(pos)
    if "rec_neg" in want:
        out["rec_neg"] = to_map(neg)
    raw = {"rec_grad_pos": lambda: jnp.maximum(g_rec, 0),
           "rec_grad_neg": lambda: jnp.maximum(-g_rec, 0),
           "rec_grad": lambda: jnp.abs(g_rec),
           "kl_grad": lambda: jnp.abs(g_kl),
           "elbo_grad": lambda: jnp.abs(g_rec + beta * g_kl),
           "elbo_grad_sum": lambda: jnp.abs(g_rec + g_kl)}
    for name in SMOOTHED_MAPS:
        if name in want:
            m = to_map(raw[name]())
            out[name] = smooth(m, smooth_sigma)
            if unsmoothed:
                out[unsmoothed_name(name)] = m
    if "combi" in want:
        out["combi"] = _combi(to_map(jnp.abs(g_kl)), to_map(nll), smooth_sigma, combi_group)
    return out


def check_predictors(predictors, allowed=(*PREDICTORS, *SIGNED_PREDICTORS, *VARIANT_PREDICTORS),
                     default=PREDICTORS) -> tuple[str, ...]:
    """Validate predictor names; return them as a sorted tuple (a static jit argument).

    None gives `default` (the paper's five maps)."""
    if predictors is None:
        return tuple(sorted(default))
    if isinstance(predictors, str):
        predictors = [p for p in predictors.split(",") if p]
    unknown = sorted(set(predictors) - set(allowed))
    if unknown or not predictors:
        raise ConfigError(f"unknown predictor(s) {unknown or predictors!r}; "
                          f"choose from {', '.join(allowed)}")
    return tuple(sorted(set(predictors)))


def anomaly_maps(model: ConvVAE, params, x, *, beta=1.0, predictors=None, smooth_sigma=3.0,
                 n_samples=0, key=None, combi_group=COMBI_GROUP, reference_kl=False,
                 unsmoothed=False) -> dict:
    """Per-pixel anomaly maps of a batch, computed together from one forward pass.

    A pure function of (params, x): `jax.jit` (model and the keyword options static) and
    `jax.vmap` of it work. It computes the whole batch in one call, in the model's own
    convolution form; `jaxvae.runtime.batching.maps` is the batcher that applies the per-backend
    execution policy (chunks, convolution forms, devices).

    Args:
      model: the ConvVAE (static: its hyper-parameters select the compiled function).
      params: its parameters.
      x: (N, S, S, C) float32 pre-processed images (S and C those of the model).
      beta: weight of the KL term in elbo_grad (the beta of a beta-VAE).
      predictors: names among PREDICTORS, SIGNED_PREDICTORS and VARIANT_PREDICTORS (list,
        tuple or comma string); None = the paper's five (PREDICTORS).
      smooth_sigma: Gaussian sigma in pixels for the gradient maps (rec_grad, kl_grad,
        elbo_grad) and the KL factor of combi; 0 disables smoothing. rec_error is never
        smoothed.
      n_samples: 0 = z is mu (the default, as in the reference code); n > 0 averages the
        reconstruction loss over n reparameterised samples drawn with `key`.
      key: PRNG key, required when n_samples > 0.
      combi_group: combi min-max normalises |kl_grad| over consecutive groups of this many
        images of x (default 64: the reference code's per-loader-batch normalisation);
        0 = over the whole of x.
      reference_kl: reproduce the reference code's KL mix-up (it passes the standard
        deviation where the log standard deviation is expected, so its KL is that of
        N(mu, exp(sigma)**2) with sigma = exp(log_sigma)); changes kl_grad, elbo_grad and
        combi. Off by default: jaxvae's KL is the correct one (README, method notes).
      unsmoothed: also return each SMOOTHED_MAPS map before its smoothing, under
        `unsmoothed_name(name)` (from the same pass: evaluation smooths them again at the
        sigma chosen on calibration cases, as the fair nulls choose theirs).

    Returns:
      dict name -> (N, S, S) float32 map, channels reduced as the module docstring says;
      larger means more anomalous.
    """
    predictors = check_predictors(predictors)
    if n_samples < 0:
        raise ConfigError(f"n_samples must be >= 0, got {n_samples}")
    if n_samples > 0 and key is None:
        raise ConfigError("n_samples > 0 needs a PRNG key (key=jax.random.key(...))")
    if key is None:
        key = jax.random.key(0)  # unused when n_samples == 0; keeps one compiled signature
    x = jnp.asarray(x)
    check_input(model, x.shape)
    x = x.astype(jnp.result_type(x.dtype, jnp.float32))  # float32, or float64 under x64
    return _anomaly_maps(model, params, x, jnp.asarray(beta, x.dtype), key,
                         predictors=predictors, n_samples=int(n_samples),
                         smooth_sigma=float(smooth_sigma), combi_group=int(combi_group),
                         reference_kl=bool(reference_kl), unsmoothed=bool(unsmoothed))
