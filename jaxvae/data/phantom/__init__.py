"""Procedural brain MRI phantoms with exact lesion masks: the embedded default dataset.

A phantom subject is a skull-stripped, brain-like tissue label map (CSF, cortical grey matter,
white matter, deep grey nuclei) built from an egg-shaped outline, a cortical ribbon folded by
smoothed-noise sulci, an interhemispheric fissure and paired lateral ventricles, all varying per
subject. `render` turns it into a T2 or FLAIR image (per-subject tissue intensities, partial
volume blur, texture, smooth multiplicative bias field, Rician noise; background exactly 0).
`add_lesions` places tumours (necrosis / enhancing rim / oedema), small hyperintense spots
(MS-like) and hypointense regions inside the brain, within a band of axial slices so that about
half of a lesion case's brain slices are lesion-free, as in BraTS. Rendering the same subject
with the same seed with and without lesions differs exactly on the lesion mask.

The phantom is made hard on purpose: on T2, CSF is as bright as a tumour and a hypointense lesion
is darker than white matter, so the image itself used as an anomaly score (the intensity
baseline, Meissen et al. 2021) is informative but far from perfect; a model of healthy anatomy
sees every lesion as a break in the structure.

`write_brats` writes a dataset in the BraTS layout (`<ID>/<ID>_<modality>.nii.gz`,
`<ID>/<ID>_seg.nii.gz`) so the pipeline reads it exactly like real data.
"""


from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxvae.base.errors import ConfigError
from jaxvae.base.io import write_text
from jaxvae.data.nifti import save_volume
from jaxvae.data.phantom.anatomy import (  # re-exported: the phantom's public names
    BACKGROUND,
    BRATS_LABEL,
    CSF,
    DEEP_GM,
    DEFAULT_LESION_KINDS,
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    ENHANCING,
    GM,
    HYPO,
    LESION_KINDS,
    MODALITIES,
    NECROSIS,
    OEDEMA,
    SPOT,
    WM,
    PhantomCase,
    Subject,
    brats_affine,
    check_geometry,
    make_subject,
)
from jaxvae.data.phantom.lesions import add_lesions
from jaxvae.data.phantom.render import render


def _case_seed(seed: int, group: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), group, index]).generate_state(1)[0])


def make_case(seed: int, *, lesion_kinds: Sequence[str] = ("tumour",), modality: str = "t2",
              shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> PhantomCase:
    """Generate one rendered phantom case, deterministic by seed.

    Args:
      seed: case seed (anatomy, lesions and noise use independent streams of it).
      lesion_kinds: kinds for `add_lesions`; () for a healthy case.
      modality: "t2" or "flair".
      shape: volume shape (X, Y, Z).
      spacing: voxel size in mm.

    Returns:
      A `PhantomCase` with (X, Y, Z) arrays.
    """
    subject = make_subject(seed, shape=shape, spacing=spacing)
    if lesion_kinds:
        subject = add_lesions(subject, lesion_kinds, seed=seed)
    return PhantomCase(image=render(subject, modality, seed=seed), lesion=subject.lesion > 0,
                       brain=subject.brain, affine=subject.affine,
                       seg=BRATS_LABEL[subject.lesion])


def write_brats(out_dir, *, n_healthy: int = 16, n_lesion: int = 8, seed: int = 0,
                modalities: Sequence[str] = MODALITIES, overwrite: bool = False,
                lesion_kinds: Sequence[Sequence[str]] = DEFAULT_LESION_KINDS,
                shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> list[str]:
    """Write a phantom dataset in the BraTS layout, every file atomically.

    Writes `<out_dir>/<ID>/<ID>_<modality>.nii.gz` (float32) per modality, `<ID>/<ID>_seg.nii.gz`
    (uint8 BraTS labels 0/1/2/4, all 0 for healthy cases) and, last, `<out_dir>/dataset.json`
    (seed, counts, geometry, labels, per-case seeds and lesion kinds), so a dataset.json marks
    a complete dataset. IDs are `phantom_healthy_NNN` and `phantom_lesion_NNN`.

    Args:
      out_dir: output folder (created).
      n_healthy: number of healthy cases.
      n_lesion: number of lesion cases.
      seed: dataset seed; each case's seed derives from it and its ID.
      modalities: any of "t2", "flair" (the modalities of a case share one anatomy).
      overwrite: replace existing files; otherwise an existing file raises OutputError.
      lesion_kinds: lesion kinds per lesion case, cycled.
      shape: volume shape (X, Y, Z).
      spacing: voxel size in mm.

    Returns:
      The case IDs, sorted.

    Raises:
      ConfigError: bad counts, modality or lesion kind.
      OutputError: a file exists and overwrite is False, or cannot be written.
    """
    if n_healthy < 0 or n_lesion < 0 or n_healthy + n_lesion == 0:
        raise ConfigError(f"phantom counts n_healthy={n_healthy}, n_lesion={n_lesion}: need >= 0 "
                          "each and at least one case")
    bad = [m for m in modalities if m not in MODALITIES]
    if bad or not modalities:
        raise ConfigError(f"phantom modalities {list(modalities)}: choose from {list(MODALITIES)}")
    if n_lesion and not lesion_kinds:
        raise ConfigError("lesion_kinds is empty: give at least one tuple of lesion kinds")
    shape, spacing = check_geometry(shape, spacing)
    out_dir = Path(out_dir)
    plan = [(f"phantom_healthy_{i:03d}", _case_seed(seed, 0, i), ()) for i in range(n_healthy)]
    plan += [(f"phantom_lesion_{i:03d}", _case_seed(seed, 1, i),
              tuple(lesion_kinds[i % len(lesion_kinds)])) for i in range(n_lesion)]
    for case_id, case_seed, kinds in plan:
        subject = make_subject(case_seed, shape=shape, spacing=spacing)
        if kinds:
            subject = add_lesions(subject, kinds, seed=case_seed)
        for modality in modalities:
            image = render(subject, modality, seed=case_seed)
            save_volume(out_dir / case_id / f"{case_id}_{modality}.nii.gz", image,
                        subject.affine, overwrite=overwrite, dtype=image.dtype)
        labels = BRATS_LABEL[subject.lesion]
        save_volume(out_dir / case_id / f"{case_id}_seg.nii.gz", labels, subject.affine,
                    overwrite=overwrite, dtype=labels.dtype)
    meta = {
        "generator": "jaxvae.data.phantom.write_brats",
        "seed": seed, "n_healthy": n_healthy, "n_lesion": n_lesion,
        "modalities": list(modalities), "shape": list(shape), "spacing": list(spacing),
        "affine": subject.affine.tolist(),
        "seg_labels": {"0": "background / healthy", "1": "necrosis or hypointense region",
                       "2": "oedema or hyperintense spot", "4": "enhancing tumour"},
        "cases": [{"id": i, "seed": s, "lesion_kinds": list(k)} for i, s, k in plan],
    }
    write_text(out_dir / "dataset.json", json.dumps(meta, indent=1) + "\n", overwrite=overwrite)
    return sorted(case_id for case_id, _, _ in plan)


__all__ = ["BACKGROUND", "BRATS_LABEL", "CSF", "DEEP_GM", "DEFAULT_LESION_KINDS", "DEFAULT_SHAPE",
           "DEFAULT_SPACING", "ENHANCING", "GM", "HYPO", "LESION_KINDS", "MODALITIES",
           "NECROSIS", "OEDEMA", "SPOT", "WM", "PhantomCase", "Subject", "add_lesions",
           "brats_affine", "make_case", "make_subject", "render", "write_brats"]
