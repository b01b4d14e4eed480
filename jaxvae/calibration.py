"""What is fitted on the validation cases: each map's threshold and the ensembles.

Nothing here sees a test label. Where the validation cases have lesions, each map's
threshold is its best-Dice threshold on them and the logistic-regression ensembles are
fitted on their brain pixels; where they are healthy, the threshold is a quantile of their
maps inside the brain and there is no ensemble. The maps of a set of slices are the
predictors' plus the intensity baseline and, when asked, the post-processed rows
(`_rows_of`), the same for validation and test slices. With several sequences as channels
the intensity baseline is "intensity", the mean of the channels, and one row per sequence,
"intensity_<sequence>" (`intensity_rows`).
"""

import dataclasses

import numpy as np
import scipy.ndimage as ndi

from jaxvae.ensemble import fit_samples
from jaxvae.metrics import Accumulator

ENSEMBLE_FEATURES = ("rec_error", "kl_grad", "rec_grad")
# with the one-signed maps computed: an intensity-aware ensemble of them
SIGNED_ENSEMBLE_FEATURES = ("rec_pos", "rec_grad_pos", "kl_grad", "intensity")
MAX_FIT_PIXELS = 200_000  # brain pixels of the validation cases an ensemble is fitted on


def postprocess_maps(maps, brain, *, erode=3, median=5):
    """Baur et al. (2021) post-processing: zero outside the eroded brain, then median filter.

    Every step is in-plane, so a batch of slices gives the slices' rows of the whole stack.

    Args:
      maps: (S, H, W) map; brain: (S, H, W) bool.
      erode: erosion iterations of the brain mask (pixels), in-plane.
      median: in-plane median filter size.
    """
    struct = np.zeros((3, 3, 3), bool)
    struct[1] = ndi.generate_binary_structure(2, 1)  # in-plane only: slices are independent
    inner = ndi.binary_erosion(brain, struct, iterations=erode)
    return ndi.median_filter(maps * inner, size=(1, median, median)).astype(np.float32)


@dataclasses.dataclass
class Calibration:
    """What is fitted on the validation cases: thresholds and ensembles.

    Attributes:
      thresholds: {row: score threshold} (a pixel is called lesion where score >= it).
      ensembles: {"ensemble" / "ensemble+intensity": Ensemble} (only with val lesions).
      method: "val_best_dice" (the threshold of best Dice on the validation cases, which
        have lesions), "val_quantile" (`settings.val_quantile` of the validation maps inside
        the brain: healthy validation cases) or "none" (no validation cases).
      val_cases: the validation case IDs.
      val_results: pooled metrics of every row on the validation cases.
    """

    thresholds: dict = dataclasses.field(default_factory=dict)
    ensembles: dict = dataclasses.field(default_factory=dict)
    method: str = "none"
    val_cases: tuple = ()
    val_results: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"method": self.method, "val_cases": list(self.val_cases),
                "thresholds": self.thresholds, "val_pooled": self.val_results,
                "ensemble_weights": {k: e.to_json() for k, e in self.ensembles.items()}}


def intensity_rows(images, sequences=()) -> dict:
    """The intensity baseline (Meissen et al. 2021): the pre-processed image as its own map.

    Args:
      images: (S, H, W) slices of one sequence, or (S, H, W, C) of C sequences.
      sequences: the C sequences' names (empty: "c0", "c1"...).

    Returns:
      {"intensity": (S, H, W)} for one sequence. For C sequences also
      {"intensity_<seq>": channel c}, and "intensity" is the mean over the channels of the
      normalised images (each is z-scored over the brain, so no sequence dominates): one
      combined row, also the ensembles' "intensity" feature.
    """
    images = np.asarray(images, np.float32)
    if images.ndim == 3:
        return {"intensity": images}
    names = sequences or [f"c{c}" for c in range(images.shape[-1])]
    return {"intensity": images.mean(-1),
            **{f"intensity_{s}": images[..., c] for c, s in enumerate(names)}}


def intensity_names(slices) -> list[str]:
    """The intensity rows of a SliceSet (see `intensity_rows`)."""
    return list(intensity_rows(slices.images[:0], slices.sequences))


def _rows_of(maps, slices, settings):
    """The maps plus the intensity baseline and (when asked) the post-processed rows."""
    maps = {**maps, **intensity_rows(slices.images, slices.sequences)}
    if settings.postprocess:
        maps.update({f"{name}+pp": postprocess_maps(maps[name], slices.brain)
                     for name in list(maps)})
    return maps


# An ensemble is a model of brain pixels (it is fitted on them only): outside the brain its
# score is the lowest there is, as every map's is ~0 there, instead of an extrapolation of
# the regression to background values it never saw.
_OUTSIDE = np.float32(np.finfo(np.float32).min)


def _ensemble_map(ensemble, maps, brain):
    """The ensemble's score of every pixel, the lowest score outside the brain."""
    pred = ensemble.predict({f: maps[f] for f in ensemble.feature_names})
    return np.where(brain, pred, _OUTSIDE).astype(np.float32)


def calibrate(val_maps, val, settings) -> Calibration:
    """Fit thresholds (and, where the validation cases have lesions, the ensembles) on them.

    Args:
      val_maps: {name: (V, H, W)} maps of the validation slices.
      val: their SliceSet.
      settings: EvalSettings (ensemble switches, val_quantile, seed).
    """
    maps = _rows_of(val_maps, val, settings)
    ensembles = {}
    has_lesion = bool(val.lesion.any())
    feats = [f for f in ENSEMBLE_FEATURES if f in maps]
    if has_lesion and settings.ensemble and len(feats) == len(ENSEMBLE_FEATURES):
        variants = {"ensemble": feats, "ensemble_plain": feats}
        if settings.ensemble_intensity:
            variants["ensemble+intensity"] = [*feats, "intensity"]
            if all(f in maps for f in SIGNED_ENSEMBLE_FEATURES):
                variants["ensemble_signed+intensity"] = list(SIGNED_ENSEMBLE_FEATURES)
        idx = np.flatnonzero(val.brain.reshape(-1))
        rng = np.random.default_rng(settings.seed)
        if idx.size > MAX_FIT_PIXELS:
            idx = np.sort(rng.choice(idx, size=MAX_FIT_PIXELS, replace=False))
        y = val.lesion.reshape(-1)[idx]
        for name, fs in variants.items():
            # "ensemble_plain": the paper's plain logistic regression (no log transform, no
            # class weights) on the same pixels, beside ours
            plain = name == "ensemble_plain"
            ensembles[name] = fit_samples({f: maps[f].reshape(-1)[idx] for f in fs}, y,
                                          fit_cases=val.cases, balanced=not plain,
                                          log_features=[] if plain else
                                          [f for f in fs if f != "intensity"])
            maps[name] = _ensemble_map(ensembles[name], maps, val.brain)
    pooled = {name: Accumulator().update(m, val.lesion, val.brain) for name, m in maps.items()}
    if has_lesion:
        thresholds = {k: a.result()["dice_threshold"] for k, a in pooled.items()}
        method = "val_best_dice"
    else:
        thresholds = {k: a.threshold_at_quantile(settings.val_quantile)
                      for k, a in pooled.items()}
        method = "val_quantile"
    return Calibration(thresholds=thresholds, ensembles=ensembles, method=method,
                       val_cases=tuple(val.cases),
                       val_results={k: a.result() for k, a in pooled.items()})
