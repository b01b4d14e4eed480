from pathlib import Path

import numpy as np
import pytest

from jaxvae.base.errors import OutputError
from jaxvae.report.figures import (
    _area,
    curves_figure,
    map_figure,
    overlay_figure,
    pick_slices,
    scale_map,
)


def test_pick_slices_prefers_large_lesions_of_different_cases():
    lesion = np.zeros((6, 8, 8), bool)
    for s, area in enumerate([0, 5, 9, 7, 2, 0]):
        lesion[s].flat[:area] = True
    assert pick_slices(lesion, n=2) == [2, 3]
    ids = np.array(["a", "a", "a", "a", "b", "b"])
    assert pick_slices(lesion, n=2, case_ids=ids) == [2, 4]
    assert pick_slices(np.zeros((3, 8, 8)), n=2) == [0, 1]  # no lesion: first slices


def test_map_figure_writes_png_and_refuses_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 16, 16))
    lesion = images > 1
    path = tmp_path / "f.png"
    map_figure(path, images, lesion, {"m": rng.random((3, 16, 16))}, recon=images)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputError):
        map_figure(path, images, lesion, {"m": images})


def test_map_figure_without_truth_column(tmp_path):
    images = np.random.default_rng(1).normal(size=(2, 16, 16))
    map_figure(tmp_path / "g.png", images, None, {"m": images}, index=[1])
    assert (tmp_path / "g.png").stat().st_size > 100


PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_area_is_the_trapezoid_rule_in_either_direction():
    assert _area([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)
    assert _area([1, 0.5, 0], [0.2, 0.6, 1.0]) == pytest.approx(0.6)  # PR: recall decreasing
    assert np.isnan(_area([0.3], [0.3]))


def _roc(a):  # a concave ROC and a PR curve from recall 1 (precision 0.1 = prevalence) to 0
    x = np.linspace(0, 1, 50)
    return {"fpr": x.tolist(), "tpr": (x ** a).tolist(), "recall": x[::-1].tolist(),
            "precision": (0.1 + 0.8 * (1 - x[::-1]) ** a).tolist()}


def test_curves_figure_writes_png_and_refuses_overwrite(tmp_path):
    curves = {"rec_error": _roc(0.3), "intensity": _roc(0.5), "ensemble": _roc(0.2),
              "roc_only": {"fpr": [0, 1], "tpr": [0, 1]}}
    path = tmp_path / "curves.png"
    curves_figure(path, curves, title="t")
    w, h = _png_size(path)
    assert 600 < w < 2000 and 300 < h < 1000
    with pytest.raises(OutputError, match="curves.png"):
        curves_figure(path, curves)
    curves_figure(path, curves, overwrite=True)
    with pytest.raises(ValueError, match="no curves"):
        curves_figure(tmp_path / "empty.png", {})


def test_scale_map_threshold_maps_to_one_and_clips():
    m = np.arange(101, dtype=np.float64)[None]  # 0..100: brain p1 = 1 exactly
    scaled, t = scale_map(m, np.ones_like(m, bool), threshold=26.0)
    assert t == 26.0
    assert scaled[0, 26] == 1.0 and scaled[0, 1] == 0.0 and scaled[0, 13] == 0.48
    assert scaled[0, 0] == 0.0  # below p1: clipped at 0
    assert scaled[0, 51] == 2.0 and (scaled[0, 51:] == 2.0).all()  # clipped at 2
    np.testing.assert_allclose(scaled[0, :52], np.clip((np.arange(52) - 1) / 25, 0, 2))


def test_scale_map_masks_outside_the_brain_and_defaults_to_p99():
    rng = np.random.default_rng(0)
    m = rng.random((16, 16)).astype(np.float32)
    brain = np.zeros((16, 16), bool)
    brain[4:12, 4:12] = True
    m[~brain] = np.finfo(np.float32).min  # as ensemble maps hold outside the brain
    scaled, t = scale_map(m, brain)
    assert np.isnan(scaled[~brain]).all() and np.isfinite(scaled[brain]).all()
    assert t == pytest.approx(np.percentile(m[brain], 99))
    assert scaled[brain].min() == 0 and 0.95 < np.median(scaled[brain]) * 2 < 1.1
    assert np.isnan(scale_map(m, np.zeros_like(brain))[0]).all()
    low, _ = scale_map(m, brain, threshold=-1.0)  # below everything: all flagged
    assert (low[brain] == 2).all()


def test_overlay_figure_writes_png(tmp_path):
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:64, :64]
    brain = (yy - 32) ** 2 + (xx - 32) ** 2 < 26 ** 2
    lesion = (yy - 40) ** 2 + (xx - 25) ** 2 < 5 ** 2
    image = brain * (1 + 0.1 * rng.normal(size=(64, 64))) + lesion
    ens = np.where(brain, image + rng.normal(size=(64, 64)), np.finfo(np.float32).min)
    maps = {"rec_error": np.abs(image - 1) * brain, "ensemble": ens.astype(np.float32)}
    path = tmp_path / "overlay.png"
    overlay_figure(path, image, lesion, brain, maps, thresholds={"ensemble": 1.5}, title="c1")
    w, h = _png_size(path)
    assert 400 < w < 1500 and 150 < h < 600
    assert path.stat().st_size > 5000  # drawn, not an empty canvas
    with pytest.raises(OutputError):
        overlay_figure(path, image, lesion, brain, maps)
    overlay_figure(tmp_path / "bare.png", image, None, brain, {})  # image only, no truth
