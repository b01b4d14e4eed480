"""The one batcher: pads, shards and chunks batches and applies the execution policy.

`jaxvae.anomaly_maps` and `jaxvae.project` are the pure maths; this module is how they are
run on many images: an `ExecutionPolicy` (jaxvae.execution) picks the convolution forms,
the chunk size and the projection's step schedule; several local devices split each batch
(padded by repeating its last image, so that no batch statistic changes); `batches` cuts a
stack of slices into fixed-size, padded batches so one compiled program serves them all.
The evaluation, `jaxvae score` and the demo all go through here, and so do the maps of
one volume on its own grid: `volume_maps` (Python) and `score_volume` (NIfTI files), with
the lesion probability and mask of a run's segmenter (jaxvae.segment); `find_inputs`
picks the volumes of a folder to score.
"""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxvae import execution, parallel, projection
from jaxvae.data import nifti
from jaxvae.data.datasets import check_modality, find_brats_cases, modality_of, same_modality
from jaxvae.data.preprocess import PreprocessParams, brain_mask, maps_to_volume, preprocess_volume
from jaxvae.errors import ConfigError, OutputError
from jaxvae.io import all_or_nothing, confined
from jaxvae.predictors import COMBI_GROUP, anomaly_maps


def batches(n: int, batch_size: int):
    """Yield (indices, n_real) covering range(n) in batches of exactly `batch_size`.

    The last batch is padded by repeating index n - 1: the real rows are indices[:n_real].
    """
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        yield np.minimum(idx, n - 1), min(batch_size, n - start)


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


def _chunks(n, chunk):
    return [slice(0, n)] if chunk <= 0 or n <= chunk else [
        slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def maps(model, params, x, *, policy=None, mesh=None, key=None, combi_group=COMBI_GROUP,
         **kwargs) -> dict:
    """`jaxvae.anomaly_maps` of a batch, run as the execution policy says.

    Args:
      model, params: the ConvVAE (any conv_impl: the policy's form is used) and parameters.
      x: (N, 64, 64, 1) float32 images.
      policy: an ExecutionPolicy (default: execution.current()).
      mesh: a device mesh to split the batch over; None = every local device when there
        are several, else none.
      key: PRNG key of the Monte-Carlo draws (n_samples > 0); chunk i draws with
        fold_in(key, i).
      combi_group, **kwargs: as `anomaly_maps` (beta, predictors, smooth_sigma, n_samples,
        reference_kl). Chunks never split a combi group; combi_group=0 (the whole batch)
        runs the batch in one call.

    Returns:
      dict name -> (N, 64, 64) map (jax.Array), the same maps as one `anomaly_maps` call.
    """
    policy = execution.current() if policy is None else policy
    params, x, n, policy = _placed(params, x, policy, mesh)
    model = policy.inference_model(model)
    chunk = policy.chunk_size
    if chunk > 0 and "combi" in (kwargs.get("predictors") or "combi"):
        chunk = 0 if combi_group <= 0 else max(combi_group, chunk - chunk % combi_group)
    parts = _chunks(x.shape[0], chunk)
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
      (x_projected (N, 64, 64, 1), map (N, 64, 64)), as one `jaxvae.project` call.
    """
    projection.check_args(lam=lam, steps=steps, lr=lr, map_kind=map_kind)
    policy = execution.current() if policy is None else policy
    params, x, n, policy = _placed(params, x, policy, mesh)
    model = policy.inference_model(model)
    x = jnp.asarray(x)
    outs = []
    for s in _chunks(x.shape[0], policy.chunk_size):
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


# Stems of label maps beside the scans and of jaxvae's own outputs (`<stem>_<predictor>`,
# `_prob`, `_mask`): a folder scan never takes them for volumes to score.
_NOT_SCANS = ("_seg", "-seg", "_mask", "_brainmask", "_prob")


def _scans(folder: Path) -> list[Path]:
    """The NIfTI files of a folder that can be scans (no dot-files, labels, outputs)."""
    from jaxvae.evaluate import KNOWN_PREDICTORS

    skip = (*_NOT_SCANS, *(f"_{p}" for p in KNOWN_PREDICTORS))
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz"))
                  and not p.name.startswith(".")
                  and not nifti.volume_stem(p).lower().endswith(skip))


def find_inputs(path, *, modality=None, trained=None) -> list[Path]:
    """The volumes to score under `path`.

    Args:
      path: a volume (itself); a BraTS-layout folder of case folders: the `modality` image
        of each case; else a flat folder: its .nii / .nii.gz files except dot-files, label
        maps (`_seg`, `_mask`, `_brainmask`) and jaxvae's outputs (`_prob`,
        `_<predictor>`); where some are named as the sequence to score (`<x>_t2`), those
        named as another one are left out (one BraTS case folder: its one image).
      modality: the sequence to score (default `trained`); needed to score a sequence
        named otherwise than the run's.
      trained: the run's modality (cfg.data["modality"]; None: not checked).

    Returns:
      the volumes, sorted (BraTS: by case ID).

    Raises:
      ConfigError: no such path, no volume in the folder, a BraTS folder and no modality
        known, or a volume named as another sequence than the run's (`check_modality`).
      DataError: a case folder lacks the modality.
    """
    path = Path(path)
    seq = modality or trained
    if path.is_file():
        inputs = [path]
    elif path.is_dir():
        inputs = _scans(path)
        if not inputs and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
            if seq is None:  # BraTS layout: the one image of the sequence per case
                raise ConfigError(f"{path}: a BraTS-layout folder; say which sequence to "
                                  "score (modality, --modality)")
            inputs = [c.image_path for c in find_brats_cases(path, seq)]
        named = [modality_of(p) for p in inputs]
        if seq is not None and any(m is not None and same_modality(m, seq) for m in named):
            inputs = [p for p, m in zip(inputs, named, strict=True)
                      if m is None or same_modality(m, seq)]
        if not inputs:
            raise ConfigError(f"{path}: no .nii/.nii.gz volume to score in this folder (label "
                              "maps _seg/_mask/_brainmask and jaxvae outputs are skipped)")
    else:
        raise ConfigError(f"{path}: no such file or folder")
    for p in inputs:
        check_modality(p, trained, modality)
    return inputs


def _segmenter(segmenter):
    """A Segmenter from a Segmenter, a segmenter.json dict (`segment.fit`) or None."""
    from jaxvae import segment

    if segmenter is None or isinstance(segmenter, segment.Segmenter):
        return segmenter
    try:
        return segment.Segmenter.from_json(segmenter)
    except ValueError as e:
        raise ConfigError(f"not a valid segmenter: {e}") from None


def _settings(settings, segmenter):
    """The EvalSettings to use: given ones, checked against the segmenter's, or the
    defaults with the segmenter's map settings."""
    from jaxvae.evaluate import EvalSettings

    if settings is None:
        return EvalSettings(**(segmenter.settings if segmenter else {}))
    if segmenter is not None:
        segmenter.check_settings(settings)
    return settings


