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

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from jaxvae.data.nifti import save_volume
from jaxvae.errors import ConfigError
from jaxvae.io import write_text

# Tissue codes of `Subject.tissue`.
BACKGROUND, CSF, GM, WM, DEEP_GM = 0, 1, 2, 3, 4
# Lesion codes of `Subject.lesion` (0 = no lesion).
NECROSIS, OEDEMA, ENHANCING, SPOT, HYPO = 1, 2, 3, 4, 5
# Lesion code -> BraTS segmentation label (1 necrosis/non-enhancing core, 2 oedema/FLAIR
# hyperintensity, 4 enhancing); a spot is a FLAIR hyperintensity, a hypointense region a
# non-enhancing abnormality. seg > 0 is the whole lesion.
BRATS_LABEL = np.array([0, 1, 2, 4, 2, 1], dtype=np.uint8)

MODALITIES = ("t2", "flair")
LESION_KINDS = ("tumour", "spots", "hypo")
# Lesion kinds of the lesion cases of `write_brats`, cycled: mostly tumours, as in BraTS.
DEFAULT_LESION_KINDS = (("tumour",), ("tumour", "spots"), ("tumour", "hypo"), ("spots", "hypo"))

DEFAULT_SHAPE = (96, 96, 64)
DEFAULT_SPACING = (2.0, 2.0, 2.0)

# Mean signal per tissue code (background, CSF, GM, WM, deep GM), arbitrary units. T2: fluid
# brightest, WM darker than GM; FLAIR: fluid suppressed, WM < GM.
_TISSUE_SIGNAL = {
    "t2": np.array([0.0, 1.00, 0.55, 0.40, 0.47]),
    "flair": np.array([0.0, 0.14, 0.58, 0.44, 0.52]),
}
# Mean signal per lesion code (-, necrosis, oedema, enhancing, spot, hypo). On T2 necrosis is
# fluid-like (as bright as CSF) and oedema sits between GM and CSF; on FLAIR oedema and spots are
# the brightest tissue. The hypointense region is darker than WM on both.
_LESION_SIGNAL = {
    "t2": np.array([0.0, 0.95, 0.80, 0.68, 0.76, 0.20]),
    "flair": np.array([0.0, 0.52, 0.92, 0.80, 0.88, 0.22]),
}
# Independent random streams per purpose, so that e.g. adding lesions never changes the noise.
_STREAM_ANATOMY, _STREAM_LESION, _STREAM_RENDER = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Subject:
    """One phantom subject's anatomy (and lesions), before rendering.

    Attributes:
      tissue: uint8 (X, Y, Z) healthy tissue codes (BACKGROUND, CSF, GM, WM, DEEP_GM).
      lesion: uint8 (X, Y, Z) lesion codes (0 none, NECROSIS, OEDEMA, ENHANCING, SPOT, HYPO);
        lesions replace the tissue where non-zero, the healthy tissue below is kept.
      depth: float32 (X, Y, Z) depth below the brain surface in anatomical mm (< 0 outside).
      affine: float64 (4, 4) voxel -> world (mm) matrix in nibabel's RAS+ convention, stored the
        way BraTS files are: diag(-sx, -sy, sz), so voxel axis 0 runs right -> left, axis 1
        anterior -> posterior and axis 2 (axial) inferior -> superior; the volume centre is at 0.
      spacing: voxel size (sx, sy, sz) in mm.
    """

    tissue: np.ndarray
    lesion: np.ndarray
    depth: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def brain(self) -> np.ndarray:
        """bool (X, Y, Z): inside the (skull-stripped) brain."""
        return self.tissue != BACKGROUND


@dataclasses.dataclass(frozen=True)
class PhantomCase:
    """One rendered phantom case, the arrays a BraTS case on disk would hold.

    Attributes:
      image: float32 (X, Y, Z) image, exactly 0 outside the brain and > 0 inside.
      lesion: bool (X, Y, Z) whole-lesion mask (all False for a healthy case).
      brain: bool (X, Y, Z) brain mask.
      affine: float64 (4, 4) voxel -> world matrix (see `Subject.affine`).
      seg: uint8 (X, Y, Z) BraTS-style labels (0, 1, 2, 4); seg > 0 == lesion.
    """

    image: np.ndarray
    lesion: np.ndarray
    brain: np.ndarray
    affine: np.ndarray
    seg: np.ndarray


def _rng(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, *extra])


