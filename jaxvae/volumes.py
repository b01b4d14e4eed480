"""Anomaly maps of one volume on its own grid: `volume_maps` (Python), `score_volume` (files).

A volume is pre-processed as the run's training data was, scored through the one batcher
(jaxvae.score via `evaluate.compute_maps`), and its maps put back on the input's voxel grid
with its affine, with the lesion probability and mask of a run's segmenter
(jaxvae.segment). A run of several sequences ("flair,t2") reads one case's co-registered
volumes stacked as channels, each normalised on its own over the first one's brain
(`preprocess_volume`), and writes its maps on the first one's grid, named after the case.
`find_inputs` picks what to score under a path.
"""

import dataclasses
from pathlib import Path

import numpy as np

from jaxvae.data import nifti
from jaxvae.data import preprocess as pre
from jaxvae.data.datasets import find_brats_cases
from jaxvae.data.preprocess import PreprocessParams, brain_mask, maps_to_volume
from jaxvae.data.sequences import (
    check_modality,
    check_sequences,
    modality_of,
    modality_text,
    parse_modalities,
    same_modality,
)
from jaxvae.errors import ConfigError, OutputError
from jaxvae.io import all_or_nothing, confined

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


def find_inputs(path, *, modality=None, trained=None) -> list:
    """The volumes to score under `path`.

    Args:
      path: a volume (itself); a BraTS-layout folder of case folders: the `modality` image
        of each case; else a flat folder: its .nii / .nii.gz files except dot-files, label
        maps (`_seg`, `_mask`, `_brainmask`) and jaxvae's outputs (`_prob`,
        `_<predictor>`); where some are named as the sequence to score (`<x>_t2`), those
        named as another one are left out (one BraTS case folder: its one image).
        With several sequences ("flair,t2"): a BraTS-layout folder or one case folder,
        each case holding every sequence.
      modality: the sequence to score (default `trained`); needed to score a sequence
        named otherwise than the run's. Several, "flair,t2", must be the run's.
      trained: the run's modality (cfg.data["modality"]; None: not checked).

    Returns:
      the volumes, sorted (BraTS: by case ID); with several sequences one tuple of paths
      per case, in the sequences' order (what `score_volume` takes).

    Raises:
      ConfigError: no such path, no volume in the folder, a BraTS folder and no modality
        known, a volume named as another sequence than the run's (`check_modality`), other
        sequences than a multi-sequence run's, or a single file for several sequences.
      DataError: a case folder lacks the modality (one of the sequences).
    """
    path = Path(path)
    seq = modality or trained
    check_sequences(trained, modality)
    if seq is not None and len(parse_modalities(seq)) > 1:
        if not path.exists():
            raise ConfigError(f"{path}: no such file or folder")
        if not path.is_dir():
            raise ConfigError(f"{path}: this run reads {modality_text(seq)}: give a case folder "
                              "holding each sequence (<ID>_<sequence>.nii.gz), or a BraTS "
                              "folder of such case folders")
        return [c.image_paths for c in find_brats_cases(path, seq)]
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


def _case_inputs(volume, modality, channels):
    """(sources, sequences or None, output stem) of what `volume_maps` / `score_volume` take.

    One path or image: itself, its file name's stem. Several (a tuple or list, one per
    channel) or a case folder (its `modality` images): the case, named after the folder or
    after the first file without its sequence suffix (`<ID>_flair` -> `<ID>`).
    """
    seqs = None
    if isinstance(volume, str | Path) and Path(volume).is_dir():
        if modality is None:
            raise ConfigError(f"{volume}: a case folder; say which sequences to read "
                              "(modality, --modality)")
        seqs = parse_modalities(modality)
        cases = find_brats_cases(volume, seqs)
        if len(cases) != 1:
            raise ConfigError(f"{volume}: a folder of {len(cases)} cases; score one case "
                              "folder at a time (find_inputs lists them)")
        sources, stem = list(cases[0].image_paths), cases[0].case_id
    else:
        sources = list(volume) if isinstance(volume, tuple | list) else [volume]
        stem = nifti.volume_stem(nifti.source_name(sources[0]))
        if len(sources) == channels == 1:  # one sequence: its file name is checked elsewhere
            return sources, None, stem
        seqs = None if modality is None else parse_modalities(modality)
        named = modality_of(stem)
        stem = stem[:-len(named) - 1] if named and len(sources) > 1 else stem
    if channels != len(sources):
        raise ConfigError(f"the model reads {channels} sequence(s) as channels; the input "
                          f"holds {len(sources)} volume(s)"
                          + (f" ({modality_text(seqs)})" if seqs else "") + ": "
                          + ", ".join(nifti.source_name(v) for v in sources))
    for i, v in enumerate(sources if seqs and len(seqs) == len(sources) > 1 else []):
        # a swapped pair would be read as the other sequence's channel: refuse it
        named = modality_of(nifti.source_name(v))
        if named is not None and not same_modality(named, seqs[i]):
            raise ConfigError(f"{nifti.source_name(v)}: channel {i} of this run is "
                              f"{seqs[i]} ({modality_text(seqs)}), the file's name says {named}")
    return sources, seqs, stem or "volume"


