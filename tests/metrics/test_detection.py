"""Tests of jaxvae.metrics.detection: slice scores, slice- and case-level AUROC / AP."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from jaxvae.base.errors import ConfigError
from jaxvae.metrics.detection import SliceScores, slice_scores


def _data(seed=0, cases=8, per_case=5):
    """Maps with an exact-zero background, a brain disc per slice (one slice without brain),
    lesions raising the map in a few slices of some cases."""
    rng = np.random.default_rng(seed)
    n = cases * per_case
    yy, xx = np.mgrid[:16, :16]
    brain = np.repeat(((yy - 8) ** 2 + (xx - 8) ** 2 < 36)[None], n, 0)
    brain[3] = False  # a slice outside the brain
    lesion = np.zeros((n, 16, 16), bool)
    for i in range(n):
        if (i // per_case) % 3 != 0 and i % per_case in (1, 2):
            lesion[i, 6:9, 6:10] = True
    maps = {"a": np.where(brain, rng.random((n, 16, 16)) + 2.0 * lesion, 0.0),
            "b": np.where(brain, rng.random((n, 16, 16)), 0.0)}
    ids = np.repeat([f"c{k}" for k in range(cases)], per_case)
    return maps, brain, lesion, ids


def test_slice_scores_are_the_quantile_inside_the_brain():
    maps, brain, _, _ = _data()
    got = slice_scores(maps["a"], brain)
    assert math.isnan(got[3])  # no brain pixel: no score
    for i in (0, 1, 7):
        assert got[i] == np.quantile(maps["a"][i][brain[i]], 0.99)
        assert got[i] != np.quantile(maps["a"][i], 0.99)  # the background is not counted
    np.testing.assert_array_equal(slice_scores(maps["a"], None, q=1.0), maps["a"].max((1, 2)))
    with pytest.raises(ConfigError, match="brain shape"):
        slice_scores(maps["a"], brain[:2])


def test_levels_equal_sklearn_on_slices_and_on_case_maxima():
    maps, brain, lesion, ids = _data()
    acc = SliceScores(["a", "b"], lesion, ids)
    for idx in np.array_split(np.random.default_rng(1).permutation(len(ids)), 4):  # any order
        acc.update(idx, {k: m[idx] for k, m in maps.items()}, brain[idx])
    res = acc.result()
    keep = np.arange(len(ids)) != 3
    pos = lesion.any((1, 2))
    sl = res["slice"]
    assert (sl["n_pos"], sl["n_neg"], sl["n_excluded"]) == (pos.sum(), (~pos[keep]).sum(), 1)
    assert sl["score"] == "q0.99 of the map inside the brain" and "note" not in sl
    for k, m in maps.items():
        s = np.array([np.quantile(m[i][brain[i]], 0.99) for i in np.flatnonzero(keep)])
        assert sl["rows"][k]["auroc"] == pytest.approx(roc_auc_score(pos[keep], s), abs=1e-12)
        assert sl["rows"][k]["ap"] == pytest.approx(average_precision_score(pos[keep], s),
                                                    abs=1e-12)
        cases = sorted(set(ids))
        cs = [max(s[ids[keep] == c]) for c in cases]
        cy = [pos[ids == c].any() for c in cases]
        vol = res["volume"]
        assert vol["rows"][k]["auroc"] == pytest.approx(roc_auc_score(cy, cs), abs=1e-12)
        assert vol["rows"][k]["ap"] == pytest.approx(average_precision_score(cy, cs), abs=1e-12)
    assert (res["volume"]["n_pos"], res["volume"]["n_neg"]) == (5, 3)
    assert sl["rows"]["a"]["auroc"] > 0.9 > sl["rows"]["b"]["auroc"]  # the lesions show in "a"


def test_one_class_levels_carry_a_note_not_nan():
    maps, brain, lesion, ids = _data()
    sick = lesion.copy()
    sick[:, 0, 0] = True  # every slice (and case) has a lesion
    res = SliceScores(["a"], sick, ids).update(np.arange(len(ids)), maps, brain).result()
    for level, unit in (("slice", "slice"), ("volume", "case")):
        assert res[level]["rows"] == {}
        assert res[level]["note"] == f"undefined: every test {unit} has a lesion"
    res = SliceScores(["a"], np.zeros_like(lesion), ids).update(np.arange(len(ids)), maps,
                                                                 brain).result()
    assert res["volume"]["note"] == "undefined: no test case has a lesion"
    assert res["volume"]["n_neg"] == 8 and res["volume"]["n_pos"] == 0


def test_merged_folds_pool_their_slices():
    maps, brain, lesion, ids = _data()
    parts = [np.arange(0, 20), np.arange(20, 40)]
    accs = [SliceScores(["a", "b"], lesion[p], ids[p]).update(
        np.arange(p.size), {k: m[p] for k, m in maps.items()}, brain[p]) for p in parts]
    whole = SliceScores(["a", "b"], lesion, ids).update(np.arange(len(ids)), maps, brain)
    assert accs[0].merge(accs[1]).result() == whole.result()
    with pytest.raises(ConfigError, match="merge"):
        whole.merge(SliceScores(["a"], lesion, ids))
