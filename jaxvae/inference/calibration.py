"""What is fitted on the calibration / validation cases: thresholds, ensembles, fair nulls.

Nothing here sees a test label. Where the validation cases have lesions, each map's
threshold is its best-Dice threshold on them and the logistic-regression ensembles are
fitted on their brain pixels; where they are healthy, the threshold is a quantile of their
maps inside the brain and there is no ensemble. The maps of a set of slices are the
predictors' plus the intensity baseline and, when asked, the post-processed rows
(`_rows_of`), the same for validation and test slices. With several sequences as channels
the intensity baseline is "intensity", the mean of the channels, and one row per sequence,
"intensity_<sequence>" (`intensity_rows`).

Fair comparison (Meissen et al. 2021; GUIDE.md habit 15). Every row, single map or
ensemble, is restricted to the brain the same way (`restrict`: the lowest score outside it)
before any metric or threshold. Beside the model's maps every evaluation carries the fair
nulls, chosen on the calibration cases exactly as the model's settings are:
- "null_intensity": the image intensity in the polarity (bright: +, dark: -) and at the
  Gaussian sigma (NULL_SIGMAS, smoothed inside the brain) of best AUPRC on them;
- "null_lr": the intensity-only logistic regression (the null of "ensemble+intensity": the
  same balanced fit with the intensity at every NULL_SIGMA as its features, no model map);
  "ensemble+null" is that fit with the model's ensemble features added, so the two differ
  by what the model's maps tell beyond the null;
- "rec_error_smooth": Rec-Error smoothed as the gradient maps are (settings.smooth_sigma),
  so that gradient-vs-residual is compared at equal smoothing.
- "<map>_tuned" (with `settings.tune_sigma`): each residual and gradient map smoothed inside
  the brain at the NULL_SIGMA of best calibration AUPRC (from its unsmoothed twin, computed
  in the same pass): the model's maps get the nulls' menu of smoothing, so neither side
  wins by a sigma the other was not offered.
"best_null" is, case by case, the null of best calibration AUPRC, and "best_map" the
model row (predictor, smoothed residual or ensemble) of best calibration AUPRC: the
pre-declared primary comparison is best_map against best_null.
"""

import dataclasses

import numpy as np
import scipy.ndimage as ndi

from jaxvae.core.predictors import SMOOTHED_MAPS, is_unsmoothed, smooth, unsmoothed_name
from jaxvae.inference.ensemble import fit_samples
from jaxvae.metrics.histogram import Accumulator

ENSEMBLE_FEATURES = ("rec_error", "kl_grad", "rec_grad")
# with the one-signed maps computed: an intensity-aware ensemble of them
SIGNED_ENSEMBLE_FEATURES = ("rec_pos", "rec_grad_pos", "kl_grad", "intensity")
# with the dark one-signed maps computed (hypointense lesions: T1): the same without the image
DARK_ENSEMBLE_FEATURES = ("rec_neg", "rec_grad_neg", "kl_grad")
MAX_FIT_PIXELS = 200_000  # brain pixels of the validation cases an ensemble is fitted on
NULL_SIGMAS = (0.0, 1.0, 2.0, 3.0)  # the Gaussian sigmas (pixels) the nulls choose from
NULL_ROWS = ("null_intensity", "null_lr")
DEFAULT_NULL = {"polarity": 1, "sigma": 0.0}  # without lesions to choose on: the raw image
RESIDUAL_MAPS = ("rec_error", "rec_pos", "rec_neg")  # never smoothed by the predictors


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
    """What is fitted on the calibration (validation) cases: thresholds, ensembles, nulls.

    Attributes:
      thresholds: {row: score threshold} (a pixel is called lesion where score >= it).
      ensembles: {"ensemble" / "ensemble+intensity" / "null_lr"...: Ensemble} (only with
        lesions to fit on).
      method: "val_best_dice" (the threshold of best Dice on the calibration cases, which
        have lesions), "val_quantile" (`settings.val_quantile` of their maps inside the
        brain: healthy cases) or "none" (no calibration cases).
      val_cases: the calibration case IDs.
      val_results: pooled metrics of every row on the calibration cases.
      null: the intensity null's {"polarity": 1 | -1, "sigma"} (DEFAULT_NULL without
        lesions).
      best_null, best_map: the rows behind "best_null" / "best_map" (None without lesions).
      sigmas: {map: the NULL_SIGMA of its "<map>_tuned" row} (empty without lesions or
        without `settings.tune_sigma`).
    """

    thresholds: dict = dataclasses.field(default_factory=dict)
    ensembles: dict = dataclasses.field(default_factory=dict)
    method: str = "none"
    val_cases: tuple = ()
    val_results: dict = dataclasses.field(default_factory=dict)
    null: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_NULL))
    best_null: str | None = None
    best_map: str | None = None
    sigmas: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"method": self.method, "val_cases": list(self.val_cases),
                "thresholds": self.thresholds, "val_pooled": self.val_results,
                "ensemble_weights": {k: e.to_json() for k, e in self.ensembles.items()},
                "null_intensity": self.null, "best_null": self.best_null,
                "best_map": self.best_map, "tuned_sigmas": self.sigmas}


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


