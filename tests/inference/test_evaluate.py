import dataclasses
import json

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

import jaxvae
from jaxvae.base.errors import OutputError
from jaxvae.data.datasets import SliceSet
from jaxvae.inference.calibration import postprocess_maps, restrict
from jaxvae.inference.compute import compute_maps
from jaxvae.inference.evaluate import score_dataset, score_folds, score_maps
from jaxvae.inference.settings import EvalSettings
from jaxvae.report.outputs import overlay_slices
from jaxvae.report.results import detection_table, results_table, write_results


@pytest.fixture(scope="module")
def model_params():
    model = jaxvae.ConvVAE(latent_dim=8)
    return model, jaxvae.init_params(model, jax.random.key(0))


def _slices(n=10, cases=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 64, 64)).astype(np.float32)
    lesion = np.zeros((n, 64, 64), bool)
    lesion[:, 20:30, 20:30] = True
    images[lesion] += 3.0  # bright lesions: the intensity baseline must find them
    brain = np.zeros((n, 64, 64), bool)
    brain[:, 8:56, 8:56] = True
    ids = np.repeat([f"case{i}" for i in range(cases)], n // cases)
    return SliceSet(images, brain, lesion, ids, np.arange(n))


def test_batched_maps_equal_one_call(model_params):
    model, params = model_params
    images = _slices(10).images
    preds = ("rec_error", "rec_grad", "kl_grad", "elbo_grad", "proj_rec_error")
    settings = EvalSettings(predictors=preds, batch_size=4, proj_steps=3)  # 10 = 4 + 4 + 2
    maps = compute_maps(model, params, images, beta=2.0, settings=settings)
    ref = jaxvae.anomaly_maps(model, params, images[..., None], beta=2.0,
                              predictors=preds[:4])
    _, ref["proj_rec_error"] = jaxvae.project(model, params, images[..., None], steps=3)
    for name in preds:
        # float32 maps of other batch shapes; the atol (1e-4 of the map's maximum: input
        # gradients carry ~1e-6 of it as rounding) covers entries near zero
        np.testing.assert_allclose(maps[name], ref[name], rtol=1e-4,
                                   atol=1e-4 * np.abs(ref[name]).max(), err_msg=name)


def test_score_maps_rows_baseline_and_ensemble_fitted_on_validation_cases(model_params):
    s = _slices(20, cases=10)
    rng = np.random.default_rng(1)

    def maps_of(s):
        return {"rec_error": s.lesion + rng.random(s.lesion.shape).astype(np.float32),
                "kl_grad": rng.random(s.lesion.shape).astype(np.float32),
                "rec_grad": rng.random(s.lesion.shape).astype(np.float32)}

    test, val = s.for_cases(s.cases[2:]), s.for_cases(s.cases[:2])
    res = score_maps(maps_of(test), test, val_maps=maps_of(val), val=val,
                     settings=EvalSettings(n_boot=50))
    rows = res["predictors"]
    assert set(rows) == {"rec_error", "kl_grad", "rec_grad", "intensity", "ensemble",
                         "ensemble_plain", "ensemble+intensity", "rec_error_smooth",
                         "null_intensity", "null_lr", "best_null", "best_map",
                         "ensemble+null",
                         "rec_error_tuned"}  # given maps without unsmoothed twins: no other
    weights = res["calibration"]["ensemble_weights"]
    assert not any(weights["ensemble_plain"]["log_scale"])  # the paper's: no transform
    assert all(weights["ensemble"]["log_scale"])
    # fitted on brain pixels, the ensembles score the background lowest
    filled = maps_of(test)
    score_maps(filled, test, val_maps=maps_of(val), val=val, settings=EvalSettings(n_boot=0))
    outside = filled["ensemble"][~test.brain]
    assert (outside == outside.min()).all() and outside.min() < filled["ensemble"][test.brain].min()
    assert rows["rec_error"]["auroc"] == pytest.approx(1.0)
    assert 0.4 < rows["kl_grad"]["auroc_brain"] < 0.6  # random inside the brain
    assert rows["intensity"]["auroc"] > 0.9
    cal = res["calibration"]
    assert cal["method"] == "val_best_dice" and cal["val_cases"] == ["case0", "case1"]
    assert cal["ensemble_weights"]["ensemble"]["fit_cases"] == ["case0", "case1"]
    # rec_error separates perfectly on the validation cases too: its threshold does on test
    assert rows["rec_error"]["dice_val"] == pytest.approx(1.0)
    assert set(res["per_case"]["rec_error"]) == set(test.cases)
    lo, hi = rows["kl_grad"]["ci"]["auroc"]
    assert lo <= rows["kl_grad"]["auroc"] <= hi and lo < hi
    assert res["n_cases"] == 8 and res["n_slices"] == 16
    md = results_table(res)
    assert "| intensity (baseline) |" in md and "| ensemble+intensity |" in md
    assert "Dice (val. threshold)" in md and "best Dice (oracle)" in md


def test_validation_threshold_and_ensemble_ignore_the_test_labels(model_params):
    model, params = model_params
    s = _phantom_like()
    val, test = s.for_cases(["case0", "case1"]), s.for_cases(s.cases[2:])
    settings = EvalSettings(predictors=("rec_error", "kl_grad", "rec_grad"), batch_size=8,
                            n_boot=0)
    res, _ = score_dataset(model, params, test, val=val, settings=settings, keep=())
    perm = np.random.default_rng(0).permutation(len(test))
    shuffled = dataclasses.replace(test, lesion=test.lesion[perm])  # other test labels
    res2, _ = score_dataset(model, params, shuffled, val=val, settings=settings, keep=())
    assert res2["calibration"] == res["calibration"]  # thresholds and weights: unchanged
    assert res2["predictors"]["intensity"]["dice_best"] != res["predictors"]["intensity"][
        "dice_best"]  # the labels did change what the oracle sees
    # and the validation threshold is the best-Dice threshold of the validation maps
    val_maps = compute_maps(model, params, val.images, settings=settings)
    from jaxvae.metrics.histogram import pixel_metrics

    t = pixel_metrics(val_maps["rec_grad"], val.lesion, val.brain)["dice_threshold"]
    assert res["calibration"]["thresholds"]["rec_grad"] == t
    got = compute_maps(model, params, test.images, settings=settings)["rec_grad"] >= t
    want = 2 * (got & test.lesion).sum() / (got.sum() + test.lesion.sum())
    assert res["predictors"]["rec_grad"]["dice_val"] == pytest.approx(want)


def test_healthy_validation_gives_a_quantile_threshold_and_healthy_test_data_a_rate(
        model_params):
    model, params = model_params
    s = _phantom_like()
    healthy = dataclasses.replace(s, lesion=np.zeros_like(s.lesion))
    val, test = healthy.for_cases(["case0", "case1"]), healthy.for_cases(s.cases[2:])
    settings = EvalSettings(predictors=("rec_error", "kl_grad", "rec_grad"), batch_size=8,
                            val_quantile=0.9, n_boot=0)
    res, _ = score_dataset(model, params, test, val=val, settings=settings, keep=())
    assert res["calibration"]["method"] == "val_quantile"
    assert "ensemble" not in res["predictors"]  # no lesion to fit it on
    frac = res["calibration"]["val_pooled"]
    for name, r in res["predictors"].items():
        assert np.isnan(r["auroc"])
        assert 0.0 < r["frac_above"] < 0.4, name  # ~10 % on the validation cases
    assert "brain pixels >= val threshold" in results_table(res)
    assert frac  # the validation metrics are recorded


def test_postprocess_zeroes_outside_eroded_brain():
    brain = np.zeros((1, 32, 32), bool)
    brain[0, 4:28, 4:28] = True
    maps = np.ones((1, 32, 32), np.float32)
    out = postprocess_maps(maps, brain, erode=3, median=3)
    assert out[0, 16, 16] == 1.0 and out[0, 5, 16] == 0.0 and out[0, 0, 0] == 0.0


def test_postprocess_defaults_equal_scipy_slice_by_slice():
    # a map with structure in every direction, and brains of different sizes per slice: a 3D
    # median or erosion, a wrong size or a skipped step all change the result
    rng = np.random.default_rng(3)
    maps = (rng.random((4, 40, 40)) + np.linspace(0, 2, 40)[:, None]).astype(np.float32)
    yy, xx = np.mgrid[:40, :40]
    brain = np.stack([(yy - 20) ** 2 + (xx - 19) ** 2 < r**2 for r in (8, 17, 14, 11)])
    got = postprocess_maps(maps, brain)  # the defaults: erode 3, median 5
    cross = ndi.generate_binary_structure(2, 1)
    want = [ndi.median_filter(m * ndi.binary_erosion(b, cross, iterations=3), size=5)
            for m, b in zip(maps, brain, strict=True)]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.stack(want))  # selections and products: exact
    assert not np.array_equal(got, maps * brain)  # the filter changes a non-constant map


