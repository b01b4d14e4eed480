"""Tests of jaxvae.inference.ensemble: fit on the pixels given, predict, JSON (the choice of pixels,
the validation cases' brain, is calibration's and tested in test_evaluate/test_protocol)."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jaxvae.base.errors import ConfigError
from jaxvae.inference.ensemble import Ensemble, fit_samples


def synthetic(rng, n_cases=20, slices=3, hw=16):
    """Features: 'good' is informative and heavy-tailed, 'noise' is independent of lesions."""
    s = n_cases * slices
    lesion = np.zeros((s, hw, hw), bool)
    for i in range(s):
        r, c = rng.integers(2, hw - 6, 2)
        lesion[i, r:r + 4, c:c + 4] = True
    good = rng.lognormal(0.0, 1.0, lesion.shape) * np.where(lesion, 4.0, 1.0)
    noise = 1000.0 * rng.normal(size=lesion.shape)  # very different scale
    ids = np.repeat([f"c{i}" for i in range(n_cases)], slices)
    return {"good": good, "noise": noise}, lesion, ids


def fit_on_cases(feats, lesion, ids, fit_cases, **kw):
    """Fit on every pixel of the fit cases (what calibration does with the val. cases)."""
    rows = np.isin(ids, fit_cases)
    return fit_samples({k: v[rows].reshape(-1) for k, v in feats.items()},
                       lesion[rows].reshape(-1), fit_cases=fit_cases, **kw)


@pytest.mark.parametrize("log_features", [False, True, ["good"]])
def test_informative_feature_dominates(log_features):
    rng = np.random.default_rng(0)
    feats, lesion, ids = synthetic(rng)
    if log_features is True:
        feats["noise"] = np.abs(feats["noise"])
    ens = fit_on_cases(feats, lesion, ids, ["c0", "c1", "c2", "c3"], log_features=log_features)
    g, n = ens.feature_names.index("good"), ens.feature_names.index("noise")
    assert abs(ens.coef[g]) > 5 * abs(ens.coef[n])
    assert ens.coef[g] > 0
    scores = ens.predict(feats)
    assert scores.shape == lesion.shape and scores.dtype == np.float32
    test = ~np.isin(ids, ens.fit_cases)
    auc_ens = roc_auc_score(lesion[test].ravel(), scores[test].ravel())
    auc_good = roc_auc_score(lesion[test].ravel(), feats["good"][test].ravel())
    assert auc_ens == pytest.approx(auc_good, abs=0.01)


def test_fit_sees_only_the_pixels_given():
    rng = np.random.default_rng(1)
    feats, lesion, ids = synthetic(rng)
    ens = fit_on_cases(feats, lesion, ids, ["c0", "c5"])
    assert ens.n_fit_pixels == 6 * 16 * 16 and ens.n_fit_lesion == (lesion[:3].sum() * 2)
    feats2 = {k: v.copy() for k, v in feats.items()}
    feats2["good"][~np.isin(ids, ["c0", "c5"])] = 0.0  # other cases changed: same weights
    np.testing.assert_array_equal(ens.coef, fit_on_cases(feats2, lesion, ids,
                                                         ["c0", "c5"]).coef)
    plain = fit_on_cases(feats, lesion, ids, ["c0", "c5"], balanced=False)
    assert plain.intercept < ens.intercept - 1  # unweighted: the rare class is down-weighted


def test_json_round_trip():
    rng = np.random.default_rng(2)
    feats, lesion, ids = synthetic(rng, n_cases=5)
    ens = fit_on_cases(feats, lesion, ids, ["c0", "c1"], log_features=["good"])
    d = json.loads(json.dumps(ens.to_json()))
    back = Ensemble.from_json(d)
    np.testing.assert_array_equal(back.predict(feats), ens.predict(feats))
    assert back.fit_cases == ens.fit_cases and d["feature_names"] == ["good", "noise"]
    # the stored numbers are the whole model: log1p(x / s) on 'good' only, then standardise
    assert ens.log_scale[0] > 0 and ens.log_scale[1] == 0
    z = (np.log1p(feats["good"] / ens.log_scale[0]) - ens.mean[0]) / ens.scale[0]
    zn = (feats["noise"] - ens.mean[1]) / ens.scale[1]
    manual = ens.intercept + ens.coef[0] * z + ens.coef[1] * zn
    np.testing.assert_allclose(ens.predict(feats), manual, rtol=1e-5, atol=1e-4)


def test_errors():
    rng = np.random.default_rng(3)
    feats, lesion, ids = synthetic(rng, n_cases=4)
    with pytest.raises(ConfigError, match="no lesion"):
        fit_on_cases(feats, np.zeros_like(lesion), ids, ["c0"])
    with pytest.raises(ConfigError, match="negative"):
        fit_on_cases(feats, lesion, ids, ["c0"], log_features=True)
    with pytest.raises(ConfigError, match="not features"):
        fit_on_cases(feats, lesion, ids, ["c0"], log_features=["other"])
    with pytest.raises(ConfigError, match="one per label"):
        fit_samples({"good": np.ones(3), "noise": np.ones(4)}, [0, 1, 0])
    with pytest.raises(ConfigError, match="only lesion"):
        fit_samples({"good": np.ones(2)}, [1, 1], fit_cases=["c0"])
    with pytest.raises(ConfigError, match="at least one"):
        fit_samples({}, [0, 1])
    ens = fit_on_cases(feats, lesion, ids, ["c0", "c1"])
    with pytest.raises(ConfigError, match="missing"):
        ens.predict({"good": feats["good"]})
    with pytest.raises(ConfigError, match="shape"):
        ens.predict({"good": feats["good"], "noise": feats["noise"][:, :8]})