def smooth_in_brain(image, brain, sigma: float) -> np.ndarray:
    """The image smoothed inside the brain (normalised convolution): Gaussian of image *
    brain over Gaussian of brain, so the zero background does not darken the brain's rim
    (which would make a dark-lesion null light up along every edge). sigma 0: the image.

    Args:
      image, brain: (S, H, W) slices and their brain masks.
      sigma: Gaussian sigma in pixels (the kernel of `predictors.smooth`, the one that
        smooths the gradient maps).
    """
    image = np.asarray(image, np.float32)
    if sigma <= 0:
        return image
    b = np.asarray(brain, np.float32)
    num = np.asarray(smooth(image * b, sigma))
    den = np.asarray(smooth(b, sigma))
    return np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)


def null_map(intensity, brain, null: dict) -> np.ndarray:
    """The intensity null of a polarity and sigma: polarity * smooth_in_brain(intensity)."""
    return (float(null["polarity"]) * smooth_in_brain(intensity, brain, null["sigma"])
            ).astype(np.float32)


def _null_features(intensity, brain) -> dict:
    """The features of the intensity-only regression ("null_lr"): the intensity at every
    NULL_SIGMA."""
    return {f"intensity_sigma{s:g}": smooth_in_brain(intensity, brain, s) for s in NULL_SIGMAS}


def restrict(maps: dict, brain) -> dict:
    """Every map at the lowest score outside the brain: all rows restricted alike."""
    brain = np.asarray(brain, bool)
    return {k: np.where(brain, m, _OUTSIDE).astype(np.float32) for k, m in maps.items()}


def tunable(maps) -> dict:
    """{map: the array its "<map>_tuned" row is smoothed from} for the maps present: the
    residuals themselves, the gradient maps their unsmoothed twins."""
    out = {m: m for m in RESIDUAL_MAPS if m in maps}
    return {**out, **{m: unsmoothed_name(m) for m in SMOOTHED_MAPS
                      if unsmoothed_name(m) in maps}}


def _rows_of(maps, slices, settings, cal=None):
    """The maps plus the intensity baseline, the smoothed Rec-Error, the intensity null
    (cal's polarity and sigma), the tuned rows (cal's sigmas) and (when asked) the
    post-processed rows; unrestricted."""
    maps = {**maps, **intensity_rows(slices.images, slices.sequences)}
    if "rec_error" in maps and settings.smooth_sigma > 0:
        maps["rec_error_smooth"] = np.asarray(smooth(maps["rec_error"], settings.smooth_sigma))
    maps["null_intensity"] = null_map(maps["intensity"], slices.brain,
                                      DEFAULT_NULL if cal is None else cal.null)
    sources = tunable(maps)
    for m, sigma in ({} if cal is None else cal.sigmas).items():
        maps[f"{m}_tuned"] = smooth_in_brain(maps[sources[m]], slices.brain, sigma)
    if settings.postprocess:
        maps.update({f"{name}+pp": postprocess_maps(maps[name], slices.brain)
                     for name in list(maps)})
    return maps


def row_names(names, slices, settings, cal) -> list[str]:
    """The rows `all_rows` gives for predictor maps `names`, in that order."""
    rows = [*names, *intensity_names(slices)]
    if "rec_error" in names and settings.smooth_sigma > 0:
        rows.append("rec_error_smooth")
    rows.append("null_intensity")
    rows += [f"{m}_tuned" for m in cal.sigmas]
    if settings.postprocess:
        rows += [f"{name}+pp" for name in rows]
    rows += list(cal.ensembles)
    return rows + [k for k in ("best_null", "best_map") if getattr(cal, k)]


def all_rows(maps, slices, cal, settings) -> dict:
    """Every row of a set of slices under a calibration, restricted to the brain.

    Args:
      maps: {predictor: (S, H, W)} maps of `slices`.
      slices: their SliceSet.
      cal: the Calibration (null setting, ensembles, best rows).
      settings: EvalSettings.

    Returns:
      {row: (S, H, W) float32} in `row_names` order, each at the lowest score outside the
      brain.
    """
    rows = _rows_of(maps, slices, settings, cal)
    brain = np.asarray(slices.brain, bool)
    if "null_lr" in cal.ensembles:
        rows.update(_null_features(rows["intensity"], brain))
    for name, e in cal.ensembles.items():
        rows[name] = ensemble_map(e, rows, brain)
    for k in ("best_null", "best_map"):
        if getattr(cal, k):
            rows[k] = rows[getattr(cal, k)]
    names = row_names([k for k in maps if not is_unsmoothed(k)], slices, settings, cal)
    return restrict({k: rows[k] for k in names}, brain)


# An ensemble is a model of brain pixels (it is fitted on them only): outside the brain its
# score is the lowest there is, as every map's is ~0 there, instead of an extrapolation of
# the regression to background values it never saw. Every other row is restricted alike.
_OUTSIDE = np.float32(np.finfo(np.float32).min)