def _smooth_noise(rng: np.random.Generator, shape, scale) -> np.ndarray:
    """A zero-mean, unit-variance random field with features about `scale` voxels across.

    A sum of Gaussian bumps with random heights on a coarse lattice (spacing `scale`), evaluated
    separably as three small matrix products: smooth, free of lattice artefacts, and several
    times faster than filtering full-resolution white noise with a wide Gaussian.

    Args:
      rng: random generator (consumed).
      shape: output shape (3 ints).
      scale: lattice spacing in voxels, one per axis or a scalar.

    Returns:
      float32 array of `shape`.
    """
    scale = np.broadcast_to(np.maximum(np.asarray(scale, dtype=float), 0.5), (3,))
    weights = []
    for n, s in zip(shape, scale, strict=True):
        nodes = np.arange(-1, np.ceil(n / s) + 2) * s  # reach past both ends: no edge fade
        weights.append(np.exp(-0.5 * ((np.arange(n)[:, None] - nodes[None, :]) / s) ** 2)
                       .astype(np.float32))
    field = rng.standard_normal(tuple(w.shape[1] for w in weights), dtype=np.float32)
    # contiguous matmuls: no transposed copies as with tensordot
    field = (weights[0] @ field.reshape(field.shape[0], -1)).reshape(shape[0], *field.shape[1:])
    field = np.matmul(weights[1][None], field)  # (X, Y, cz)
    field = field @ weights[2].T  # (X, Y, Z)
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def brats_affine(shape, spacing) -> np.ndarray:
    """The BraTS-like voxel -> world matrix: diag(-sx, -sy, sz), volume centred on the origin.

    Args:
      shape: volume shape (X, Y, Z).
      spacing: voxel size (sx, sy, sz) in mm.

    Returns:
      float64 (4, 4) affine.
    """
    sign = np.array([-1.0, -1.0, 1.0])
    step = sign * np.asarray(spacing, dtype=float)
    affine = np.diag([*step, 1.0])
    affine[:3, 3] = -step * (np.asarray(shape) - 1) / 2
    return affine


