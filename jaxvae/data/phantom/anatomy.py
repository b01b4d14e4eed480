"""A phantom subject's healthy anatomy: tissue codes, the Subject and PhantomCase records,
the seeded random streams, smooth noise and the geometry helpers, and `make_subject`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxvae.base.errors import ConfigError

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

# Independent random streams per purpose, so that e.g. adding lesions never changes the noise.
STREAM_ANATOMY, STREAM_LESION, STREAM_RENDER = 1, 2, 3



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


def random_stream(seed: int, stream: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), stream, *extra])


def smooth_noise(rng: np.random.Generator, shape, scale) -> np.ndarray:
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


def check_geometry(shape, spacing) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
    if len(shape) != 3 or min(shape) < 16:
        raise ConfigError(f"phantom shape {shape}: need 3 axes of at least 16 voxels")
    if min(spacing) <= 0:
        raise ConfigError(f"phantom spacing {spacing}: voxel sizes must be > 0 mm")
    return shape, spacing


def ellipsoid(x, y, z, centre, semi) -> np.ndarray:
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
    shape, spacing = check_geometry(shape, spacing)
    rng = random_stream(seed, STREAM_ANATOMY)
    affine = brats_affine(shape, spacing)
    per_mm = 1 / np.asarray(spacing)  # voxels per mm, for noise feature sizes

    semi_x, semi_y, semi_z = rng.uniform(62, 70), rng.uniform(76, 88), rng.uniform(51, 58)
    offset = rng.uniform(-4, 4, size=3) * np.array([1.0, 1.0, 0.5])
    rot = rotation(*np.deg2rad(rng.uniform(-1, 1, size=3) * [8, 6, 3]))  # yaw, pitch, roll
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
    lobes = 1 + 0.035 * smooth_noise(rng, shape, 20 * per_mm)
    depth = np.sqrt(x * x + y * y + z * z) * (lobes / np.maximum(r, 1e-3) - 1)
    brain = depth > 0

    wobble = smooth_noise(rng, shape, 6 * per_mm)  # varies ribbon and sulcal depths
    # sulci: thin sheets where a band-limited noise field crosses zero, lined by grey matter;
    # the lattice spacing sets the gyral width (~1 cm)
    fold = np.abs(smooth_noise(rng, shape, 3.5 * per_mm))
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
    vent = (midline < 0.6 + 0.8 * vent_scale) & ellipsoid(x, y, z, (0, -6, -4), (99, 13, 8))
    for side in (-1.0, 1.0):
        jx, jy, jz = rng.normal(0, 1.5, size=3)
        deep |= ellipsoid(x, y, z, (side * 11 + jx, -10 + jy, jz), (8, 12, 9))
        deep |= ellipsoid(x, y, z, (side * 22 + jx, 6 + jy, -2 + jz), (6, 14, 10))
        deep |= ellipsoid(x, y, z, (side * 13 + jx, 16 + jy, 6 + jz), (5, 8, 8))
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


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3, 3) rotation: roll about y, then pitch about x, then yaw about z."""
    cz, sz, cx, sx, cy, sy = (np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch),
                              np.cos(roll), np.sin(roll))
    return (np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
            @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
            @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]]))




def bbox(mask: np.ndarray, pad: int) -> tuple[slice, ...]:
    """Slices of the bounding box of a non-empty mask, grown by `pad` voxels (clipped)."""
    box = []
    for axis in range(mask.ndim):
        idx = np.nonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))[0]
        box.append(slice(max(int(idx[0]) - pad, 0), int(idx[-1]) + pad + 1))
    return tuple(box)


