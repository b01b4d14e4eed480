"""Tests of jaxvae.ensemble: case-wise split, fit on synthetic features, predict, JSON."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jaxvae.ensemble import Ensemble, fit_ensemble, fit_pixels, fit_samples, split_fit_cases
from jaxvae.errors import ConfigError


def test_split_is_by_case_deterministic_and_honours_fraction():
    ids = np.repeat([f"case{i:02d}" for i in range(30)], 5)  # 5 slices per case
    fit, test = split_fit_cases(ids, 0.1, seed=3)
    assert len(fit) == 3 and len(test) == 27
    assert set(fit).isdisjoint(test) and set(fit) | set(test) == set(ids)
    assert (fit, test) == split_fit_cases(ids[::-1], 0.1, seed=3)  # input order irrelevant
    assert fit == sorted(fit)
    assert any(split_fit_cases(ids, 0.1, seed=s)[0] != fit for s in range(4))  # seed matters
    assert len(split_fit_cases(ids, 0.5)[0]) == 15


def test_split_keeps_a_case_on_each_side():
    fit, test = split_fit_cases(["b", "a"], 0.1)  # 10% of 2 rounds to 0: clipped to 1
    assert sorted(fit + test) == ["a", "b"] and len(fit) == 1
    fit, test = split_fit_cases(["a", "b", "c"], 0.99)
    assert len(fit) == 2 and len(test) == 1
    with pytest.raises(ConfigError, match="at least 2 cases"):
        split_fit_cases(["a", "a", "a"])
    with pytest.raises(ConfigError, match="fit_fraction"):
        split_fit_cases(["a", "b"], 1.0)


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


@pytest.mark.parametrize("log_features", [False, True, ["good"]])
def test_informative_feature_dominates(log_features):
    rng = np.random.default_rng(0)
    feats, lesion, ids = synthetic(rng)
    if log_features is True:
        feats["noise"] = np.abs(feats["noise"])
    ens = fit_ensemble(feats, lesion, ids, fit_fraction=0.2, seed=1, log_features=log_features)
    g, n = ens.feature_names.index("good"), ens.feature_names.index("noise")
    assert abs(ens.coef[g]) > 5 * abs(ens.coef[n])
    assert ens.coef[g] > 0
    scores = ens.predict(feats)
    assert scores.shape == lesion.shape and scores.dtype == np.float32
    test = np.isin(ids, ens.test_cases)
    auc_ens = roc_auc_score(lesion[test].ravel(), scores[test].ravel())
    auc_good = roc_auc_score(lesion[test].ravel(), feats["good"][test].ravel())
    assert auc_ens == pytest.approx(auc_good, abs=0.01)


def test_fit_uses_only_fit_cases_and_brain_and_subsample():
    rng = np.random.default_rng(1)
    feats, lesion, ids = synthetic(rng)
    brain = np.zeros(lesion.shape, bool)
    brain[:, 1:15, 1:15] = True
    ens = fit_ensemble(feats, lesion, ids, seed=2, brain=brain, max_fit_pixels=10**9)
    assert set(ens.fit_cases).isdisjoint(ens.test_cases)
    assert (list(ens.fit_cases), list(ens.test_cases)) == split_fit_cases(ids, 0.1, 2)
    fit = np.isin(ids, ens.fit_cases)[:, None, None] & brain
    assert ens.n_fit_pixels == fit.sum() and ens.n_fit_lesion == (fit & lesion).sum()
    # lesion pixels of the fit cases only: changing a test case changes nothing
    feats2 = {k: v.copy() for k, v in feats.items()}
    feats2["good"][np.isin(ids, ens.test_cases)] = 0.0
    ens2 = fit_ensemble(feats2, lesion, ids, seed=2, brain=brain, max_fit_pixels=10**9)
    np.testing.assert_array_equal(ens.coef, ens2.coef)
    small = fit_ensemble(feats, lesion, ids, seed=2, max_fit_pixels=300)
    again = fit_ensemble(feats, lesion, ids, seed=2, max_fit_pixels=300)
    assert small.n_fit_pixels == 300
    np.testing.assert_array_equal(small.coef, again.coef)  # reproducible subsample


def test_json_round_trip():
    rng = np.random.default_rng(2)
    feats, lesion, ids = synthetic(rng, n_cases=5)
    ens = fit_ensemble(feats, lesion, ids, fit_fraction=0.4, log_features=["good"])
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
        fit_ensemble(feats, np.zeros_like(lesion), ids)
    with pytest.raises(ConfigError, match="shape"):
        fit_ensemble({"good": feats["good"], "noise": feats["noise"][:, :8]}, lesion, ids)
    with pytest.raises(ConfigError, match="case_ids"):
        fit_ensemble(feats, lesion, ids[:2])
    with pytest.raises(ConfigError, match="negative"):
        fit_ensemble(feats, lesion, ids, fit_fraction=0.5, log_features=True)
    ens = fit_ensemble(feats, lesion, ids, fit_fraction=0.5)
    with pytest.raises(ConfigError, match="missing"):
        ens.predict({"good": feats["good"]})


@pytest.mark.parametrize("max_fit_pixels", [10**9, 500])
@pytest.mark.parametrize("with_brain", [True, False])
def test_fit_pixels_equal_the_full_mask_and_fit_samples_equal_fit_ensemble(max_fit_pixels,
                                                                          with_brain):
    # the pixels are chosen without the maps: the same indices as flatnonzero over the whole
    # (S, H, W) fit mask and the same subsample, so fitting on their values alone is the fit
    rng = np.random.default_rng(4)
    feats, lesion, ids = synthetic(rng, n_cases=12)
    ids = ids[rng.permutation(ids.size)]  # cases interleaved: rows of a case not contiguous
    brain = rng.random(lesion.shape) < 0.7 if with_brain else None
    fit, test, idx = fit_pixels(ids, lesion.shape, fit_fraction=0.3, seed=5, brain=brain,
                                max_fit_pixels=max_fit_pixels)
    assert (fit, test) == split_fit_cases(ids, 0.3, 5)
    use = np.isin(ids, fit)[:, None, None] & (True if brain is None else brain)
    want = np.flatnonzero(np.broadcast_to(use, lesion.shape))
    if want.size > max_fit_pixels:
        want = np.sort(np.random.default_rng(5).choice(want, max_fit_pixels, replace=False))
    np.testing.assert_array_equal(idx, want)
    assert idx.size == min(max_fit_pixels, use.sum() if with_brain else use.sum() * 16 * 16)
    ens = fit_ensemble(feats, lesion, ids, fit_fraction=0.3, seed=5, brain=brain,
                       max_fit_pixels=max_fit_pixels, log_features=["good"])
    again = fit_samples({k: v.reshape(-1)[idx] for k, v in feats.items()},
                        lesion.reshape(-1)[idx], fit_cases=fit, test_cases=test,
                        log_features=["good"])
    assert again.to_json() == ens.to_json()


def test_fit_pixels_and_fit_samples_errors():
    rng = np.random.default_rng(6)
    feats, lesion, ids = synthetic(rng, n_cases=4)
    with pytest.raises(ConfigError, match="case_ids"):
        fit_pixels(ids[:3], lesion.shape)
    with pytest.raises(ConfigError, match="brain shape"):
        fit_pixels(ids, lesion.shape, brain=lesion[:, :4])
    with pytest.raises(ConfigError, match="one per label"):
        fit_samples({"good": np.ones(3), "noise": np.ones(4)}, [0, 1, 0])
    with pytest.raises(ConfigError, match="only lesion"):
        fit_samples({"good": np.ones(2)}, [1, 1], fit_cases=["c0"])
