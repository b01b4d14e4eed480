"""Calibration cases of the target data, rotating folds, fair nulls, equal brain restriction."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import jaxvae
from jaxvae.base.errors import ConfigError
from jaxvae.data.datasets import SliceSet
from jaxvae.data.splits import calibration_folds
from jaxvae.inference import calibration
from jaxvae.inference.calibration import NULL_SIGMAS, calibrate, restrict, smooth_in_brain
from jaxvae.inference.evaluate import score_calibrated
from jaxvae.inference.settings import EvalSettings

SETTINGS = EvalSettings(predictors=("rec_error", "kl_grad", "rec_grad"), batch_size=8,
                        n_boot=20)


def _cases(n_cases=6, per_case=4, dark=(), seed=0):
    """Disc brains on a zero background; a lesion blob in most slices, brighter than the
    brain, or darker in the cases of `dark`."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    images, brain, lesion, ids = [], [], [], []
    for c in range(n_cases):
        for i in range(per_case):
            b = (yy - 32) ** 2 + (xx - 31) ** 2 < rng.uniform(16, 24) ** 2
            cy, cx = rng.integers(24, 40, 2)
            les = b & ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(3, 6) ** 2) & (i % 3 != 0)
            img = np.where(b, 0.5 + 0.1 * rng.normal(size=b.shape), 0.0)
            img = np.where(les, img - 0.4 if f"case{c}" in dark else img + 0.4, img)
            images.append(img.astype(np.float32))
            brain.append(b)
            lesion.append(les)
            ids.append(f"case{c}")
    return SliceSet(np.stack(images), np.stack(brain), np.stack(lesion), ids,
                    np.arange(len(ids)))


@pytest.fixture(scope="module")
def model_params():
    model = jaxvae.ConvVAE(latent_dim=8)
    return model, jaxvae.init_params(model, jax.random.key(0))


def test_calibration_folds_test_every_case_once_never_on_its_own_calibration():
    ids = [f"c{i}" for i in range(10)]
    for n in (1, 2, 3, 5):
        folds = calibration_folds(ids * 3, n=n, seed=4)  # repeats: one per slice
        tested = [c for t, _ in folds for c in t]
        assert sorted(tested) == ids  # each case tested exactly once
        for test, cal in folds:
            assert len(cal) == n and not set(test) & set(cal)
    assert calibration_folds(ids, n=2, seed=4) == calibration_folds(ids[::-1], n=2, seed=4)
    assert calibration_folds(ids, n=2, seed=4) != calibration_folds(ids, n=2, seed=5)
    assert calibration_folds(ids, ids=["c3", "c1"]) == [
        ([c for c in ids if c not in ("c1", "c3")], ["c1", "c3"])]
    for bad, match in [(dict(n=6), "at least 12"), (dict(ids=["x"]), "'x' is not among"),
                       (dict(), "either by count or by ID"), (dict(n=2, ids=["c1"]), "not both"),
                       (dict(ids=ids), "leave at least one")]:
        with pytest.raises(ConfigError, match=match):
            calibration_folds(ids, **bad)


def test_fitted_settings_ignore_the_test_labels_and_calibration_cases_are_never_tested(
        model_params):
    model, params = model_params
    s = _cases()
    folds = calibration_folds(s.cases, n=2, seed=0)
    res, _ = score_calibrated(model, params, s, folds, settings=SETTINGS, keep=())
    assert res["n_cases"] == 6 and len(res["calibration"]["folds"]) == 3
    for (_, cal), c in zip(folds, res["calibration"]["folds"], strict=True):
        assert c["val_cases"] == cal and c["method"] == "val_best_dice"
    assert set(res["per_case"]["rec_error"]) == set(s.cases)
    # permute the labels of each fold's test cases: what was fitted cannot move
    for f, (test, _) in enumerate(folds):
        sel = np.flatnonzero(np.isin(s.case_ids, test))
        lesion = s.lesion.copy()
        lesion[sel] = lesion[np.random.default_rng(f).permutation(sel)]
        res2, _ = score_calibrated(model, params, dataclasses.replace(s, lesion=lesion),
                                   folds, settings=SETTINGS, keep=())
        got, want = res2["calibration"]["folds"][f], res["calibration"]["folds"][f]
        assert json.dumps(got) == json.dumps(want)
        assert res2["predictors"]["intensity"]["dice_best"] != res["predictors"][
            "intensity"]["dice_best"]  # the labels did change what the oracle sees


