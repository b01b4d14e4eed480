"""The run's segmenter: fitted on validation lesions, stored as segmenter.json, and its
probability and mask on the same scale as calibrate's ensemble threshold."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from scipy.special import expit

import jaxvae
from jaxvae.base.errors import ConfigError, OutputError, RunError
from jaxvae.data import phantom
from jaxvae.data.datasets import find_brats_cases, load_slices
from jaxvae.inference import segment
from jaxvae.inference.calibration import ENSEMBLE_FEATURES, Calibration, ensemble_map
from jaxvae.inference.compute import compute_maps
from jaxvae.inference.settings import EvalSettings

SETTINGS = EvalSettings(smooth_sigma=1.0, batch_size=32)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(model, params, lesion-case SliceSet, healthy SliceSet, segmenter dict)."""
    root = tmp_path_factory.mktemp("seg") / "data"
    phantom.write_brats(root, n_healthy=1, n_lesion=2, shape=(64, 64, 32), spacing=(3, 3, 3),
                        modalities=("t2",))
    slices = load_slices(find_brats_cases(root, "t2"))
    sick = slices.for_cases([c for c in slices.cases if "lesion" in c])
    healthy = slices.for_cases([c for c in slices.cases if "healthy" in c])
    model = jaxvae.ConvVAE(latent_dim=8)
    params = jax.jit(jaxvae.init_params, static_argnums=0)(model, jax.random.key(0))  # fast
    d = segment.fit(model, params, sick, beta=1.0, settings=SETTINGS)
    return model, params, sick, healthy, d


def test_fit_stores_the_preferred_ensemble_its_threshold_and_the_map_settings(fitted):
    _, _, sick, _, d = fitted
    assert d["name"] == "ensemble+intensity"
    assert d["ensemble"]["feature_names"] == [*ENSEMBLE_FEATURES, "intensity"]
    assert d["threshold"] == pytest.approx(float(expit(d["threshold_logit"])), rel=1e-6)
    assert 0 < d["threshold"] < 1
    assert d["settings"] == {"smooth_sigma": 1.0, "combi_group": 64, "n_samples": 0, "seed": 0}
    assert d["val_cases"] == sick.cases
    assert 0 < d["val_metrics"]["dice_best"] <= 1
    json.dumps(d)  # storable as it is


def test_probability_and_mask_select_what_calibrates_threshold_selects(fitted):
    model, params, sick, _, d = fitted
    seg = segment.Segmenter.from_json(d)
    maps = compute_maps(model, params, sick.images, settings=dataclasses.replace(
        SETTINGS, predictors=ENSEMBLE_FEATURES))
    prob = seg.probability(maps, sick.images, sick.brain)
    assert prob.shape == sick.images.shape and prob.dtype == np.float32
    assert prob.min() >= 0 and prob.max() <= 1 and np.all(prob[~sick.brain] == 0)
    # the ensemble's log-odds, as calibrate scored them, through the logistic function
    logit = ensemble_map(seg.ensemble, {**maps, "intensity": sick.images}, sick.brain)
    np.testing.assert_allclose(prob[sick.brain], expit(logit[sick.brain]), rtol=1e-6,
                               atol=1e-7)
    mask = seg.mask(prob)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    want = (logit >= d["threshold_logit"]) & sick.brain
    # only pixels whose float32 probability rounds onto the threshold's may differ
    diff = mask.astype(bool) != want
    assert np.all(prob[diff] == np.float32(d["threshold"]))
    # ... so the mask has the validation Dice calibrate found at its threshold
    got, truth = mask.astype(bool)[sick.brain], sick.lesion[sick.brain]
    dice = 2 * (got & truth).sum() / (got.sum() + truth.sum())
    assert dice == pytest.approx(d["val_metrics"]["dice_best"], abs=1e-3)


