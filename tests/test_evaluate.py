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