def test_the_null_is_chosen_on_the_calibration_cases_only(model_params):
    model, params = model_params
    # calibration cases with dark lesions, test cases with bright ones: the null follows
    # the calibration cases, though the test cases would want the other polarity
    s = _cases(dark=("case0", "case1"))
    folds = [(["case2", "case3", "case4", "case5"], ["case0", "case1"])]
    res, _ = score_calibrated(model, params, s, folds, settings=SETTINGS, keep=())
    assert res["calibration"]["folds"][0]["null_intensity"]["polarity"] == -1
    assert res["calibration"]["folds"][0]["best_null"] in ("null_intensity", "null_lr")
    bright = [(["case0", "case1", "case2", "case3"], ["case4", "case5"])]
    res2, _ = score_calibrated(model, params, s, bright, settings=SETTINGS, keep=())
    assert res2["calibration"]["folds"][0]["null_intensity"]["polarity"] == 1
    # the dark null on bright test lesions scores below the raw (bright) intensity
    rows = res["predictors"]
    assert rows["null_intensity"]["auprc"] < rows["intensity"]["auprc"]
    # every row is compared with the best null, paired
    assert rows["rec_error"]["vs_null"]["baseline"] == "best_null"
    assert rows["rec_error"]["vs_baseline"]["baseline"] == "intensity"


def test_the_maps_sigma_is_chosen_on_the_calibration_cases_from_the_nulls_menu(model_params):
    model, params = model_params
    s = _cases()
    maps = jaxvae.inference.compute.compute_maps(model, params, s.images, settings=SETTINGS)
    assert {"rec_grad_unsmoothed", "kl_grad_unsmoothed"} <= set(maps)
    cal = calibrate(maps, s, SETTINGS)
    assert set(cal.sigmas) == {"rec_error", "rec_grad", "kl_grad"}
    assert set(cal.sigmas.values()) <= set(NULL_SIGMAS)
    # each chosen sigma is the one of best calibration AUPRC among the menu
    for name, src in (("rec_error", "rec_error"), ("rec_grad", "rec_grad_unsmoothed")):
        auprc = {sg: calibration._auprc(restrict({"m": smooth_in_brain(maps[src], s.brain, sg)},
                                                 s.brain)["m"], s) for sg in NULL_SIGMAS}
        assert cal.sigmas[name] == max(NULL_SIGMAS, key=lambda sg: (auprc[sg], -sg))
        assert cal.val_results[f"{name}_tuned"]["auprc"] == pytest.approx(
            auprc[cal.sigmas[name]], abs=1e-6)
    # the tuned rows are model rows: best_map may be one; the twins are no rows
    assert "rec_grad_tuned" in calibration.row_names(list(SETTINGS.predictors), s, SETTINGS,
                                                     cal)
    assert not any(k.endswith("_unsmoothed") for k in cal.val_results)
    # the null's regression with the model's maps added, the intensities not log-scaled
    plus = cal.ensembles["ensemble+null"]
    assert list(plus.feature_names) == [*calibration.ENSEMBLE_FEATURES, *cal.ensembles[
        "null_lr"].feature_names] and "ensemble_dark+null" not in cal.ensembles
    assert [v > 0 for v in plus.log_scale] == [True] * 3 + [False] * len(NULL_SIGMAS)
    off = dataclasses.replace(SETTINGS, tune_sigma=False)
    maps_off = jaxvae.inference.compute.compute_maps(model, params, s.images, settings=off)
    assert set(maps_off) == set(SETTINGS.predictors)
    assert calibrate(maps_off, s, off).sigmas == {}


