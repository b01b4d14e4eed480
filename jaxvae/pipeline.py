"""Glue between the data layer, training and evaluation, shared by the CLI and experiments.

A dataset is named by a path (a BraTS-layout folder, a folder of healthy volumes, one
volume) or by the word "phantom" (the embedded phantom data, generated once into a cache
folder in the BraTS layout, so that it goes through exactly the same NIfTI path).

Splits (REFERENCE.md §4, by case, never by slice):
- folds > 1: K-fold cross-validation by case; training uses the lesion-free slices of the
  training cases, testing all brain slices of the test cases.
- folds == 1: cases without any lesion train (a healthy cohort, as HCP in the paper),
  cases with lesions test.
"""

import json
import os
from pathlib import Path

import numpy as np

from jaxvae.data import nifti, phantom
from jaxvae.data.datasets import (
    Case,
    SliceSet,
    find_brats_cases,
    find_volumes,
    load_slices,
    split_cases,
)
from jaxvae.data.preprocess import PreprocessParams, brain_mask, maps_to_volume, preprocess_volume
from jaxvae.errors import ConfigError, DataError, OutputError
from jaxvae.evaluate import EvalSettings, compute_maps
from jaxvae.figures import map_figure
from jaxvae.io import all_or_nothing, confined


def cache_root() -> Path:
    """Folder for generated phantom data and pre-processed slice caches."""
    if "JAXVAE_CACHE" in os.environ:
        return Path(os.environ["JAXVAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxvae"


def phantom_dataset(root=None, *, seed=0, n_healthy=16, n_lesion=8) -> Path:
    """The phantom dataset folder, written on first use (dataset.json marks it complete)."""
    root = Path(root) if root else cache_root() / f"phantom-s{seed}-h{n_healthy}-l{n_lesion}"
    if not (root / "dataset.json").is_file():
        phantom.write_brats(root, n_healthy=n_healthy, n_lesion=n_lesion, seed=seed,
                            overwrite=True)
    return root


def find_cases(data, modality="t2"):
    """Resolve a dataset name to (cases, description dict).

    Args:
      data: "phantom", a BraTS-layout folder, a folder of healthy volumes, or one volume.
      modality: image modality of a BraTS-layout dataset (t2, flair, t1, t1ce or aliases).
    """
    if str(data) == "phantom":
        root = phantom_dataset()
        return find_brats_cases(root, modality), {"source": "phantom", "path": str(root),
                                                  "modality": modality}
    path = Path(data)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (give a BraTS folder, a folder of "
                        "volumes, a .nii/.nii.gz volume, or 'phantom')")
    if path.is_file():
        desc = {"source": "volume", "path": str(path)}
        return [Case(case_id=volume_stem(path), image_path=path)], desc
    if any(p.is_dir() for p in path.iterdir()) or (path / "dataset.json").exists():
        return find_brats_cases(path, modality), {"source": "brats", "path": str(path),
                                                  "modality": modality}
    return find_volumes(path), {"source": "healthy", "path": str(path)}


def load_dataset(data, modality="t2", *, progress=False):
    """(SliceSet of every case, description) with the on-disk slice cache."""
    cases, desc = find_cases(data, modality)
    return load_slices(cases, cache_dir=cache_root() / "slices", progress=progress), desc


def split(slices: SliceSet, *, folds=1, fold=0, seed=0):
    """(train SliceSet of lesion-free slices, test SliceSet) by case; see the module doc."""
    if folds > 1:
        train_ids, test_ids = split_cases(slices.case_ids, folds, fold, seed)
    else:
        if fold != 0:
            raise ConfigError(f"fold {fold} given without --folds > 1")
        sick = np.unique(slices.case_ids[slices.lesion.any(axis=(1, 2))])
        train_ids = sorted(set(slices.cases) - set(sick.tolist()))
        test_ids = sorted(sick.tolist())
        if not train_ids:
            raise ConfigError("every case has a lesion, so there is no healthy cohort to train "
                              "on: use cross-validation (--folds 2) to train on the lesion-free "
                              "slices of half of the cases")
    train = slices.for_cases(train_ids).lesion_free()
    test = slices.for_cases(test_ids)
    return train, test


def split_description(desc, *, folds, fold, seed, train: SliceSet, test: SliceSet) -> dict:
    """JSON-able record of which data and split a run used (stored in its config)."""
    return json.loads(json.dumps({**desc, "folds": folds, "fold": fold, "split_seed": seed,
                                  "train_cases": train.cases, "test_cases": test.cases,
                                  "n_train_slices": len(train)}))


def volume_stem(path) -> str:
    """File name without .nii / .nii.gz (the prefix of a volume's output files)."""
    return Path(path).name.removesuffix(".gz").removesuffix(".nii")


def score_volume(model, params, path, out_dir, *, beta=1.0, mask=None, settings=None,
                 overwrite=False, png=False, volume_index=None) -> list[Path]:
    """Anomaly maps of one NIfTI volume, written as NIfTI maps on the input's grid.

    Args:
      model, params, beta: the trained model.
      path: input volume (.nii / .nii.gz).
      out_dir: output folder; files are `<stem>_<predictor>.nii.gz` (+ `<stem>_maps.png`).
      mask: optional brain mask file on the same grid.
      settings: EvalSettings (predictors, smoothing, projection steps...).
      overwrite: replace existing outputs.
      png: also write an overlay figure of the slices with the highest map values.

    Returns:
      The paths written. Every map is computed before the first file is written, each file
      is written atomically, and an error while writing removes the maps already written.
    """
    settings = settings or EvalSettings()
    out_dir = Path(out_dir)
    stem = volume_stem(path)
    targets = {p: confined(out_dir, f"{stem}_{p}.nii.gz") for p in settings.predictors}
    png_target = confined(out_dir, f"{stem}_maps.png") if png else None
    outputs = [*targets.values(), *([png_target] if png else [])]
    if not overwrite:  # refuse before any work, not after minutes of scoring
        existing = [str(t) for t in outputs if t.exists()]
        if existing:
            raise OutputError(f"{existing[0]}: already exists (use --overwrite to replace it)")
    volume = nifti.load_volume(path, volume_index=volume_index)
    mask_native = nifti.load_seg(mask, volume) if mask else None
    images, brain, _, geometry = preprocess_volume(volume.data, PreprocessParams(), mask_native,
                                                   name=path)
    maps = compute_maps(model, params, images, beta=beta, settings=settings)
    brain_native = brain_mask(volume.data, mask_native, name=path)
    written = []
    with all_or_nothing(outputs):  # all maps of the volume, or none of them
        for name, target in targets.items():
            native = volume.to_native(maps_to_volume(maps[name], geometry, brain_native))
            written.append(nifti.save_volume(target, native, volume.affine, overwrite=overwrite))
        if png:
            score = sum(m / max(float(m.max()), 1e-12) for m in maps.values())
            order = np.argsort(-score.reshape(len(score), -1).max(1))[:4]
            map_figure(png_target, images, None, maps,
                       index=sorted(order.tolist()), overwrite=overwrite,
                       title=str(Path(path).name))
            written.append(png_target)
    return written