def _volume_maps(model, params, volume, *, beta, settings, preprocess, mask, segmenter):
    """The one path from a loaded Volume to its maps (`volume_maps`, `score_volume`).

    Returns:
      ({name: map on the input's grid}, the (S, 64, 64) slices, {name: (S, 64, 64) map}).
    """
    from jaxvae.evaluate import compute_maps

    name = nifti.source_name(volume.path) if volume.path else "the input volume"
    mask_native = nifti.load_seg(mask, volume) if mask is not None else None
    images, brain, _, geometry = preprocess_volume(volume.data, preprocess or PreprocessParams(),
                                                   mask_native, name=name)
    asked = tuple(settings.predictors)
    # the segmenter's features are computed even where not asked for, and not returned
    need = tuple(dict.fromkeys([*asked, *(segmenter.predictors if segmenter else ())]))
    maps = compute_maps(model, params, images, beta=beta,
                        settings=dataclasses.replace(settings, predictors=need))
    brain_native = brain_mask(volume.data, mask_native, name=name)

    def native(m):
        return np.ascontiguousarray(volume.to_native(maps_to_volume(m, geometry, brain_native)))

    out = {p: native(maps[p]) for p in asked}
    slices = {p: maps[p] for p in asked}
    if segmenter is not None:
        slices["prob"] = segmenter.probability(maps, images, brain)
        # Thresholded on the input's grid, the probability interpolated first: the mask is
        # then exactly `prob >= threshold` of the written probability (a user thresholding
        # the _prob file gets the _mask file), with sub-pixel edges instead of a 64x64 mask
        # upsampled in blocks. Bilinear weights are >= 0 and sum to 1: prob stays in [0, 1].
        out["prob"] = np.clip(native(slices["prob"]), 0, 1)
        out["mask"] = segmenter.mask(out["prob"])
    return out, images, slices