def _preprocess(preprocess, model):
    """The run's PreprocessParams at the model's image size (a 128 model reads 128x128)."""
    size = getattr(model, "image_size", None)
    if preprocess is None:
        return PreprocessParams(size=size or PreprocessParams().size)
    if size is not None and preprocess.size != size:
        raise ConfigError(f"the model reads {size}x{size} slices, the pre-processing makes "
                          f"{preprocess.size}x{preprocess.size}: give the run's settings")
    return preprocess


def _volume_maps(model, params, volumes, *, beta, settings, preprocess, mask, segmenter):
    """The one path from loaded Volumes (one per channel) to maps (`volume_maps`,
    `score_volume`), on the first one's grid, its brain the brain of every channel.

    Returns:
      ({name: map on the input's grid}, the (S, H, W[, C]) slices, {name: (S, H, W) map}).
    """
    from jaxvae.evaluate import compute_maps

    volume = volumes[0]
    name = nifti.source_name(volume.path) if volume.path else "the input volume"
    names = [nifti.source_name(v.path) if v.path else f"input volume {i}"
             for i, v in enumerate(volumes)]
    mask_native = nifti.load_seg(mask, volume) if mask is not None else None
    data = volume.data if len(volumes) == 1 else np.stack([v.data for v in volumes], -1)
    # looked up on the module: a spy on preprocess.preprocess_volume sees the scans too
    images, brain, _, geometry = pre.preprocess_volume(
        data, _preprocess(preprocess, model), mask_native,
        name=name if len(volumes) == 1 else names)
    asked = tuple(settings.predictors)
    # the segmenter's features are computed even where not asked for, and not returned
    need = tuple(dict.fromkeys([*asked, *(segmenter.predictors if segmenter else ())]))
    maps = compute_maps(model, params, images, beta=beta,
                        settings=dataclasses.replace(settings, predictors=need, tune_sigma=False))
    brain_native = brain_mask(volume.data, mask_native, name=name)

    def native(m):
        return np.ascontiguousarray(volume.to_native(maps_to_volume(m, geometry, brain_native)))

    out = {p: native(maps[p]) for p in asked}
    slices = {p: maps[p] for p in asked}
    if segmenter is not None:
        slices["prob"] = segmenter.probability(maps, images, brain)
        # Thresholded on the input's grid, the probability interpolated first: the mask is
        # then exactly `prob >= threshold` of the written probability (a user thresholding
        # the _prob file gets the _mask file), with sub-pixel edges instead of a size x size
        # mask upsampled in blocks. Bilinear weights are >= 0 and sum to 1: prob stays in [0, 1].
        out["prob"] = np.clip(native(slices["prob"]), 0, 1)
        out["mask"] = segmenter.mask(out["prob"])
    return out, images, slices


