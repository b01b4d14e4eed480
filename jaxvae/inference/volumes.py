"""Anomaly maps of one volume on its own grid: `volume_maps` (Python), `score_volume` (files).

A volume is pre-processed as the run's training data was, scored through the one batcher
(jaxvae.runtime.batching via `compute.compute_maps`), and its maps put back on the
input's voxel grid
with its affine, with the lesion probability and mask of a run's segmenter
(jaxvae.inference.segment). A run of several sequences ("flair,t2") reads one case's co-registered
volumes stacked as channels, each normalised on its own over the first one's brain
(`preprocess_volume`), and writes its maps on the first one's grid, named after the case.
`find_inputs` picks what to score under a path.
"""

import dataclasses
from pathlib import Path

import numpy as np

from jaxvae.base.errors import ConfigError
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
from jaxvae.inference import segment
from jaxvae.inference.compute import compute_maps
from jaxvae.inference.settings import KNOWN_PREDICTORS, EvalSettings
from jaxvae.training.checkpoint import load_run
from jaxvae.training.config import preprocess_of

# Stems of label maps beside the scans and of jaxvae's own outputs (`<stem>_<predictor>`,
# `_prob`, `_mask`): a folder scan never takes them for volumes to score.
_NOT_SCANS = ("_seg", "-seg", "_mask", "_brainmask", "_prob")


def _scans(folder: Path) -> list[Path]:
    """The NIfTI files of a folder that can be scans (no dot-files, labels, outputs)."""
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


def as_segmenter(segmenter):
    """A Segmenter from a Segmenter, a segmenter.json dict (`segment.fit`) or None."""
    if segmenter is None or isinstance(segmenter, segment.Segmenter):
        return segmenter
    try:
        return segment.Segmenter.from_json(segmenter)
    except ValueError as e:
        raise ConfigError(f"not a valid segmenter: {e}") from None


def settings_for(settings, segmenter):
    """The EvalSettings to use: given ones, checked against the segmenter's, or the
    defaults with the segmenter's map settings."""
    if settings is None:
        return EvalSettings(**(segmenter.settings if segmenter else {}))
    if segmenter is not None:
        segmenter.check_settings(settings)
    return settings


def case_inputs(volume, modality, channels):
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


def preprocess_for(preprocess, model):
    """The run's PreprocessParams at the model's image size (a 128 model reads 128x128)."""
    size = getattr(model, "image_size", None)
    if preprocess is None:
        return PreprocessParams(size=size or PreprocessParams().size)
    if size is not None and preprocess.size != size:
        raise ConfigError(f"the model reads {size}x{size} slices, the pre-processing makes "
                          f"{preprocess.size}x{preprocess.size}: give the run's settings")
    return preprocess


def maps_on_grid(model, params, volumes, *, beta, settings, preprocess, mask, segmenter):
    """The one path from loaded Volumes (one per channel) to maps (`volume_maps`,
    `score_volume`), on the first one's grid, its brain the brain of every channel.

    Returns:
      ({name: map on the input's grid}, the (S, H, W[, C]) slices, {name: (S, H, W) map}).
    """
    volume = volumes[0]
    name = nifti.source_name(volume.path) if volume.path else "the input volume"
    names = [nifti.source_name(v.path) if v.path else f"input volume {i}"
             for i, v in enumerate(volumes)]
    mask_native = nifti.load_seg(mask, volume) if mask is not None else None
    data = volume.data if len(volumes) == 1 else np.stack([v.data for v in volumes], -1)
    # looked up on the module: a spy on preprocess.preprocess_volume sees the scans too
    images, brain, _, geometry = pre.preprocess_volume(
        data, preprocess_for(preprocess, model), mask_native,
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
    if isinstance(run, str | Path):
        model, params, cfg = load_run(run)
        segmenter = segment.load(run) if segmenter == "auto" else segmenter
    else:
        model, params, cfg = run
        segmenter = None if segmenter == "auto" else segmenter
    segmenter = as_segmenter(segmenter)
    settings = settings_for(settings, segmenter)
    trained = cfg.data_info.modality
    check_sequences(trained, modality)
    preprocess = preprocess_of(cfg)  # at the model's image size where none was recorded
    sources, _, _ = case_inputs(volume, modality or trained, getattr(cfg, "in_channels", 1))
    loaded = nifti.load_volumes(sources, volume_index=volume_index)
    out, _, _ = maps_on_grid(model, params, loaded, beta=cfg.beta, settings=settings,
                             preprocess=preprocess, mask=mask, segmenter=segmenter)
    return out
