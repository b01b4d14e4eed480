import dataclasses
import json

import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

import jaxvae
from jaxvae.data.datasets import SliceSet
from jaxvae.errors import OutputError
from jaxvae.evaluate import (
    EvalSettings,
    compute_maps,
    postprocess_maps,
    results_table,
    score_dataset,
    score_maps,
    write_results,
)


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


def test_score_maps_rows_baseline_and_ensemble_split(model_params):
    s = _slices(20, cases=10)
    rng = np.random.default_rng(1)
    maps = {"rec_error": s.lesion + rng.random(s.lesion.shape).astype(np.float32),
            "kl_grad": rng.random(s.lesion.shape).astype(np.float32),
            "rec_grad": rng.random(s.lesion.shape).astype(np.float32)}
    res = score_maps(maps, s, settings=EvalSettings(fit_fraction=0.2))
    rows = res["predictors"]
    assert set(rows) == {"rec_error", "kl_grad", "rec_grad", "intensity"}
    assert rows["rec_error"]["auroc"] == pytest.approx(1.0)
    assert 0.4 < rows["kl_grad"]["auroc"] < 0.6
    assert rows["intensity"]["auroc"] > 0.9
    ens = res["ensemble"]["ensemble"]
    fit, test = set(ens["weights"]["fit_cases"]), set(ens["weights"]["test_cases"])
    assert fit and test and not fit & test and fit | test == set(s.cases)
    assert res["n_cases"] == 10 and res["n_slices"] == 20
    md = results_table(res)
    assert "| intensity (baseline) |" in md and "| ensemble+intensity |" in md


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]


# ---- streaming == the former all-in-memory computation ---------------------------------------

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


def _reference_pixels(maps, lesion, brain, case_ids, per_case=True):
    """The former evaluate_maps: each case scored on its own, the pooled counts their sum."""
    from jaxvae.metrics import Accumulator, summarize_cases

    out = {}
    for name, m in maps.items():
        if not per_case:
            out[name] = {"pooled": Accumulator().update(m, lesion, brain).result()}
            continue
        pooled, rows = Accumulator(), {}
        for c in np.unique(case_ids):
            sl = np.flatnonzero(case_ids == c)
            acc = Accumulator().update(m[sl], lesion[sl], brain[sl])
            rows[str(c)] = acc.result()
            pooled.merge(acc)
        out[name] = {"pooled": pooled.result(), "per_case_summary": summarize_cases(rows)}
    return out


