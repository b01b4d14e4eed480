"""A run's segmenter: the ensemble fitted on its validation lesions and its threshold.

`jaxvae score` turns a scan into anomaly maps; to also give a lesion probability and a
binary mask it needs what `calibrate` fits on the validation cases of the run: the
logistic-regression ensemble (preferably "ensemble+intensity") and its best-Dice
threshold. They are stored in the run directory as `segmenter.json`:

  {"format": 1, "name": "ensemble+intensity", "threshold": 0.73 (probability),
   "threshold_logit": 0.99 (the same on the ensemble's log-odds, as `calibrate` found it),
   "ensemble": Ensemble.to_json(), "settings": {smooth_sigma, combi_group, n_samples, seed},
   "val_cases": [...], "val_metrics": {auroc, dice_best, ...}}

`Ensemble.predict` gives log-odds; the segmenter's probability is their logistic
sigmoid, and the stored threshold is the sigmoid of calibrate's log-odds threshold, so
that probability >= threshold selects the pixels calibrate's threshold selects. With
balanced class weights (the default ensemble) it is the probability under equal priors
of lesion and healthy, a score in [0, 1], not a calibrated frequency.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from scipy.special import expit

from jaxvae.base.errors import ConfigError, OutputError, RunError
from jaxvae.base.io import write_text
from jaxvae.inference.calibration import ENSEMBLE_FEATURES, calibrate, ensemble_map, intensity_rows
from jaxvae.inference.compute import compute_maps
from jaxvae.inference.ensemble import Ensemble
from jaxvae.inference.settings import KNOWN_PREDICTORS

SEGMENTER_FILE = "segmenter.json"
PREFERRED = ("ensemble+intensity", "ensemble")  # the first one the calibration has
SETTINGS_FIELDS = ("smooth_sigma", "combi_group", "n_samples", "seed")  # stored
# Those the ensemble's features depend on: combi_group only changes "combi" (no feature),
# seed only the Monte-Carlo draws (the same estimator), so neither is refused.
CHECKED_FIELDS = ("smooth_sigma", "n_samples")
_FORMAT = 1


def _settings_of(settings) -> dict:
    """The SETTINGS_FIELDS of an EvalSettings or of its dict (results["settings"])."""
    get = settings.get if isinstance(settings, dict) else lambda k: getattr(settings, k)
    return {k: get(k) for k in SETTINGS_FIELDS}


def from_calibration(calibration_json, settings) -> dict | None:
    """The segmenter of an evaluation's calibration (`results["calibration"]`).

    Args:
      calibration_json: `Calibration.to_json()` of the validation cases.
      settings: the EvalSettings (or its dict) the calibrated maps were computed with.

    Returns:
      the segmenter.json dict, or None when the calibration has no ensemble (healthy
      validation cases, ensembles off, a feature map not computed, or a cross-validation's
      per-fold calibrations: each fold's model has its own).
    """
    weights = calibration_json.get("ensemble_weights") or {}
    name = next((n for n in PREFERRED if n in weights), None)
    if name is None or "folds" in calibration_json:
        return None
    logit = float(calibration_json["thresholds"][name])
    if not math.isfinite(logit):
        return None
    return {"format": _FORMAT, "name": name,
            "threshold": float(np.float32(expit(logit))), "threshold_logit": logit,
            "ensemble": weights[name], "settings": _settings_of(settings),
            "val_cases": list(calibration_json.get("val_cases", [])),
            "val_metrics": dict(calibration_json.get("val_pooled", {}).get(name, {}))}


def fit(model, params, val, *, beta, settings) -> dict:
    """Fit the segmenter on the validation cases of a run.

    Only the ensemble's feature maps (calibration.ENSEMBLE_FEATURES) are computed: no
    projection, which is slow and not a feature.

    Args:
      model, params, beta: the trained model.
      val: SliceSet of the validation cases; they must have lesions.
      settings: EvalSettings (smooth_sigma, n_samples, seed, batch_size; predictors and
        the ensemble switches are overridden).

    Returns:
      the segmenter.json dict (see `save`).

    Raises:
      ConfigError: the validation cases have no lesion pixel.
    """
    if val is None or not len(val) or not val.lesion.any():
        raise ConfigError("no lesion in the validation cases: nothing to fit a segmenter on")
    settings = dataclasses.replace(settings, predictors=ENSEMBLE_FEATURES, ensemble=True,
                                   ensemble_intensity=True, postprocess=False,
                                   tune_sigma=False)
    maps = compute_maps(model, params, val.images, beta=beta, settings=settings)
    out = from_calibration(calibrate(maps, val, settings).to_json(), settings)
    if out is None:
        raise ConfigError("the validation lesions gave no usable ensemble threshold")
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Segmenter:
    """A fitted ensemble and its validation threshold, applied to the maps of a volume.

    Attributes:
      name: "ensemble+intensity" or "ensemble".
      threshold: a pixel is lesion where its probability is >= it.
      ensemble: the logistic regression.
      settings: {smooth_sigma, combi_group, n_samples, seed} of the maps it was fitted on.
      val_cases, val_metrics: the validation cases and its pooled metrics on them.
      threshold_logit: the threshold on the ensemble's log-odds (for the record).
    """

    name: str
    threshold: float
    ensemble: Ensemble
    settings: dict
    val_cases: tuple = ()
    val_metrics: dict = dataclasses.field(default_factory=dict)
    threshold_logit: float | None = None

    @property
    def predictors(self) -> tuple[str, ...]:
        """The anomaly maps its features need (the image itself is "intensity")."""
        return tuple(f for f in self.ensemble.feature_names if f != "intensity")

    def check_settings(self, settings) -> None:
        """Refuse maps computed otherwise than those the ensemble was fitted on."""
        given = _settings_of(settings)
        diff = [k for k in CHECKED_FIELDS if given[k] != self.settings[k]]
        if diff:
            fitted = ", ".join(f"{k}={self.settings[k]}" for k in diff)
            asked = ", ".join(f"{k}={given[k]}" for k in diff)
            raise ConfigError(f"the run's segmenter was fitted on maps with {fitted}; these "
                              f"maps would have {asked}: use the segmenter's values (or "
                              "score without the segmenter)")

    def probability(self, maps, images, brain) -> np.ndarray:
        """The lesion probability of every pixel.

        Args:
          maps: {name: (S, H, W) map} holding at least `predictors`.
          images: (S, H, W) the pre-processed slices, or (S, H, W, C) of C sequences
            (the "intensity" feature: `calibration.intensity_rows`).
          brain: (S, H, W) bool brain mask.

        Returns:
          (S, H, W) float32 in [0, 1], 0 outside the brain.
        """
        feats = {**maps, "intensity": intensity_rows(images)["intensity"]}
        logit = ensemble_map(self.ensemble, feats, np.asarray(brain, bool))  # calibrate's
        return np.where(brain, expit(logit.astype(np.float64)), 0).astype(np.float32)

    def mask(self, prob) -> np.ndarray:
        """uint8 0/1 lesion mask of a probability map (any shape): prob >= threshold > 0."""
        prob = np.asarray(prob)
        # prob 0 is outside the brain: never lesion, whatever the threshold
        return ((prob >= np.float32(self.threshold)) & (prob > 0)).astype(np.uint8)

    def to_json(self) -> dict:
        return {"format": _FORMAT, "name": self.name, "threshold": float(self.threshold),
                "threshold_logit": self.threshold_logit, "ensemble": self.ensemble.to_json(),
                "settings": dict(self.settings),
                "val_cases": list(self.val_cases), "val_metrics": dict(self.val_metrics)}

    @classmethod
    def from_json(cls, d) -> "Segmenter":
        """Check and rebuild a segmenter.json dict; ValueError says what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        if d.get("format") != _FORMAT:
            raise ValueError(f"format {d.get('format')!r}, this jaxvae reads format {_FORMAT}")
        missing = [k for k in ("name", "threshold", "ensemble", "settings") if k not in d]
        if missing:
            raise ValueError(f"missing {missing}")
        threshold = d["threshold"]
        if not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise ValueError(f"threshold {threshold!r} is not a probability in [0, 1]")
        try:
            ensemble = Ensemble.from_json(d["ensemble"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"ensemble: {type(e).__name__} {e}") from None
        n = len(ensemble.feature_names)
        arrays = (ensemble.log_scale, ensemble.mean, ensemble.scale, ensemble.coef)
        if n == 0 or any(a.shape != (n,) or not np.isfinite(a).all() for a in arrays) \
                or not (ensemble.scale > 0).all() or not math.isfinite(ensemble.intercept):
            raise ValueError(f"ensemble: {n} features, but the weights are not {n} finite "
                             "numbers each (or a scale is not > 0)")
        unknown = [f for f in ensemble.feature_names
                   if f not in (*KNOWN_PREDICTORS, "intensity") or f == "proj_rec_error"]
        if unknown:
            raise ValueError(f"ensemble features {unknown} are not maps jaxvae computes")
        settings = d["settings"]
        if not isinstance(settings, dict) or any(k not in settings for k in SETTINGS_FIELDS):
            raise ValueError(f"settings must hold {list(SETTINGS_FIELDS)}, got {settings!r}")
        return cls(name=str(d["name"]), threshold=float(threshold), ensemble=ensemble,
                   settings={k: settings[k] for k in SETTINGS_FIELDS},
                   val_cases=tuple(d.get("val_cases", ())),
                   val_metrics=dict(d.get("val_metrics", {})),
                   threshold_logit=d.get("threshold_logit"))


def save(run_dir, segmenter, *, overwrite=False) -> Path:
    """Write a segmenter (its dict, or a Segmenter) as `<run_dir>/segmenter.json`, atomically.

    Raises:
      OutputError: run_dir is not a folder, or the file exists and overwrite is False.
      ConfigError: the segmenter is not valid (nothing is written).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OutputError(f"{run_dir}: not a run directory (no such folder)")
    d = segmenter.to_json() if isinstance(segmenter, Segmenter) else segmenter
    try:
        Segmenter.from_json(d)  # never write a file that `load` would refuse
    except ValueError as e:
        raise ConfigError(f"not a valid segmenter: {e}") from None
    path = run_dir / SEGMENTER_FILE
    write_text(path, json.dumps(d, indent=1) + "\n", overwrite=overwrite)
    return path


def load(run_dir) -> Segmenter | None:
    """The segmenter stored in a run directory, or None when it has none.

    Raises:
      RunError: segmenter.json is unreadable or invalid (names the file and the problem).
    """
    path = Path(run_dir) / SEGMENTER_FILE
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunError(f"{path}: unreadable segmenter ({e}); delete it, or fit it "
                       "again on the run's validation cases") from None
    try:
        return Segmenter.from_json(d)
    except ValueError as e:
        raise RunError(f"{path}: not a valid segmenter ({e}); delete it, or fit it "
                       "again on the run's validation cases") from None