def volume_maps(run, volume, *, settings=None, mask=None, segmenter="auto",
                volume_index=None, modality=None) -> dict:
    """Anomaly maps (and lesion probability and mask) of one volume, on its own grid.

    Args:
      run: a run directory (its best checkpoint, `load_run`) or a (model, params, cfg)
        tuple as `load_run` returns it.
      volume: a .nii / .nii.gz path or an in-memory nibabel Nifti1Image / Nifti2Image; for a
        run of C sequences, C of them in the run's order (a tuple or list; co-registered)
        or a case folder holding each sequence.
      settings: EvalSettings (predictors, smoothing...); None: the defaults, with the
        segmenter's map settings when there is one.
      mask: optional brain mask (path or nibabel image) on the volume's grid.
      segmenter: "auto" (the run directory's segmenter.json if any; none for a tuple),
        None (no probability), a `segment.Segmenter` or a segmenter.json dict.
      volume_index: which volume of a 4D image.
      modality: the sequences of `volume` ("flair,t2"); default: the run's
        (cfg.data["modality"]). Checked against the run's, and against the file names.

    Returns:
      {predictor: float32 map, "prob": float32 lesion probability, "mask": uint8 0/1
      (these two with a segmenter)}, each of the input's shape, on its voxel grid and in
      its orientation (the input's affine places them); with several sequences, the
      first one's.

    Raises:
      ConfigError: the settings differ from the segmenter's in what its features depend on;
        other sequences (or another count of volumes) than the run's.
      DataError, RunError: as `load_volume` (`load_volumes`: not co-registered),
        `load_run`, `segment.load`.
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
    trained = (cfg.data or {}).get("modality")
    check_sequences(trained, modality)
    preprocess = preprocess_of(cfg)  # at the model's image size where none was recorded
    sources, _, _ = _case_inputs(volume, modality or trained, getattr(cfg, "in_channels", 1))
    loaded = nifti.load_volumes(sources, volume_index=volume_index)
    out, _, _ = _volume_maps(model, params, loaded, beta=cfg.beta, settings=settings,
                             preprocess=preprocess, mask=mask, segmenter=segmenter)
    return out


def score_volume(model, params, path, out_dir, *, beta=1.0, mask=None, settings=None,
                 overwrite=False, png=False, volume_index=None, preprocess=None,
                 segmenter=None, modality=None) -> list[Path]:
    """Anomaly maps of one NIfTI volume, written as NIfTI maps on the input's grid.

    Args:
      model, params, beta: the trained model.
      path: input volume (.nii / .nii.gz); for a model of C sequences (`in_channels`), C
        co-registered volumes in the run's order (a tuple or list, as `find_inputs` gives
        them) or a case folder holding each sequence (with `modality`): the maps are on
        the first one's grid, `<stem>` is the case (the folder's name, or the first file's
        without its `_<sequence>` suffix).
      out_dir: output folder; files are `<stem>_<predictor>.nii.gz` (float32), with a
        segmenter `<stem>_prob.nii.gz` (float32 lesion probability) and
        `<stem>_mask.nii.gz` (uint8 0/1), + `<stem>_maps.png`: the arrays of `volume_maps`.
      mask: optional brain mask file on the same grid.
      settings: EvalSettings (predictors, smoothing, projection steps...); None: as in
        `volume_maps`.
      overwrite: replace existing outputs.
      png: also write an overlay figure of the slices with the highest map values.
      preprocess: the run's PreprocessParams (None: the defaults at the model's image size);
        its size must be the model's `image_size`.
      segmenter: a `segment.Segmenter` (or its dict), e.g. `segment.load(run_dir)`; None:
        maps only.
      modality: the run's sequences ("flair,t2"): needed for a case folder; checked
        against the file names where given.

    Returns:
      The paths written. Every map is computed before the first file is written, each file
      is written atomically, and an error while writing removes the maps already written.

    Raises:
      ConfigError: the settings differ from the segmenter's, or the input's sequences or
        the pre-processing's size from the model's (before any work).
      OutputError: an output exists and overwrite is False (before any work).
    """
    from jaxvae.figures import map_figure

    segmenter = _segmenter(segmenter)
    settings = _settings(settings, segmenter)
    out_dir = Path(out_dir)
    sources, _, stem = _case_inputs(path, modality, getattr(model, "in_channels", 1))
    preprocess = _preprocess(preprocess, model)
    names = [*settings.predictors, *(("prob", "mask") if segmenter else ())]
    targets = {p: confined(out_dir, f"{stem}_{p}.nii.gz") for p in names}
    png_target = confined(out_dir, f"{stem}_maps.png") if png else None
    outputs = [*targets.values(), *([png_target] if png else [])]
    if not overwrite:  # refuse before any work, not after minutes of scoring
        existing = [str(t) for t in outputs if t.exists()]
        if existing:
            raise OutputError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    volumes = nifti.load_volumes(sources, volume_index=volume_index)
    volume = volumes[0]
    native, images, maps = _volume_maps(model, params, volumes, beta=beta, settings=settings,
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
                       title=stem if len(sources) > 1 else str(Path(path).name))
            written.append(png_target)
    return written