def test_fit_refuses_validation_cases_without_lesion(fitted):
    model, params, _, healthy, _ = fitted
    with pytest.raises(ConfigError, match="no lesion in the validation cases"):
        segment.fit(model, params, healthy, beta=1.0, settings=SETTINGS)


def test_from_calibration(fitted):
    d = fitted[4]
    assert segment.from_calibration(Calibration().to_json(), SETTINGS) is None  # no ensemble
    cal = {"method": "val_best_dice", "val_cases": ["a"], "thresholds": {"ensemble": 0.0},
           "val_pooled": {"ensemble": {"dice_best": 0.5}},
           "ensemble_weights": {"ensemble": d["ensemble"], "ensemble_plain": d["ensemble"]}}
    got = segment.from_calibration(cal, {**dataclasses.asdict(SETTINGS), "n_samples": 2})
    assert got["name"] == "ensemble" and got["threshold"] == 0.5
    assert got["settings"]["n_samples"] == 2 and got["val_metrics"] == {"dice_best": 0.5}
    assert segment.from_calibration({"folds": [cal], "method": "val_best_dice",
                                     "ensemble_weights": cal["ensemble_weights"]},
                                    SETTINGS) is None  # each fold's model has its own


def test_save_and_load_round_trip_and_refuse(fitted, tmp_path):
    d = fitted[4]
    assert segment.load(tmp_path) is None  # a run without a segmenter
    path = segment.save(tmp_path, d)
    assert path == tmp_path / "segmenter.json"
    seg = segment.load(tmp_path)
    assert seg.name == d["name"] and seg.threshold == d["threshold"]
    assert seg.settings == d["settings"] and seg.predictors == ENSEMBLE_FEATURES
    np.testing.assert_array_equal(seg.ensemble.coef, d["ensemble"]["coef"])
    with pytest.raises(OutputError, match="already exists"):
        segment.save(tmp_path, d)
    segment.save(tmp_path, seg, overwrite=True)  # a Segmenter saves as its dict
    assert segment.load(tmp_path).to_json() == seg.to_json()
    with pytest.raises(ConfigError, match="threshold"):
        segment.save(tmp_path, {**d, "threshold": 1.5}, overwrite=True)
    assert segment.load(tmp_path).threshold == d["threshold"]  # nothing was written
    with pytest.raises(OutputError, match="not a run directory"):
        segment.save(tmp_path / "missing", d)


@pytest.mark.parametrize("text, problem", [
    ("{", "unreadable"),
    ('{"format": 1}', "missing"),
    ("FORMAT2", "format 2"),
    ("NOCOEF", "ensemble"),
    ("BADFEATURE", "not maps jaxvae computes"),
])
def test_load_names_the_file_and_the_problem(fitted, tmp_path, text, problem):
    d = fitted[4]
    bad = {"FORMAT2": {**d, "format": 2},
           "NOCOEF": {**d, "ensemble": {k: v for k, v in d["ensemble"].items() if k != "coef"}},
           "BADFEATURE": {**d, "ensemble": {**d["ensemble"], "feature_names": [
               "rec_error", "kl_grad", "rec_grad", "shoe_size"]}}}
    (tmp_path / "segmenter.json").write_text(json.dumps(bad[text]) if text in bad else text)
    with pytest.raises(RunError, match=problem) as e:
        segment.load(tmp_path)
    assert "segmenter.json" in str(e.value)


def test_check_settings_refuses_other_feature_maps(fitted):
    seg = segment.Segmenter.from_json(fitted[4])
    with pytest.raises(ConfigError, match=r"fitted on maps with smooth_sigma=1.0"):
        seg.check_settings(EvalSettings(smooth_sigma=3.0))
    with pytest.raises(ConfigError, match="n_samples=0"):
        seg.check_settings(dataclasses.replace(SETTINGS, n_samples=4))
    # combi_group changes no feature; the seed only the Monte-Carlo draws
    seg.check_settings(dataclasses.replace(SETTINGS, combi_group=8, seed=3))