def test_every_row_is_restricted_to_the_brain_alike(model_params):
    model, params = model_params
    s = _cases()
    folds = calibration_folds(s.cases, n=2, seed=1)
    _, kept = score_calibrated(model, params, s, folds, settings=SETTINGS,
                               keep=np.arange(len(s)))
    lowest = np.finfo(np.float32).min
    assert {"rec_error", "intensity", "null_intensity", "null_lr", "ensemble",
            "rec_error_smooth", "best_null", "best_map"} <= set(kept)
    for name, m in kept.items():
        assert (m[~s.brain] == lowest).all(), name
        assert (m[s.brain] > lowest).all(), name


def test_smooth_in_brain_keeps_a_flat_brain_flat_at_its_rim():
    brain = np.zeros((1, 64, 64), bool)
    brain[0, 16:48, 16:48] = True
    image = np.where(brain, 0.7, 0.0).astype(np.float32)
    for sigma in NULL_SIGMAS:
        np.testing.assert_allclose(smooth_in_brain(image, brain, sigma)[brain], 0.7, rtol=1e-5)


def test_healthy_calibration_cases_fit_no_null_and_choose_nothing(model_params):
    model, params = model_params
    s = _cases()
    healthy = dataclasses.replace(s, lesion=np.zeros_like(s.lesion))
    maps = jaxvae.inference.compute.compute_maps(model, params, s.images, settings=SETTINGS)
    cal = calibrate(maps, healthy, SETTINGS)
    assert cal.method == "val_quantile" and cal.best_null is None and not cal.ensembles
    assert cal.null == {"polarity": 1, "sigma": 0.0} and cal.sigmas == {}
    assert restrict({"m": s.images}, s.brain)["m"][~s.brain].max() == np.finfo(np.float32).min


def test_evaluate_cli_calibrates_on_the_target_data_and_scores_the_untrained_control(
        tmp_path, capsys):
    from jaxvae.cli import main
    from jaxvae.data import phantom
    from jaxvae.training.config import TrainConfig
    from jaxvae.training.trainer import train

    phantom.write_brats(tmp_path / "sick", n_healthy=0, n_lesion=4, seed=1, modalities=("t2",),
                        shape=(64, 64, 40), spacing=(3.5, 3.5, 3.5))
    run = tmp_path / "run"
    images = np.random.default_rng(0).normal(size=(32, 64, 64)).astype(np.float32)
    train(TrainConfig(latent_dim=8, epochs=1, batch_size=16, data={"source": "test"}), images,
          run, progress=False)
    args = ["evaluate", "--run", str(run), "--data", str(tmp_path / "sick"), "--predictors",
            "rec_error,rec_grad,kl_grad", "--n-boot", "20", "--calibration", "2"]
    assert main([*args, "--out", str(tmp_path / "e")]) == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "e" / "results.json").read_text())
    folds = res["calibration_plan"]["folds"]
    assert len(folds) == 2 and sorted(c for f in folds for c in f["test"]) == sorted(
        res["per_case"]["rec_error"])
    assert {"best_map", "best_null", "null_intensity", "null_lr"} <= set(res["predictors"])
    md = (tmp_path / "e" / "results.md").read_text()
    assert "best fair null" in md and "_tuned rows' sigmas" in md
    assert "rec_grad_tuned" in res["predictors"] and not any(
        k.endswith("_unsmoothed") for k in res["predictors"])
    assert main([*args, "--out", str(tmp_path / "n"), "--tune-sigma", "false"]) == 0
    untuned = json.loads((tmp_path / "n" / "results.json").read_text())["predictors"]
    assert not any(k.endswith("_tuned") for k in untuned)
    assert main([*args, "--out", str(tmp_path / "u"), "--untrained"]) == 0
    ctl = json.loads((tmp_path / "u" / "results.json").read_text())
    assert ctl["run"]["checkpoint"] == {"untrained": True, "seed": 0}
    assert ctl["predictors"]["rec_grad"]["auprc"] != res["predictors"]["rec_grad"]["auprc"]
    assert ctl["calibration_plan"] == res["calibration_plan"]  # the same calibration cases
    assert main([*args, "--out", str(tmp_path / "x"), "--calibration", "3"]) == 2
    assert "at least 6" in capsys.readouterr().err