def _reference_ensemble(features, lesion, case_ids, brain, fit_fraction, seed, log_features):
    """The former fit_ensemble: the (S, H, W) fit mask, flatnonzero, subsample, fit."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from jaxvae.ensemble import Ensemble, split_fit_cases

    fit_ids, test_ids = split_fit_cases(case_ids, fit_fraction, seed)
    use = np.isin(case_ids, fit_ids)[:, None, None] & brain
    idx = np.flatnonzero(use)
    if idx.size > 200_000:
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=200_000, replace=False))
    y = lesion.reshape(-1)[idx]
    cols, log_scale = [], np.zeros(len(features))
    for f, (name, m) in enumerate(features.items()):
        x = m.reshape(-1)[idx].astype(np.float64)
        if name in log_features:
            log_scale[f] = np.median(x[x > 0])
            x = np.log1p(x / log_scale[f])
        cols.append(x)
    scaler = StandardScaler().fit(np.stack(cols, 1))
    clf = LogisticRegression(class_weight="balanced", max_iter=1000)
    clf.fit(scaler.transform(np.stack(cols, 1)), y)
    return Ensemble(tuple(features), log_scale, scaler.mean_, scaler.scale_, clf.coef_[0],
                    float(clf.intercept_[0]), tuple(fit_ids), tuple(test_ids), idx.size,
                    int(y.sum()))


def _reference_results(maps, s, settings):
    """The former score_maps on maps held in memory; adds the rows to `maps` in place."""
    ids = np.asarray(s.case_ids)
    maps["intensity"] = s.images
    if settings.postprocess:
        for name in list(maps):
            maps[f"{name}+pp"] = postprocess_maps(maps[name], s.brain)
    scored = _reference_pixels(maps, s.lesion, s.brain, ids)
    res = {"n_cases": len(np.unique(ids)), "n_slices": len(s.images),
           "n_lesion_pixels": int(s.lesion.sum()), "settings": dataclasses.asdict(settings),
           "beta": 1.0, "predictors": {k: {**r["pooled"], "per_case": r["per_case_summary"]}
                                       for k, r in scored.items()}, "ensemble": {}}
    feats = ["rec_error", "kl_grad", "rec_grad"]
    for name, names in {"ensemble": feats, "ensemble+intensity": [*feats, "intensity"]}.items():
        ens = _reference_ensemble({f: maps[f] for f in names}, s.lesion, ids, s.brain,
                                  settings.fit_fraction, settings.seed, feats)
        test = np.isin(ids, ens.test_cases)
        rows = {name: ens.predict({f: maps[f][test] for f in names})}
        rows.update({f: maps[f][test] for f in names})
        scored = _reference_pixels(rows, s.lesion[test], s.brain[test], ids[test], False)
        maps[name] = np.zeros(s.lesion.shape, np.float32)
        maps[name][test] = rows[name]
        res["ensemble"][name] = {**scored[name]["pooled"], "weights": ens.to_json(),
                                 "singles_on_test_cases": {f: scored[f]["pooled"]
                                                           for f in names}}
    return res


def test_streamed_results_equal_the_all_in_memory_computation(model_params):
    model, params = model_params
    s = _phantom_like()  # 31 slices of 6 cases, batches of 4: batches straddle cases
    settings = EvalSettings(predictors=("rec_error", "kl_grad", "rec_grad", "combi",
                                        "proj_rec_error"),
                            batch_size=4, combi_group=2, n_samples=2, proj_steps=2,
                            fit_fraction=0.34, postprocess=True)
    maps = compute_maps(model, params, s.images, settings=settings)
    want = _reference_results(dict(maps), s, settings)
    keep = [30, 2, 17, 1]  # any order; straddling the fit and held-out cases
    got, kept = score_dataset(model, params, s, settings=settings, keep=keep)
    # histogram counts do not depend on the order pixels arrive in, and the ensemble is
    # fitted on the same pixels' same float32 values: equal, not merely close
    assert json.dumps(got) == json.dumps(want)
    fit = set(got["ensemble"]["ensemble"]["weights"]["fit_cases"])
    assert fit and set(s.case_ids[keep]) - fit and set(s.case_ids[keep]) & fit
    ref = dict(maps)
    _reference_results(ref, s, settings)  # the reference's rows, in memory
    assert set(kept) == set(ref) and len(kept) == 5 + 1 + 6 + 2
    for name, m in kept.items():
        np.testing.assert_array_equal(m, ref[name][keep], err_msg=name)
    # from maps in memory, any batch size: the same numbers, rows added in place
    again = dict(maps)
    assert json.dumps(score_maps(again, s, settings=settings)) == json.dumps(want)
    assert set(again) == set(ref)
    np.testing.assert_array_equal(again["ensemble+intensity"], ref["ensemble+intensity"])
    _, none = score_dataset(model, params, s, settings=dataclasses.replace(
        settings, ensemble=False, predictors=("rec_error",)), keep=())
    assert {k: v.shape for k, v in none.items()} == {"rec_error": (0, 64, 64),
                                                     "intensity": (0, 64, 64),
                                                     "rec_error+pp": (0, 64, 64),
                                                     "intensity+pp": (0, 64, 64)}


def test_streaming_fits_on_the_fit_batches_only(model_params, monkeypatch):
    # the fit pass computes only the batches holding fit pixels, without the projection;
    # the scoring pass computes every batch once
    import jaxvae.evaluate as ev

    model, params = model_params
    s = _phantom_like()
    settings = EvalSettings(predictors=("rec_error", "kl_grad", "rec_grad", "proj_rec_error"),
                            batch_size=4, proj_steps=1, fit_fraction=0.2)
    calls, real = [], ev._map_batches

    def spy(*a, only=None, projection=True, **kw):
        for rows, maps in real(*a, only=only, projection=projection, **kw):
            calls.append((only is not None, rows[0] // 4, sorted(maps)))
            yield rows, maps

    monkeypatch.setattr(ev, "_map_batches", spy)
    res, _ = ev.score_dataset(model, params, s, settings=settings, keep=())
    fit = np.flatnonzero(np.isin(s.case_ids, res["ensemble"]["ensemble"]["weights"]["fit_cases"]))
    first = [(b, m) for f, b, m in calls if f]
    assert [b for b, _ in first] == sorted(set((fit // 4).tolist()))
    assert all("proj_rec_error" not in m for _, m in first)
    assert [b for f, b, _ in calls if not f] == list(range(8))  # 31 slices: 8 batches
