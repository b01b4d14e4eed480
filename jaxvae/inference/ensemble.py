"""Logistic-regression ensemble of anomaly maps (docs/method.md §5).

Each pixel is a sample whose features are the values of several maps (rec_error, kl_grad,
rec_grad, ...) at that pixel. The regression is fitted on brain pixels of the validation
cases (jaxvae.inference.calibration chooses them; never test cases) and scores every test pixel.

The fitted ensemble is stored as plain numbers (feature names, optional log scales,
standardisation mean/scale, coefficients, intercept), not as a pickled sklearn object, so
it can be written to JSON and read back by any version.
"""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from jaxvae.base.errors import ConfigError


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


def fit_samples(samples: Mapping[str, np.ndarray], labels, *, fit_cases: Sequence[str] = (),
                test_cases: Sequence[str] = (), log_features: bool | Sequence[str] = False,
                balanced: bool = True) -> Ensemble:
    """Fit the logistic regression on the feature values of chosen pixels.

    Args:
      samples: {name: (P,) values of the feature map at the P fit pixels} (e.g. the brain
        pixels of the validation cases, subsampled).
      labels: (P,) binary lesion labels of those pixels.
      fit_cases, test_cases: the cases the pixels come from / to be scored (recorded).
      log_features: True (all), or names of non-negative heavy-tailed maps to transform as
        log1p(x / s), s the median of the feature's positive fit values: it compresses long
        tails (gradient maps span decades) so a few extreme pixels do not set the weights,
        and is scale-free. Standardisation (StandardScaler) follows in every case.
      balanced: class_weight="balanced". Lesions are ~1-5% of pixels; unweighted, the
        log-likelihood is dominated by the easy healthy pixels, while weighting both
        classes equally fits the boundary between them, which ranking metrics score.

    Returns:
      the fitted `Ensemble`.
    """
    names = tuple(samples)
    if not names:
        raise ConfigError("the ensemble needs at least one feature map")
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
                          "both")
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
