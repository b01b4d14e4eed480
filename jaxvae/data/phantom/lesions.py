"""Lesions placed in a phantom subject (`add_lesions`): tumours (necrosis / enhancing rim /
oedema), small hyperintense spots and hypointense regions, inside a band of axial slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jaxvae.base.errors import ConfigError
from jaxvae.data.phantom.anatomy import (
    BACKGROUND,
    CSF,
    DEEP_GM,
    ENHANCING,
    GM,
    HYPO,
    LESION_KINDS,
    NECROSIS,
    OEDEMA,
    SPOT,
    STREAM_LESION,
    WM,
    Subject,
    random_stream,
    smooth_noise,
)


def _crop(centre, reach_mm, spacing, shape):
    """Slices of the box within `reach_mm` of voxel `centre`, and its mm offsets from it."""
    lo = [max(0, int(np.floor(c - m / s)))
          for c, m, s in zip(centre, reach_mm, spacing, strict=True)]
    hi = [min(n, int(np.ceil(c + m / s)) + 1)
          for c, m, s, n in zip(centre, reach_mm, spacing, shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    d = [((np.arange(a, b) - c) * s).astype(np.float32)
         for a, b, c, s in zip(lo, hi, centre, spacing, strict=True)]
    return box, (d[0][:, None, None], d[1][None, :, None], d[2][None, None, :])




def _pick(rng, *candidates: np.ndarray) -> np.ndarray:
    """A random voxel index of the first non-empty candidate mask."""
    for mask in candidates:
        idx = np.argwhere(mask)
        if len(idx):
            return idx[rng.integers(len(idx))].astype(float)
    raise ConfigError("phantom too small to place a lesion: use a larger shape")


def add_lesions(subject: Subject, kinds: Sequence[str], *, seed: int) -> Subject:
    """Place lesions of the given kinds inside the brain, deterministic by seed.

    All lesions of a case lie in one band of axial slices covering about 40-60 % of the brain's
    slices, so about half of the brain slices stay lesion-free, as in BraTS.

    Args:
      subject: healthy subject (its existing lesions are kept and take precedence).
      kinds: any of "tumour" (irregular necrosis / enhancing rim core inside an oedema that
        spreads further in white matter), "spots" (4-12 small hyperintense white-matter foci),
        "hypo" (an irregular region darker than white matter, in parenchyma only).
      seed: lesion seed.

    Returns:
      A new `Subject` with `lesion` filled; the healthy tissue is unchanged.
    """
    unknown = sorted(set(kinds) - set(LESION_KINDS))
    if unknown:
        raise ConfigError(f"unknown lesion kind(s) {unknown}: choose from {list(LESION_KINDS)}")
    rng = random_stream(seed, STREAM_LESION)
    tissue, depth, spacing, shape = subject.tissue, subject.depth, subject.spacing, \
        subject.tissue.shape
    lesion = subject.lesion.copy()
    brain_z = np.nonzero(subject.brain.any(axis=(0, 1)))[0]
    n_brain = len(brain_z)
    # the band: half-height in slices, centred away from the brain's ends
    half = rng.uniform(0.20, 0.28) * n_brain
    centre_z = rng.uniform(brain_z[0] + 0.42 * n_brain, brain_z[-1] - 0.42 * n_brain)
    k = np.arange(shape[2])
    band = (np.abs(k - centre_z) <= 0.8 * half)[None, None, :]
    mid = (np.abs(k - centre_z) <= 1.0)[None, None, :]
    parenchyma = (tissue == WM) | (tissue == GM) | (tissue == DEEP_GM)

    def free(box):
        return lesion[box] == 0

    if "tumour" in kinds:
        centre = _pick(rng, mid & (tissue == WM) & (depth > 20), mid & (depth > 10),
                       mid & subject.brain)
        reach_z = half * spacing[2]  # oedema half-height = the band
        semi = np.array([rng.uniform(0.8, 1.3) * reach_z, rng.uniform(0.9, 1.4) * reach_z,
                         reach_z])
        semi = np.clip(semi, 6, 40)
        box, (dx, dy, dz) = _crop(centre, semi * 1.4, spacing, shape)
        u = np.sqrt((dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2)
        crop_shape = u.shape
        # irregular outlines; the noise is clipped so the blob never reaches the crop's faces
        scale = 10 / np.asarray(spacing)
        u_oedema = u / (1 + 0.25 * np.clip(smooth_noise(rng, crop_shape, scale), -1.5, 1.5))
        u_core = u / (1 + 0.2 * np.clip(smooth_noise(rng, crop_shape, scale), -1.5, 1.5))
        core_frac = rng.uniform(0.35, 0.6)
        necrosis_frac = core_frac * rng.uniform(0.35, 0.7)
        t = tissue[box]
        # oedema follows white matter tracts and spares CSF spaces and (mostly) the cortex
        reach = np.where(t == WM, 1.0, np.where(t == CSF, 0.0, 0.85))
        oedema = (u_oedema < reach) & (t != BACKGROUND)
        core = (u_core < core_frac) & (t != BACKGROUND)  # the tumour mass displaces anything
        necrosis = core & (u_core < necrosis_frac)
        out = np.zeros(crop_shape, dtype=np.uint8)
        out[oedema] = OEDEMA
        out[core] = ENHANCING
        out[necrosis] = NECROSIS
        keep = free(box) & (out > 0)
        lesion[box][keep] = out[keep]

    if "spots" in kinds:
        for _ in range(rng.integers(4, 13)):
            centre = _pick(rng, band & (tissue == WM) & (depth > 12), band & parenchyma)
            semi = rng.uniform(1.5, 4.0, size=3)
            box, (dx, dy, dz) = _crop(centre, semi, spacing, shape)
            spot = (dx / semi[0]) ** 2 + (dy / semi[1]) ** 2 + (dz / semi[2]) ** 2 <= 1
            spot &= free(box) & (parenchyma[box])
            lesion[box][spot] = SPOT

    if "hypo" in kinds:
        radius = rng.uniform(5, 10)
        centre = _pick(rng, band & parenchyma & (depth > radius + 4), band & parenchyma)
        box, (dx, dy, dz) = _crop(centre, [radius * 1.4] * 3, spacing, shape)
        u = np.sqrt(dx * dx + dy * dy + dz * dz) / radius
        wobble = np.clip(smooth_noise(rng, u.shape, 6 / np.asarray(spacing)), -1.5, 1.5)
        u = u / (1 + 0.25 * wobble)
        region = (u < 1) & free(box) & parenchyma[box]
        lesion[box][region] = HYPO

    return dataclasses.replace(subject, lesion=lesion)