def ensemble_map(ensemble, maps, brain):
    """The ensemble's score of every pixel, the lowest score outside the brain."""
    pred = ensemble.predict({f: maps[f] for f in ensemble.feature_names})
    return np.where(brain, pred, _OUTSIDE).astype(np.float32)


def _auprc(m, val) -> float:
    return Accumulator().update(m, val.lesion, val.brain).result()["auprc"]


def _choose_smoothing(image, val, polarities=(1, -1)) -> dict:
    """The polarity and NULL_SIGMA of best calibration AUPRC of `image` smoothed inside the
    brain: the intensity null's choice, and (polarity 1) each tuned map's."""
    brain = np.asarray(val.brain, bool)
    best = None
    for sigma in NULL_SIGMAS:
        smoothed = smooth_in_brain(image, brain, sigma)
        for polarity in polarities:
            m = restrict({"m": polarity * smoothed}, brain)["m"]
            a = _auprc(m, val)
            if best is None or a > best[0]:  # the first of ties: bright, least smoothing
                best = (a, {"polarity": polarity, "sigma": sigma})
    return best[1]


def _is_model_row(name) -> bool:
    """Whether a row uses the model (not the intensity, a null or a best-of row)."""
    base = name.removesuffix("+pp")
    return not (base.startswith("intensity") or base in (*NULL_ROWS, "best_null", "best_map"))


def calibrate(val_maps, val, settings) -> Calibration:
    """Fit thresholds, nulls and (where the cases have lesions) the ensembles on them.

    Args:
      val_maps: {name: (V, H, W)} maps of the calibration / validation slices.
      val: their SliceSet.
      settings: EvalSettings (ensemble switches, val_quantile, seed).
    """
    maps = _rows_of(val_maps, val, settings)
    ensembles = {}
    has_lesion = bool(val.lesion.any())
    null, sigmas = dict(DEFAULT_NULL), {}
    if has_lesion:
        null = _choose_smoothing(maps["intensity"], val)
        if settings.tune_sigma:
            sigmas = {m: _choose_smoothing(maps[src], val, (1,))["sigma"]
                      for m, src in tunable(maps).items()}
        idx = np.flatnonzero(val.brain.reshape(-1))
        rng = np.random.default_rng(settings.seed)
        if idx.size > MAX_FIT_PIXELS:
            idx = np.sort(rng.choice(idx, size=MAX_FIT_PIXELS, replace=False))
        y = val.lesion.reshape(-1)[idx]
        nulls = _null_features(maps["intensity"], val.brain)
        maps.update(nulls)
        variants = {}
        feats = [f for f in ENSEMBLE_FEATURES if f in maps]
        if settings.ensemble and len(feats) == len(ENSEMBLE_FEATURES):
            variants = {"ensemble": feats, "ensemble_plain": feats}
            if settings.ensemble_intensity:
                variants["ensemble+intensity"] = [*feats, "intensity"]
                if all(f in maps for f in SIGNED_ENSEMBLE_FEATURES):
                    variants["ensemble_signed+intensity"] = list(SIGNED_ENSEMBLE_FEATURES)
            # the null's regression with the model's maps added: whether they tell it more
            variants["ensemble+null"] = [*feats, *nulls]
            if all(f in maps for f in DARK_ENSEMBLE_FEATURES):
                variants["ensemble_dark+null"] = [*DARK_ENSEMBLE_FEATURES, *nulls]
        variants["null_lr"] = list(nulls)
        for name, fs in variants.items():
            # "ensemble_plain": the paper's plain logistic regression (no log transform, no
            # class weights) on the same pixels, beside ours; the intensities (of null_lr
            # and the "+null" fits) may be negative: no log transform
            plain = name == "ensemble_plain"
            ensembles[name] = fit_samples({f: maps[f].reshape(-1)[idx] for f in fs}, y,
                                          fit_cases=val.cases, balanced=not plain,
                                          log_features=[] if plain else
                                          [f for f in fs if not f.startswith("intensity")])
    cal = Calibration(ensembles=ensembles, null=null, sigmas=sigmas)
    rows = all_rows(val_maps, val, cal, settings)
    pooled = {name: Accumulator().update(m, val.lesion, val.brain) for name, m in rows.items()}
    results = {k: a.result() for k, a in pooled.items()}
    if has_lesion:
        thresholds = {k: r["dice_threshold"] for k, r in results.items()}
        method = "val_best_dice"
        best = lambda names: max(names, key=lambda k: (results[k]["auprc"], -names.index(k)))
        cal.best_null = best([k for k in NULL_ROWS if k in results])
        model_rows = [k for k in results if _is_model_row(k)]
        cal.best_map = best(model_rows) if model_rows else None
        for k in ("best_null", "best_map"):
            if getattr(cal, k):
                thresholds[k] = thresholds[getattr(cal, k)]
                results[k] = results[getattr(cal, k)]
    else:
        thresholds = {k: a.threshold_at_quantile(settings.val_quantile)
                      for k, a in pooled.items()}
        method = "val_quantile"
    cal.thresholds, cal.method, cal.val_results = thresholds, method, results
    cal.val_cases = tuple(val.cases)
    return cal