def test_write_results_is_atomic_and_refuses_overwrite(tmp_path):
    s = _slices(10)
    res = score_maps({"rec_error": s.images.copy()}, s, settings=EvalSettings(ensemble=False))
    write_results(res, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["n_slices"] == 10
    with pytest.raises(OutputError, match="results.json"):
        write_results(res, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["per_case.csv", "results.json",
                                                          "results.md"]
    rows = (tmp_path / "per_case.csv").read_text().splitlines()
    assert rows[0].startswith("case,predictor,auroc,auroc_brain,auprc,dice_val,dice_best")
    # 5 cases x (rec_error, intensity, rec_error_smooth, null_intensity)
    assert len(rows) == 1 + 5 * 4


# ---- streaming == the all-in-memory computation ---------------------------------------------

def _phantom_like(case_slices=(5, 7, 3, 6, 4, 6), seed=0):
    """Slices of several cases (uneven counts, so batches straddle cases): a bright disc of
    brain on an exact-zero background, a brighter lesion blob in most slices."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    images, brain, lesion, ids = [], [], [], []
    for c, n in enumerate(case_slices):
        for i in range(n):
            b = (yy - 32) ** 2 + (xx - 31) ** 2 < rng.uniform(14, 26) ** 2
            cy, cx = rng.integers(22, 42, 2)
            les = b & ((yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(2, 6) ** 2) & (i % 4 != 0)
            img = np.where(b, rng.uniform(0.3, 0.6) + 0.05 * rng.normal(size=b.shape), 0.0)
            images.append(np.where(les, img + 0.5, img).astype(np.float32))
            brain.append(b)
            lesion.append(les)
            ids.append(f"case{c}")
    n = len(ids)
    return SliceSet(np.stack(images), np.stack(brain), np.stack(lesion), ids, np.arange(n))


def test_streamed_results_equal_the_all_in_memory_computation(model_params):
    model, params = model_params
    s = _phantom_like()  # 31 slices of 6 cases, batches of 4: batches straddle cases
    val, test = s.for_cases(["case1"]), s.for_cases([c for c in s.cases if c != "case1"])
    settings = EvalSettings(predictors=("rec_error", "kl_grad", "rec_grad", "combi",
                                        "proj_rec_error"),
                            batch_size=4, combi_group=2, n_samples=2, proj_steps=2,
                            postprocess=True, n_boot=20)
    maps = compute_maps(model, params, test.images, settings=settings)
    val_maps = compute_maps(model, params, val.images, settings=settings)
    keep = [20, 2, 17, 1]  # any order
    got, kept = score_dataset(model, params, test, val=val, settings=settings, keep=keep)
    # histogram counts do not depend on the order pixels arrive in: equal, not merely close
    ref = dict(maps)
    want = score_maps(ref, test, val_maps=val_maps, val=val, settings=settings)
    assert json.dumps(got) == json.dumps(want)
    # 5 maps + intensity + rec_error_smooth + null_intensity + 3 tuned (rec_error, kl_grad,
    # rec_grad), their +pp, 4 ensembles + null_lr, best_null and best_map; the maps'
    # unsmoothed twins are no rows
    assert set(kept) == {k for k in ref if not k.endswith("_unsmoothed")}
    assert len(kept) == 11 + 11 + 5 + 2
    ref = restrict(ref, test.brain)  # every row is restricted to the brain alike
    for name, m in kept.items():
        np.testing.assert_array_equal(m, ref[name][keep], err_msg=name)
    # the pooled rows equal metrics of the whole in-memory maps
    from jaxvae.metrics.histogram import pixel_metrics

    for name in ("rec_error", "combi+pp", "ensemble+intensity", "null_intensity", "best_map"):
        direct = pixel_metrics(ref[name], test.lesion, test.brain)
        assert {k: got["predictors"][name][k] for k in direct} == direct, name
    _, none = score_dataset(model, params, test, settings=dataclasses.replace(
        settings, ensemble=False, predictors=("rec_error",)), keep=())
    rows = ("rec_error", "intensity", "rec_error_smooth", "null_intensity")
    assert {k: v.shape for k, v in none.items()} == {
        k: (0, 64, 64) for name in rows for k in (name, f"{name}+pp")}


def test_folds_pooled_over_their_own_models_and_thresholds():
    s = _phantom_like()
    models = [jaxvae.ConvVAE(latent_dim=8)] * 2
    params = [jaxvae.init_params(m, jax.random.key(i)) for i, m in enumerate(models)]
    tests = [s.for_cases(["case0", "case1", "case2"]), s.for_cases(["case3", "case4"])]
    vals = [s.for_cases(["case5"]), s.for_cases(["case2"])]
    settings = EvalSettings(predictors=("rec_error", "kl_grad", "rec_grad"), batch_size=8,
                            n_boot=30)
    folds = [(m, p, 1.0, t, v) for m, p, t, v in zip(models, params, tests, vals, strict=True)]
    per_fold, pooled = score_folds(folds, settings=settings)
    for f, (m, p, t, v) in enumerate(zip(models, params, tests, vals, strict=True)):
        alone, _ = score_dataset(m, p, t, val=v, settings=settings, keep=())
        assert json.dumps(per_fold[f]) == json.dumps(alone)
    assert pooled["n_cases"] == 5 and len(pooled["calibration"]["folds"]) == 2
    from jaxvae.metrics.histogram import pixel_metrics

    maps = [restrict(compute_maps(m, p, t.images, settings=settings), t.brain)["kl_grad"]
            for m, p, t in zip(models, params, tests, strict=True)]
    lesion = np.concatenate([t.lesion for t in tests])
    direct = pixel_metrics(np.concatenate(maps), lesion, np.concatenate([t.brain for t in tests]))
    assert pooled["predictors"]["kl_grad"]["auroc"] == direct["auroc"]
    from jaxvae.metrics.detection import SliceScores
    from jaxvae.metrics.histogram import Accumulator

    acc = Accumulator().update(np.concatenate(maps), lesion)
    assert pooled["curves"]["kl_grad"] == acc.curves()  # of the merged counts
    ids = np.concatenate([t.case_ids for t in tests])
    want = SliceScores(["kl_grad"], lesion, ids).update(
        np.arange(len(ids)), {"kl_grad": np.concatenate(maps)},
        np.concatenate([t.brain for t in tests])).result()  # each fold's maps, its own model
    got = pooled["detection"]
    assert got["slice"]["rows"]["kl_grad"] == want["slice"]["rows"]["kl_grad"]
    assert got["volume"]["rows"] == {} and "every test case" in got["volume"]["note"]
    assert pooled["detection"]["slice"]["n_pos"] == sum(r["detection"]["slice"]["n_pos"]
                                                        for r in per_fold)
    calls = np.concatenate([m >= r["calibration"]["thresholds"]["kl_grad"]
                            for m, r in zip(maps, per_fold, strict=True)])
    tp = (calls & lesion).sum()
    assert pooled["predictors"]["kl_grad"]["dice_val"] == pytest.approx(
        2 * tp / (calls.sum() + lesion.sum()))
    assert set(pooled["per_case"]["kl_grad"]) == {f"case{i}" for i in range(5)}


def test_results_carry_curves_and_both_detection_levels(tmp_path):
    s = _phantom_like()
    healthy = np.isin(s.case_ids, ["case2", "case5"])
    s = dataclasses.replace(s, lesion=s.lesion & ~healthy[:, None, None])
    rng = np.random.default_rng(4)
    maps = {"rec_error": s.images + 0.1 * rng.random(s.images.shape).astype(np.float32),
            "kl_grad": rng.random(s.images.shape).astype(np.float32)}
    res = score_maps(maps, s, settings=EvalSettings(n_boot=0, ensemble=False))
    assert set(res["curves"]) == set(res["predictors"]) == {
        "rec_error", "kl_grad", "intensity", "rec_error_smooth", "null_intensity"}
    for name, c in res["curves"].items():
        assert 2 < len(c["fpr"]) <= 256 and c["fpr"][-1] == c["tpr"][-1] == 1.0
        assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(res["predictors"][name]["auroc"],
                                                                 abs=1e-3)
    det = res["detection"]
    pos = s.lesion.any((1, 2))
    assert (det["slice"]["n_pos"], det["slice"]["n_neg"]) == (pos.sum(), (~pos).sum())
    assert (det["volume"]["n_pos"], det["volume"]["n_neg"]) == (4, 2)
    from sklearn.metrics import roc_auc_score

    from jaxvae.metrics.detection import slice_scores

    for name in ("rec_error", "kl_grad"):
        want = roc_auc_score(pos, slice_scores(maps[name], s.brain))
        assert det["slice"]["rows"][name]["auroc"] == pytest.approx(want, abs=1e-12)
        assert set(det["volume"]["rows"][name]) == {"auroc", "ap"}
    assert det["slice"]["rows"]["rec_error"]["auroc"] > det["slice"]["rows"]["kl_grad"]["auroc"]
    md = write_results(res, tmp_path)
    assert "volume (case): score = max over the case's slices" in md
    assert "| rec_error |" in detection_table(res) and "2 without" in detection_table(res)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["detection"] == json.loads(json.dumps(det))
    # every test case with a lesion: the volume level says so instead of a NaN
    only_sick = score_maps({"rec_error": maps["rec_error"]}, s.for_cases(["case0", "case1"]),
                           settings=EvalSettings(n_boot=0, ensemble=False))
    vol = only_sick["detection"]["volume"]
    assert vol["rows"] == {} and vol["note"] == "undefined: every test case has a lesion"
    assert "every test case has a lesion" in detection_table(only_sick)


def test_overlay_slices_largest_median_smallest_lesion():
    s = _phantom_like()
    s = dataclasses.replace(s, lesion=s.lesion & (s.case_ids != "case4")[:, None, None])
    per_slice = s.lesion.sum((1, 2))
    volume = {c: int(per_slice[s.case_ids == c].sum()) for c in s.cases}
    ranked = sorted((c for c in s.cases if volume[c]), key=lambda c: -volume[c])
    assert len(ranked) == 5 and len(set(volume.values())) == 6  # no ties in this data
    got = overlay_slices(s)
    assert [label.split(" (")[0] for _, label in got] == ["largest lesion", "median lesion",
                                                          "smallest lesion"]
    for (i, label), case in zip(got, [ranked[0], ranked[2], ranked[4]], strict=True):
        assert s.case_ids[i] == case and label.endswith(f"({case}, {volume[case]} px)")
        assert per_slice[i] == per_slice[s.case_ids == case].max()
    two = overlay_slices(s.for_cases([ranked[0], ranked[4], "case4"]))
    assert [label.split(" (")[0] for _, label in two] == ["largest lesion", "smallest lesion"]
    assert overlay_slices(s.for_cases(["case4"])) == []
    assert len(overlay_slices(s, n=1)) == 1 and len(overlay_slices(s, n=9)) == 5