def _check_geometry(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
    if len(shape) != 3 or min(shape) < 16:
        raise ConfigError(f"phantom shape {shape}: need 3 axes of at least 16 voxels")
    if min(spacing) <= 0:
        raise ConfigError(f"phantom spacing {spacing}: voxel sizes must be > 0 mm")
    return shape, spacing


def _ellipsoid(x, y, z, centre, semi) -> np.ndarray:
    """bool: inside the axis-aligned ellipsoid (centre, semi-axes in the units of x, y, z)."""
    # plain floats keep float32 coordinates float32 (NumPy 2 promotes with NumPy scalars)
    (cx, cy, cz), (sx, sy, sz) = (float(v) for v in centre), (float(v) for v in semi)
    return ((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2 + ((z - cz) / sz) ** 2 < 1


def make_subject(seed: int, *, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING) -> Subject:
    """Generate one healthy subject's anatomy, deterministic by seed.

    Head size, shape, position and a small rotation, cortical folding, atrophy (CSF rim,
    sulcal width, ventricle size) and deep nuclei vary per subject. Anatomy is defined in mm
    for an adult brain (~135 x 165 x 110 mm) and shrunk only if the field of view is smaller.

    Args:
      seed: subject seed.
      shape: volume shape (X, Y, Z); axis 2 is axial.
      spacing: voxel size in mm, one per axis or a scalar.

    Returns:
      A `Subject` without lesions.
    """
    shape, spacing = _check_geometry(shape, spacing)
    rng = _rng(seed, _STREAM_ANATOMY)
    affine = brats_affine(shape, spacing)
    per_mm = 1 / np.asarray(spacing)  # voxels per mm, for noise feature sizes

    semi_x, semi_y, semi_z = rng.uniform(62, 70), rng.uniform(76, 88), rng.uniform(51, 58)
    offset = rng.uniform(-4, 4, size=3) * np.array([1.0, 1.0, 0.5])
    rot = _rotation(*np.deg2rad(rng.uniform(-1, 1, size=3) * [8, 6, 3]))  # yaw, pitch, roll
    atrophy = rng.uniform(0, 1)  # older-looking brains: wider CSF spaces, bigger ventricles
    # shrink the anatomy (not the voxels) when the field of view cannot hold an adult brain
    fov_half = np.asarray(shape) * np.asarray(spacing) / 2
    need = np.array([semi_x, semi_y, semi_z]) * 1.05 + np.abs(offset)
    fit = min(1.0, float(np.min(0.95 * fov_half / need)))

    # head-frame coordinates (anatomical mm; x right, y anterior, z superior) of every voxel,
    # taken from the affine so that the anatomy agrees with the header: rot^T (world - offset)
    world = [((affine[i, i] * np.arange(n) + affine[i, 3] - offset[i]) / fit).astype(np.float32)
             for i, n in enumerate(shape)]
    wx, wy, wz = world[0][:, None, None], world[1][None, :, None], world[2][None, None, :]
    x, y, z = ((float(rot[0, i]) * wx + float(rot[1, i]) * wy + float(rot[2, i]) * wz)
               for i in range(3))

    # outline: an egg (frontal lobes narrower than parietal), flatter below, slowly lobulated;
    # depth is measured along the ray from the centre, exact for the unperturbed ellipsoid
    a = semi_x * (1 - 0.08 / semi_y * y)
    c = np.where(z < 0, np.float32(0.92 * semi_z), np.float32(semi_z))
    r = np.sqrt((x / a) ** 2 + (y / semi_y) ** 2 + (z / c) ** 2)
    lobes = 1 + 0.035 * _smooth_noise(rng, shape, 20 * per_mm)
    depth = np.sqrt(x * x + y * y + z * z) * (lobes / np.maximum(r, 1e-3) - 1)
    brain = depth > 0

    wobble = _smooth_noise(rng, shape, 6 * per_mm)  # varies ribbon and sulcal depths
    # sulci: thin sheets where a band-limited noise field crosses zero, lined by grey matter;
    # the lattice spacing sets the gyral width (~1 cm)
    fold = np.abs(_smooth_noise(rng, shape, 3.5 * per_mm))
    rim = (1.0 + 2.0 * atrophy) * (1 + 0.4 * wobble)  # CSF between brain and skull
    gm_thick = rng.uniform(3.5, 4.5)
    sulc_depth = rng.uniform(14, 22) * (1 + 0.3 * wobble)
    sulc_width = 0.14 + 0.14 * atrophy
    # interhemispheric fissure: deep at the frontal and occipital poles, stopping above the
    # corpus callosum in between
    fiss_half = 0.6 + 1.0 * atrophy
    fiss_depth = 30 + 60 * np.clip((np.abs(y) / semi_y - 0.25) / 0.3, 0, 1)
    midline = np.abs(x)
    gm = ((depth < rim + gm_thick * (1 + 0.25 * wobble))
          | ((fold < sulc_width + 0.4) & (depth < sulc_depth + gm_thick))
          | ((midline < fiss_half + gm_thick) & (depth < fiss_depth + gm_thick)))
    csf = ((depth < rim) | ((fold < sulc_width) & (depth < sulc_depth))
           | ((midline < fiss_half) & (depth < fiss_depth)))

    # deep grey nuclei (thalamus, lentiform, caudate head) and the ventricles, per hemisphere
    deep = np.zeros(shape, dtype=bool)
    vent_scale = 0.6 + 1.0 * atrophy + 0.15 * rng.standard_normal()
    vent = (midline < 0.6 + 0.8 * vent_scale) & _ellipsoid(x, y, z, (0, -6, -4), (99, 13, 8))
    for side in (-1.0, 1.0):
        jx, jy, jz = rng.normal(0, 1.5, size=3)
        deep |= _ellipsoid(x, y, z, (side * 11 + jx, -10 + jy, jz), (8, 12, 9))
        deep |= _ellipsoid(x, y, z, (side * 22 + jx, 6 + jy, -2 + jz), (6, 14, 10))
        deep |= _ellipsoid(x, y, z, (side * 13 + jx, 16 + jy, 6 + jz), (5, 8, 8))
        # lateral ventricle: a banana along y, diverging and dipping at both horns
        t = (y + (6 + jy)) / (30 + 5 * vent_scale)
        half_width = 3.0 * vent_scale + 1.0
        xc = side * (1.5 + half_width) + side * 7 * t * t
        zc = (10 + jz) - 14 * t * t
        height = 7 * np.sqrt(max(vent_scale, 0.3))
        vent |= ((x - xc) / half_width) ** 2 + t * t + ((z - zc) / height) ** 2 < 1

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[brain] = WM
    tissue[brain & gm] = GM
    tissue[brain & deep] = DEEP_GM
    tissue[brain & (csf | vent)] = CSF
    return Subject(tissue=tissue, lesion=np.zeros(shape, dtype=np.uint8),
                   depth=np.where(brain, depth, np.minimum(depth, -1e-3)).astype(np.float32),
                   affine=affine, spacing=spacing)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3, 3) rotation: roll about y, then pitch about x, then yaw about z."""
    cz, sz, cx, sx, cy, sy = (np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch),
                              np.cos(roll), np.sin(roll))
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]))


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


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by `pad` voxels (clipped)."""
    box = []
    for axis in range(mask.ndim):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        box.append(slice(max(int(idx[0]) - pad, 0), int(idx[-1]) + pad + 1))
    return tuple(box)


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
    rng = _rng(seed, _STREAM_LESION)
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
        u_oedema = u / (1 + 0.25 * np.clip(_smooth_noise(rng, crop_shape, scale), -1.5, 1.5))
        u_core = u / (1 + 0.2 * np.clip(_smooth_noise(rng, crop_shape, scale), -1.5, 1.5))
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
        wobble = np.clip(_smooth_noise(rng, u.shape, 6 / np.asarray(spacing)), -1.5, 1.5)
        u = u / (1 + 0.25 * wobble)
        region = (u < 1) & free(box) & parenchyma[box]
        lesion[box][region] = HYPO

    return dataclasses.replace(subject, lesion=lesion)


def render(subject: Subject, modality: str = "t2", *, seed: int) -> np.ndarray:
    """Render a subject as a T2 or FLAIR image, deterministic by seed.

    Per-subject tissue signals, partial-volume blur of the healthy anatomy, fine texture, a
    smooth multiplicative bias field and Rician noise. The random draws do not depend on the
    lesions, so the same subject rendered with and without lesions (same seed) differs exactly
    on the lesion voxels.

    Args:
      subject: the anatomy (with or without lesions).
      modality: "t2" or "flair".
      seed: render seed (noise, bias, intensities); modalities get independent streams.

    Returns:
      float32 (X, Y, Z) image, exactly 0 outside the brain and > 0 inside.
    """
    if modality not in MODALITIES:
        raise ConfigError(f"unknown phantom modality {modality!r}: choose from {list(MODALITIES)}")
    rng = _rng(seed, _STREAM_RENDER, MODALITIES.index(modality))
    shape, per_mm = subject.tissue.shape, 1 / np.asarray(subject.spacing)
    brain = subject.brain

    gain = float(np.exp(rng.normal(0, 0.2)))  # scanner scale: irrelevant after z-scoring, but real
    tissue_signal = _TISSUE_SIGNAL[modality] * (1 + 0.05 * rng.standard_normal(5))
    lesion_signal = _LESION_SIGNAL[modality] * (1 + 0.07 * rng.standard_normal(6))
    texture = _smooth_noise(rng, shape, 4 * per_mm)
    bias = np.exp(rng.uniform(0.05, 0.2) * _smooth_noise(rng, shape, 50 * per_mm))
    noise_sigma = float(tissue_signal[GM] * rng.uniform(0.02, 0.04))
    noise = rng.standard_normal((2, *shape), dtype=np.float32) * noise_sigma

    # healthy signal with partial volume at tissue borders; outside the brain pad with CSF so
    # the brain edge is not darkened by the zero background
    clean = tissue_signal.astype(np.float32)[subject.tissue]
    clean[~brain] = tissue_signal[CSF]
    clean = ndimage.gaussian_filter(clean, 0.6, mode="nearest")
    clean *= 1 + 0.04 * texture

    if subject.lesion.any():
        # only the lesions' bounding box changes (padded to hold the edge blur)
        box = _bbox(subject.lesion > 0, pad=3)
        codes = subject.lesion[box]
        lesion = codes > 0
        # heterogeneous lesions, from a stream of their own so that a healthy render draws the
        # same numbers for everything else
        texture = _smooth_noise(_rng(seed, _STREAM_RENDER, MODALITIES.index(modality), 1),
                                codes.shape, 6 * per_mm)[lesion]
        # soft-edged (partial volume) lesions, changed only on lesion voxels
        weight = np.clip(ndimage.gaussian_filter(lesion.astype(np.float32), 0.7, mode="constant"),
                         0.4, 1)[lesion]
        local = clean[box]  # a view: writes go to `clean`
        delta = lesion_signal.astype(np.float32)[codes[lesion]] * (1 + 0.12 * texture) \
            - local[lesion]
        # every lesion voxel must visibly differ from the healthy tissue, else the mask would
        # claim a change the image does not show (e.g. necrosis next to CSF on T2)
        floor = 0.08 * tissue_signal[GM] / weight
        delta = np.where(delta >= 0, np.maximum(delta, floor), np.minimum(delta, -floor))
        local[lesion] += weight * delta

    clean *= bias * gain
    noise *= gain
    image = np.sqrt((clean + noise[0]) ** 2 + noise[1] ** 2)  # magnitude image: Rician noise
    # background exactly 0 and brain strictly > 0, so "non-zero" is the brain mask downstream
    return np.where(brain, np.maximum(image, 1e-6), 0).astype(np.float32)


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
    shape, spacing = _check_geometry(shape, spacing)
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
