"""Logistic-regression ensemble of anomaly maps (REFERENCE §5).

Each pixel is a sample whose features are the values of several maps (rec_error, kl_grad,
rec_grad, ...) at that pixel; a logistic regression fitted on the lesion masks of ~10% of
the test cases combines them, and the remaining cases are scored with it. The fit cases
are chosen by case (patient), never by slice or pixel, so that no case is in both parts.

The fitted ensemble is stored as plain numbers (feature names, optional log scales,
standardisation mean/scale, coefficients, intercept), not as a pickled sklearn object, so
it can be written to JSON and read back by any version.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from jaxvae.errors import ConfigError


def split_fit_cases(case_ids, fit_fraction: float = 0.1, seed: int = 0
                    ) -> tuple[list[str], list[str]]:
    """Choose the cases the ensemble is fitted on; the others are for testing.

    Args:
      case_ids: (S,) case id of each slice (repeats allowed) or a list of unique ids.
      fit_fraction: fraction of cases to fit on, in (0, 1); rounded to a whole number of
        cases and clipped so both sides get at least one.
      seed: seed of the permutation of the sorted unique ids (same seed, same split).

    Returns:
      (fit_ids, test_ids): disjoint sorted lists of case ids whose union is all cases.
    """
    if not 0.0 < fit_fraction < 1.0:
        raise ConfigError(f"fit_fraction must be in (0, 1), got {fit_fraction}")
    ids = np.unique(np.asarray(case_ids).astype(str))  # sorted: the split ignores input order
    if ids.size < 2:
        raise ConfigError(f"the ensemble needs at least 2 cases (one to fit on, one to test "
                          f"on), got {ids.size}: {ids.tolist()}")
    n_fit = min(max(int(math.floor(fit_fraction * ids.size + 0.5)), 1), ids.size - 1)
    perm = np.random.default_rng(seed).permutation(ids.size)
    fit = np.zeros(ids.size, dtype=bool)
    fit[perm[:n_fit]] = True
    return ids[fit].tolist(), ids[~fit].tolist()


def _check_features(features: Mapping[str, np.ndarray], names: Sequence[str],
                    shape: tuple | None = None) -> tuple:
    """Check that every named feature map is present and all share one (S, H, W) shape."""
    missing = [n for n in names if n not in features]
    if missing:
        raise ConfigError(f"feature maps {missing} missing; got {sorted(features)}")
    shapes = {n: np.shape(features[n]) for n in names}
    first = shapes[names[0]] if shape is None else shape
    bad = {n: s for n, s in shapes.items() if s != first}
    if bad or len(first) != 3:
        raise ConfigError(f"feature maps must all have shape (S, H, W) {first}; got {shapes}")
    return first


@dataclasses.dataclass(frozen=True, eq=False)  # array fields: no elementwise ==
class Ensemble:
    """A fitted logistic-regression ensemble, as plain numbers.

    The score of a pixel is  intercept + sum_f coef[f] * (t_f(x_f) - mean[f]) / scale[f],
    where t_f(x) = log1p(x / log_scale[f]) if log_scale[f] > 0 else x.

    Attributes:
      feature_names: (F,) names of the maps, in the order of the arrays below.
      log_scale: (F,) scale of the log transform per feature; 0 means no transform.
      mean, scale: (F,) standardisation of the (transformed) features.
      coef: (F,) weights on the standardised features: comparable across features.
      intercept: bias.
      fit_cases, test_cases: case ids the model was fitted on / is to be scored on.
      n_fit_pixels, n_fit_lesion: pixels (lesion pixels) the fit used, for the record.
    """

    feature_names: tuple[str, ...]
    log_scale: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    fit_cases: tuple[str, ...]
    test_cases: tuple[str, ...]
    n_fit_pixels: int = 0
    n_fit_lesion: int = 0

    def _standardised(self, f: int, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.log_scale[f] > 0:
            x = _log_transform(self.feature_names[f], x, self.log_scale[f])
        return (x - self.mean[f]) / self.scale[f]

    def predict(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Ensemble anomaly map: the logistic decision function (log-odds of lesion).

        Args:
          features: {name: (S, H, W) map} holding at least `feature_names`.

        Returns:
          (S, H, W) float32 scores; monotone in the lesion probability, so any ranking
          metric is the same as on the probability.
        """
        _check_features(features, self.feature_names)
        out = np.full(np.shape(features[self.feature_names[0]]), self.intercept)
        for f, name in enumerate(self.feature_names):  # one feature at a time: no (S,H,W,F)
            out += self.coef[f] * self._standardised(f, features[name])
        return out.astype(np.float32)

    def to_json(self) -> dict:
        """The weights and split as a JSON-able dict (see `from_json`)."""
        return {"feature_names": list(self.feature_names),
                "log_scale": self.log_scale.tolist(), "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": float(self.intercept), "fit_cases": list(self.fit_cases),
                "test_cases": list(self.test_cases), "n_fit_pixels": int(self.n_fit_pixels),
                "n_fit_lesion": int(self.n_fit_lesion)}

    @classmethod
    def from_json(cls, d: Mapping) -> "Ensemble":
        """Rebuild an `Ensemble` from `to_json` output."""
        arr = lambda k: np.asarray(d[k], dtype=np.float64)
        return cls(feature_names=tuple(d["feature_names"]), log_scale=arr("log_scale"),
                   mean=arr("mean"), scale=arr("scale"), coef=arr("coef"),
                   intercept=float(d["intercept"]), fit_cases=tuple(d["fit_cases"]),
                   test_cases=tuple(d["test_cases"]),
                   n_fit_pixels=int(d.get("n_fit_pixels", 0)),
                   n_fit_lesion=int(d.get("n_fit_lesion", 0)))


