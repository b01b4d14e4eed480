"""A phantom subject rendered as a T2 or FLAIR image (`render`): tissue signals, partial
volume, texture, bias field and Rician noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from jaxvae.base.errors import ConfigError
from jaxvae.data.phantom.anatomy import (
    CSF,
    GM,
    MODALITIES,
    STREAM_RENDER,
    Subject,
    bbox,
    random_stream,
    smooth_noise,
)

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
    rng = random_stream(seed, STREAM_RENDER, MODALITIES.index(modality))
    shape, per_mm = subject.tissue.shape, 1 / np.asarray(subject.spacing)
    brain = subject.brain

    gain = float(np.exp(rng.normal(0, 0.2)))  # scanner scale: irrelevant after z-scoring, but real
    tissue_signal = _TISSUE_SIGNAL[modality] * (1 + 0.05 * rng.standard_normal(5))
    lesion_signal = _LESION_SIGNAL[modality] * (1 + 0.07 * rng.standard_normal(6))
    texture = smooth_noise(rng, shape, 4 * per_mm)
    bias = np.exp(rng.uniform(0.05, 0.2) * smooth_noise(rng, shape, 50 * per_mm))
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
        box = bbox(subject.lesion > 0, pad=3)
        codes = subject.lesion[box]
        lesion = codes > 0
        # heterogeneous lesions, from a stream of their own so that a healthy render draws the
        # same numbers for everything else
        texture = smooth_noise(random_stream(seed, STREAM_RENDER, MODALITIES.index(modality), 1),
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