def volume_maps(run, volume, *, settings=None, mask=None, segmenter="auto",
                volume_index=None) -> dict:
    """Anomaly maps (and lesion probability and mask) of one volume, on its own grid.

    Args:
      run: a run directory (its best checkpoint, `load_run`) or a (model, params, cfg)
        tuple as `load_run` returns it.
      volume: a .nii / .nii.gz path or an in-memory nibabel Nifti1Image / Nifti2Image.
      settings: EvalSettings (predictors, smoothing...); None: the defaults, with the
        segmenter's map settings when there is one.
      mask: optional brain mask (path or nibabel image) on the volume's grid.
      segmenter: "auto" (the run directory's segmenter.json if any; none for a tuple),
        None (no probability), a `segment.Segmenter` or a segmenter.json dict.
      volume_index: which volume of a 4D image.

    Returns:
      {predictor: float32 map, "prob": float32 lesion probability, "mask": uint8 0/1
      (these two with a segmenter)}, each of the input's shape, on its voxel grid and in
      its orientation (the input's affine places them).

    Raises:
      ConfigError: the settings differ from the segmenter's in what its features depend on.
      DataError, RunError: as `load_volume`, `load_run`, `segment.load`.
    """
    from jaxvae import segment
    from jaxvae.checkpoint import load_run
    from jaxvae.config import preprocess_of

    if isinstance(run, str | Path):
        model, params, cfg = load_run(run)
        segmenter = segment.load(run) if segmenter == "auto" else segmenter
    else:
        model, params, cfg = run
        segmenter = None if segmenter == "auto" else segmenter
    segmenter = _segmenter(segmenter)
    settings = _settings(settings, segmenter)
    loaded = nifti.load_volume(volume, volume_index=volume_index)
    out, _, _ = _volume_maps(model, params, loaded, beta=cfg.beta, settings=settings,
                             preprocess=preprocess_of(cfg), mask=mask, segmenter=segmenter)
    return out


def score_volume(model, params, path, out_dir, *, beta=1.0, mask=None, settings=None,
                 overwrite=False, png=False, volume_index=None, preprocess=None,
                 segmenter=None) -> list[Path]:
    """Anomaly maps of one NIfTI volume, written as NIfTI maps on the input's grid.

    Args:
      model, params, beta: the trained model.
      path: input volume (.nii / .nii.gz).
      out_dir: output folder; files are `<stem>_<predictor>.nii.gz` (float32), with a
        segmenter `<stem>_prob.nii.gz` (float32 lesion probability) and
        `<stem>_mask.nii.gz` (uint8 0/1), + `<stem>_maps.png`: the arrays of `volume_maps`.
      mask: optional brain mask file on the same grid.
      settings: EvalSettings (predictors, smoothing, projection steps...); None: as in
        `volume_maps`.
      overwrite: replace existing outputs.
      png: also write an overlay figure of the slices with the highest map values.
      preprocess: the run's PreprocessParams (None: the defaults).
      segmenter: a `segment.Segmenter` (or its dict), e.g. `segment.load(run_dir)`; None:
        maps only.

    Returns:
      The paths written. Every map is computed before the first file is written, each file
      is written atomically, and an error while writing removes the maps already written.

    Raises:
      ConfigError: the settings differ from the segmenter's (before any work).
      OutputError: an output exists and overwrite is False (before any work).
    """
    from jaxvae.figures import map_figure

    segmenter = _segmenter(segmenter)
    settings = _settings(settings, segmenter)
    out_dir = Path(out_dir)
    stem = nifti.volume_stem(path)
    names = [*settings.predictors, *(("prob", "mask") if segmenter else ())]
    targets = {p: confined(out_dir, f"{stem}_{p}.nii.gz") for p in names}
    png_target = confined(out_dir, f"{stem}_maps.png") if png else None
    outputs = [*targets.values(), *([png_target] if png else [])]
    if not overwrite:  # refuse before any work, not after minutes of scoring
        existing = [str(t) for t in outputs if t.exists()]
        if existing:
            raise OutputError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    volume = nifti.load_volume(path, volume_index=volume_index)
    native, images, maps = _volume_maps(model, params, volume, beta=beta, settings=settings,
                                        preprocess=preprocess, mask=mask, segmenter=segmenter)
    written = []
    with all_or_nothing(outputs):  # all maps of the volume, or none of them
        for name, target in targets.items():
            written.append(nifti.save_volume(target, native[name], volume.affine,
                                             overwrite=overwrite, dtype=native[name].dtype))
        if png:
            score = sum(m / max(float(m.max()), 1e-12) for m in maps.values())
            order = np.argsort(-score.reshape(len(score), -1).max(1))[:4]
            map_figure(png_target, images, None, maps,
                       index=sorted(order.tolist()), overwrite=overwrite,
                       title=str(Path(path).name))
            written.append(png_target)
    return written