def _log_transform(name: str, x: np.ndarray, s: float) -> np.ndarray:
    if (x < 0).any():
        raise ConfigError(f"feature {name!r} has negative values; the log transform needs a "
                          "non-negative map (leave it out of log_features)")
    return np.log1p(x / s)


def fit_pixels(case_ids, shape, *, fit_fraction: float = 0.1, seed: int = 0, brain=None,
               max_fit_pixels: int = 200_000) -> tuple[list[str], list[str], np.ndarray]:
    """The pixels an ensemble is fitted on: a case-wise fit split, its brain pixels, a subsample.

    Needs no map, so a streaming scorer can pick the pixels first and keep only their
    feature values (at most `max_fit_pixels` per feature) instead of the fit cases' maps.

    Args:
      case_ids: (S,) case id of each slice; split with `split_fit_cases`.
      shape: (S, H, W) shape of the maps the pixels index.
      fit_fraction, seed: passed to `split_fit_cases`; `seed` also draws the subsample.
      brain: optional (S, H, W) binary brain mask; only its pixels are fitted on.
      max_fit_pixels: at most this many pixels, drawn uniformly without replacement.

    Returns:
      (fit_ids, test_ids, index): the split and the sorted flat indices (into an array of
      `shape`) of the pixels to fit on.
    """
    shape = tuple(shape)
    case_ids = np.asarray(case_ids).astype(str)
    if len(shape) != 3 or case_ids.shape != shape[:1]:
        raise ConfigError(f"case_ids must have shape ({shape[0] if shape else '?'},) for maps "
                          f"of shape {shape} (S, H, W), got {case_ids.shape}")
    if max_fit_pixels < 2:
        raise ConfigError(f"max_fit_pixels must be >= 2, got {max_fit_pixels}")
    fit_ids, test_ids = split_fit_cases(case_ids, fit_fraction, seed)
    rows = np.flatnonzero(np.isin(case_ids, fit_ids))
    hw = shape[1] * shape[2]
    if brain is None:
        idx = (rows[:, None] * hw + np.arange(hw)).reshape(-1)
    else:
        if np.shape(brain) != shape:
            raise ConfigError(f"brain shape {np.shape(brain)} != feature shape {shape}")
        # row-major nonzero over the fit slices only: the same ascending indices as
        # flatnonzero over the whole (S, H, W) mask, without building it
        r, c = np.nonzero(np.asarray(brain)[rows].reshape(len(rows), hw).astype(bool))
        idx = rows[r] * hw + c
    rng = np.random.default_rng(seed)
    if idx.size > max_fit_pixels:
        idx = np.sort(rng.choice(idx, size=max_fit_pixels, replace=False))
    return fit_ids, test_ids, idx


