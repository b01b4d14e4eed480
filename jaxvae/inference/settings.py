"""How maps are computed and scored: EvalSettings, and the predictors an evaluation knows.

EvalSettings is saved into results.json (and a segmenter's settings); it is the one source
of the evaluation flags of `jaxvae score` / `jaxvae evaluate` (jaxvae.cli).
"""

import dataclasses

from jaxvae.base.errors import ConfigError
from jaxvae.core.predictors import (
    PREDICTORS,
    SIGNED_PREDICTORS,
    SMOOTHED_MAPS,
    VARIANT_PREDICTORS,
    check_predictors,
    unsmoothed_name,
)

ALL_PREDICTORS = (*PREDICTORS, "proj_rec_error")  # the paper's: the default
KNOWN_PREDICTORS = (*ALL_PREDICTORS, *SIGNED_PREDICTORS, *VARIANT_PREDICTORS)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How maps are computed and scored (saved into results.json).

    Attributes:
      predictors: maps to compute, among KNOWN_PREDICTORS (default: the paper's).
      batch_size: slices per compiled call.
      smooth_sigma: Gaussian sigma (pixels) for the gradient maps; 0 = off.
      combi_group: combi's |kl_grad| is min-max normalised over consecutive groups of this
        many slices within each batch (64, with batch_size 64: the reference code's
        per-loader-batch normalisation); 0 = over each whole batch.
      n_samples, seed: Monte-Carlo z (0 = z is mu) and its key.
      proj_steps, proj_lam, proj_lr: Proj-Rec-Error (Adam steps on x, L1 weight, lr).
      ensemble: fit the logistic-regression ensembles on the validation cases (when they
        have lesions): "ensemble" on calibration.ENSEMBLE_FEATURES (log-scaled, balanced),
        "ensemble_plain" the paper's plain regression on the same features, and with
        `ensemble_intensity` "ensemble+intensity" (+ the image) and, when the one-signed
        maps are computed, "ensemble_signed+intensity" (SIGNED_ENSEMBLE_FEATURES); and
        "ensemble+null" (the features plus the null regression's smoothed intensities;
        with the dark maps also "ensemble_dark+null", DARK_ENSEMBLE_FEATURES plus them).
      val_quantile: with healthy validation cases, each map's threshold is this quantile of
        its values on their brain pixels (0.99: 1 % of healthy brain pixels flagged).
      n_boot: bootstrap resamples of the cases for the 95 % intervals (0: none).
      postprocess: also score each map multiplied by the eroded brain mask and median
        filtered (Baur et al. 2021), as rows "<name>+pp".
      tune_sigma: where the calibration cases have lesions, also score each residual and
        gradient map smoothed at the sigma of best calibration AUPRC, as rows
        "<name>_tuned" (the fair nulls' menu of smoothing; calibration.py).
    """

    predictors: tuple[str, ...] = ALL_PREDICTORS
    batch_size: int = 64
    smooth_sigma: float = 3.0
    combi_group: int = 64
    n_samples: int = 0
    seed: int = 0
    proj_steps: int = 100
    proj_lam: float = 1.0
    proj_lr: float = 0.03
    ensemble: bool = True
    ensemble_intensity: bool = True
    val_quantile: float = 0.99
    n_boot: int = 1000
    postprocess: bool = False
    tune_sigma: bool = True

    def __post_init__(self):
        preds = self.predictors
        if preds is None or isinstance(preds, str):  # the command line's comma list: sorted
            preds = check_predictors(preds, KNOWN_PREDICTORS, ALL_PREDICTORS)
        else:  # given as a sequence: checked, its order kept
            preds = tuple(preds)
            check_predictors(preds, KNOWN_PREDICTORS)
        object.__setattr__(self, "predictors", preds)
        for name, low in _AT_LEAST.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
                raise ConfigError(f"{name} (--{name.replace('_', '-')}) must be a number "
                                  f">= {low}, got {value!r}")
        if not self.proj_lr > 0 or not 0 < self.val_quantile < 1:
            raise ConfigError(f"need proj_lr > 0 and 0 < val_quantile < 1 (got proj_lr="
                              f"{self.proj_lr}, val_quantile={self.val_quantile})")


# the smallest value of each numeric setting
_AT_LEAST = {"batch_size": 1, "smooth_sigma": 0, "combi_group": 0, "n_samples": 0,
             "proj_steps": 0, "proj_lam": 0, "n_boot": 0}


def map_names(settings) -> list[str]:
    """The maps `compute_maps` gives: the predictors, and with `settings.tune_sigma` the
    unsmoothed twins of the smoothed ones (the tuned rows are smoothed from them)."""
    wanted = check_predictors(settings.predictors, KNOWN_PREDICTORS)
    twins = [unsmoothed_name(p) for p in wanted if p in SMOOTHED_MAPS]
    return [*wanted, *(twins if settings.tune_sigma else [])]
