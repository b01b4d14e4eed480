"""Does the PyTorch reference compute what jaxvae computes? Checked before any timing.

The harness times JAX against `jaxvae.bench.torch_reference` loaded with the same weights;
`check_agreement` first requires every map both produce to agree to 1e-4 of its scale, on
pre-processed brain slices with an exact-zero background (phantom slices, plus real BraTS
slices where ../shared/data exists), where the LeakyReLU's kink at 0 is reached.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    io_orientation,
    ornt_transform,
)

from jaxvae.base.errors import DataError
from jaxvae.core import losses
from jaxvae.core.model import decode, encode
from jaxvae.core.predictors import GRADIENT_MAPS, PREDICTORS, anomaly_maps
from jaxvae.core.projection import project
from jaxvae.data import nifti, phantom
from jaxvae.data.datasets import find_brats_cases, load_slices
from jaxvae.data.preprocess import PreprocessParams, brain_mask, preprocess_volume
from jaxvae.data.slices import with_channels

# real scans beside the repository (../shared/data/README.md); absent on most machines
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL_AGREEMENT_DATA = ("brats2018_flair", "flair")  # (folder, modality): its first case
REAL_MODALITIES = ("flair", "t1")  # the channels of a C-channel check, cycled


class AgreementError(RuntimeError):
    """The PyTorch reference and JAX disagree: the two would not be timing the same work."""


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def _spread(n_total: int, n: int) -> np.ndarray:
    """n indices spread evenly over range(n_total), the centres of n equal parts (no ends)."""
    return np.unique(np.minimum(((np.arange(n) + 0.5) * n_total / n).astype(int), n_total - 1))


@functools.lru_cache(maxsize=4)
def phantom_slices(seed: int, size: int = 64, in_channels: int = 1) -> np.ndarray:
    """All pre-processed (S, size, size[, C]) slices of phantom case `seed` (a tumour case).

    The volume is reoriented to RAS as `jaxvae.data.nifti.load_volume` does with the file
    the phantom writer would save (BraTS affine), then goes through `preprocess_volume` with
    `PreprocessParams(size=size)`, as `score_volume`
    and `load_slices` do. One
    channel is the T2 rendering; C channels cycle through the phantom's co-registered
    renderings (T2, FLAIR, ...), each normalised on its own over the phantom's brain mask,
    so every channel keeps the same slices.
    """
    def ras(a):
        return np.ascontiguousarray(apply_orientation(a, ornt_transform(
            io_orientation(case.affine), axcodes2ornt("RAS"))))

    params, chans = PreprocessParams(size=size), []
    for c in range(in_channels):
        m = phantom.MODALITIES[c % len(phantom.MODALITIES)]
        case = phantom.make_case(seed, lesion_kinds=("tumour",), modality=m)
        mask = None if in_channels == 1 else ras(case.brain)
        chans.append(preprocess_volume(ras(case.image), params, mask,
                                       name=f"phantom case {seed} ({m})")[0])
    images = chans[0] if in_channels == 1 else np.stack(chans, axis=-1)
    images.setflags(write=False)
    return images


def _real_slices(root: Path, size: int = 64, in_channels: int = 1):
    """(all pre-processed slices, description) of the first case of REAL_AGREEMENT_DATA.

    One channel: FLAIR through `load_slices`. C channels cycle through REAL_MODALITIES
    (co-registered in that folder), each normalised on its own over the first one's brain.
    """
    folder, modality = REAL_AGREEMENT_DATA
    params = PreprocessParams(size=size)
    case = find_brats_cases(root / folder, modality)[0]
    if in_channels == 1:
        return load_slices([case], params).images, f"{folder}/{case.case_id} ({modality})"
    mods = [REAL_MODALITIES[c % len(REAL_MODALITIES)] for c in range(in_channels)]
    vols = [nifti.load_volume(find_brats_cases(root / folder / case.case_id, m)[0].image_path)
            .data for m in mods]
    brain = brain_mask(vols[0])
    images = np.stack([preprocess_volume(v, params, brain)[0] for v in vols], axis=-1)
    return images, f"{folder}/{case.case_id} ({', '.join(mods)})"


def agreement_inputs(n: int = 8, seed: int = 0, shared_data=SHARED_DATA, log=print, *,
                     image_size: int = 64, in_channels: int = 1) -> dict:
    """Realistic batches for `check_agreement`: name -> ((n, S, S, C) float32, description).

    "phantom": n slices spread over the brain of phantom case `seed` (always present).
    "real": n slices spread over the first case of ../shared/data/brats2018_flair (FLAIR;
    FLAIR, T1, ... for C channels), pre-processed as `jaxvae.data.datasets.load_slices`
    does; left out, with a log line, where that folder is absent or unreadable. Both are
    what scoring feeds the model: z-scored brain, clipped to +-1.5, background exactly 0
    (every slice keeps background and brain). S = image_size, C = in_channels.
    """
    def batch(images):
        idx = _spread(len(images), n)
        x = with_channels(images[idx])
        return jnp.asarray(x), idx

    out = {}
    images = phantom_slices(seed, image_size, in_channels)
    x, idx = batch(images)
    out["phantom"] = (x, f"phantom case {seed} (tumour, {image_size}x{image_size}, "
                         f"{in_channels} channel(s)), slices {idx.tolist()} of {len(images)}")
    root = Path(shared_data) if shared_data is not None else None
    if root is None or not (root / REAL_AGREEMENT_DATA[0]).is_dir():
        log(f"agreement: no real slices ({root} has no {REAL_AGREEMENT_DATA[0]}/); "
            "phantom slices only")
        return out
    try:
        images, what = _real_slices(root, image_size, in_channels)
    except DataError as e:
        log(f"agreement: real slices skipped ({e})")
        return out
    x, idx = batch(images)
    out["real"] = (x, f"{what}, slices {idx.tolist()} of {len(images)}")
    return out


def check_agreement(model, params, tr, tmodel, x=None, *, ops, beta, sigma, steps, lam, lr,
                    tol=1e-4) -> dict:
    """Max |jax - torch| / max |jax| for every map the timed ops produce; raises on > tol.

    x: one (N, S, S, C) batch (keys are the map names), a dict name -> batch (keys
    "name/map"), or None for `agreement_inputs(8)`: phantom slices and, where
    ../shared/data exists, real ones. Realistic inputs matter (issue #16): pre-processed
    slices have an exact-zero background and the convolutions have no bias, so every
    all-background patch has a pre-activation of exactly 0, on the LeakyReLU's kink, and the
    derivative there (the slope 0.01 in PyTorch) decides the gradient maps over the whole
    background. Random-normal images never reach the kink; a flax `leaky_relu` (derivative 1
    at 0) passed a check on them while its kl_grad differed by 100% of the map scale on
    brain slices. Exact zeros are computed exactly by both frameworks; a pre-activation that
    is merely within rounding of 0 can still take the other branch in the other framework,
    which changes a map locally, but none does on these inputs.

    Runs at full float32 precision on both sides (no TF32 on GPUs), the precision of the
    maps themselves; timings later use each framework's defaults.
    """
    if x is None:
        x = {k: v[0] for k, v in agreement_inputs(
            log=lambda *_: None, image_size=model.image_size,
            in_channels=model.in_channels).items()}
    batches = x if isinstance(x, dict) else {"": x}
    errs = {}
    for name, xb in batches.items():
        errs.update({(f"{name}/{k}" if name else k): v for k, v in _agreement_errors(
            model, params, tr, tmodel, jnp.asarray(xb), ops=ops, beta=beta, sigma=sigma,
            steps=steps, lam=lam, lr=lr).items()})
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        raise AgreementError(
            f"PyTorch reference disagrees with JAX beyond {tol:g} of the map scale: {bad}. The "
            "two frameworks would not time the same work; check jaxvae/bench/torch_reference.py "
            "(weight conversion, loss definitions, activation derivative at 0).")
    return errs


def _agreement_errors(model, params, tr, tmodel, x, *, ops, beta, sigma, steps, lam,
                      lr) -> dict:
    import torch  # optional: the bench extra; JAX-only runs never import it
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    errs = {}
    dev = next(tmodel.parameters()).device
    xt = tr.to_torch(x, dev)
    try:
        with jax.default_matmul_precision("highest"):
            if {"grad_maps_fused", "grad_maps_naive"} & set(ops):
                ref = anomaly_maps(model, params, x, beta=beta, predictors=GRADIENT_MAPS,
                                          smooth_sigma=sigma)
                for v in tr.GRAD_MAP_VARIANTS:
                    got = tr.grad_maps(tmodel, xt, beta, sigma, variant=v)
                    for k in GRADIENT_MAPS:
                        errs[f"grad_maps[{v}].{k}"] = _rel_err(ref[k], got[k].cpu().numpy())
            for op in set(ops) & set(PREDICTORS):
                ref = anomaly_maps(model, params, x, beta=beta, predictors=[op],
                                          smooth_sigma=sigma)[op]
                errs[op] = _rel_err(ref, tr.predictor(tmodel, xt, op, beta, sigma).cpu().numpy())
            if "projection" in ops:
                ref = project(model, params, x, lam=lam, steps=steps, lr=lr)[1]
                errs["projection"] = _rel_err(ref, tr.project(tmodel, xt, lam, steps, lr)[1]
                                              .cpu().numpy())
            if "train_step" in ops:
                eps = jax.random.normal(jax.random.key(3), (x.shape[0], model.latent_dim))

                def loss_fn(p):
                    mu, ls = encode(model, p, x)
                    x_hat = decode(model, p, mu + jnp.exp(ls) * eps)
                    return jnp.mean(losses.beta_elbo(x, x_hat, mu, ls, beta)[0])

                loss, g = jax.value_and_grad(loss_fn)(params)
                tm = tr.from_flax(model, params, dev)
                tloss = tr.elbo_loss(tm, xt, torch.from_numpy(np.array(eps)).to(dev), beta)
                tloss.backward()
                errs["train_step.loss"] = _rel_err(loss, tloss.item())
                gconv = tr.convert_params(g, tuple(model.channels), model.image_size)
                for name, tp in tm.named_parameters():
                    errs[f"train_step.grad.{name}"] = _rel_err(gconv[name].numpy(),
                                                               tp.grad.cpu().numpy())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    return errs