def fit_samples(samples: Mapping[str, np.ndarray], labels, *, fit_cases: Sequence[str] = (),
                test_cases: Sequence[str] = (), log_features: bool | Sequence[str] = False,
                balanced: bool = True) -> Ensemble:
    """Fit the logistic regression on feature values of chosen pixels (see `fit_ensemble`).

    Args:
      samples: {name: (P,) values of the feature map at the P fit pixels}.
      labels: (P,) binary lesion labels of those pixels.
      fit_cases, test_cases: the split the pixels come from (recorded in the Ensemble).
      log_features, balanced: as `fit_ensemble`.

    Returns:
      the fitted `Ensemble`.
    """
    names = tuple(samples)
    if not names:
        raise ConfigError("fit_ensemble needs at least one feature map")
    y = np.asarray(labels).reshape(-1).astype(bool)
    sizes = {n: np.size(samples[n]) for n in names}
    if set(sizes.values()) != {y.size}:
        raise ConfigError(f"feature samples {sizes} must all have {y.size} values (one per label)")
    log_names = set(names) if log_features is True else set(log_features or ())
    if log_names - set(names):
        raise ConfigError(f"log_features {sorted(log_names - set(names))} are not features "
                          f"({list(names)})")
    if y.all() or not y.any():
        raise ConfigError(f"the fit cases {list(fit_cases)} have "
                          f"{'only' if y.any() else 'no'} lesion pixels; the ensemble needs "
                          "both: change seed or fit_fraction")
    cols, log_scale = [], np.zeros(len(names))
    for f, name in enumerate(names):
        x = np.asarray(samples[name]).reshape(-1).astype(np.float64)
        if name in log_names:
            pos = x[x > 0]
            log_scale[f] = float(np.median(pos)) if pos.size else 1.0
            x = _log_transform(name, x, log_scale[f])
        cols.append(x)
    X = np.stack(cols, axis=1)
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(class_weight="balanced" if balanced else None, max_iter=1000)
    clf.fit(scaler.transform(X), y)
    return Ensemble(feature_names=names, log_scale=log_scale, mean=scaler.mean_.copy(),
                    scale=scaler.scale_.copy(), coef=clf.coef_[0].astype(np.float64),
                    intercept=float(clf.intercept_[0]), fit_cases=tuple(fit_cases),
                    test_cases=tuple(test_cases), n_fit_pixels=int(y.size),
                    n_fit_lesion=int(y.sum()))


def fit_ensemble(features: Mapping[str, np.ndarray], lesion, case_ids, *,
                 fit_fraction: float = 0.1, seed: int = 0, brain=None,
                 max_fit_pixels: int = 200_000, log_features: bool | Sequence[str] = False,
                 balanced: bool = True) -> Ensemble:
    """Fit a logistic regression on the pixels of a case-wise fit split.

    `fit_pixels` then `fit_samples`, on maps held in memory.

    Args:
      features: {name: (S, H, W) map}, e.g. rec_error, kl_grad, rec_grad.
      lesion: (S, H, W) binary lesion mask.
      case_ids: (S,) case id of each slice; split with `split_fit_cases`.
      fit_fraction, seed: passed to `split_fit_cases`; `seed` also draws the pixel subsample.
      brain: optional (S, H, W) binary brain mask; if given only brain pixels are fitted on
        (background is trivially healthy and would dominate the fit).
      max_fit_pixels: at most this many pixels, drawn uniformly without replacement with
        `seed`, to bound the fit time; the subsample keeps the lesion fraction on average.
      log_features: True (all), or names of non-negative heavy-tailed maps to transform as
        log1p(x / s), s the median of the feature's positive fit values: it compresses long
        tails (gradient maps span decades) so a few extreme pixels do not set the weights,
        and is scale-free. Standardisation (StandardScaler) follows in every case.
      balanced: class_weight="balanced". Lesions are ~1-5% of pixels; unweighted, the
        log-likelihood is dominated by the easy healthy pixels, while weighting both
        classes equally fits the boundary between them, which ranking metrics score.

    Returns:
      the fitted `Ensemble` (its `test_cases` are the cases to evaluate it on).
    """
    names = tuple(features)
    if not names:
        raise ConfigError("fit_ensemble needs at least one feature map")
    shape = _check_features(features, names)
    lesion = np.asarray(lesion)
    if lesion.shape != shape:
        raise ConfigError(f"lesion shape {lesion.shape} != feature shape {shape}")
    case_ids = np.asarray(case_ids).astype(str)
    if case_ids.shape != shape[:1]:
        raise ConfigError(f"case_ids must have shape ({shape[0]},), got {case_ids.shape}")
    log_names = set(names) if log_features is True else set(log_features or ())
    if log_names - set(names):
        raise ConfigError(f"log_features {sorted(log_names - set(names))} are not features "
                          f"({list(names)})")
    fit_ids, test_ids, idx = fit_pixels(case_ids, shape, fit_fraction=fit_fraction, seed=seed,
                                        brain=brain, max_fit_pixels=max_fit_pixels)
    samples = {name: np.asarray(features[name]).reshape(-1)[idx] for name in names}
    return fit_samples(samples, lesion.reshape(-1)[idx], fit_cases=fit_ids, test_cases=test_ids,
                       log_features=log_features, balanced=balanced)
