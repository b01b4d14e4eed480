"""Tests of jaxvae.metrics: hand-computed examples, sklearn / brute-force agreement, streaming."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from jaxvae.errors import ConfigError
from jaxvae.metrics import (
    Accumulator,
    MapsAccumulator,
    evaluate_maps,
    pixel_metrics,
    summarize_cases,
)


def brute_best_dice(s, y):
    """Best Dice over all thresholds "s >= t", t each unique score: the slow obvious way."""
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        best = max(best, 2 * np.sum(pred & y) / (pred.sum() + y.sum()))
    return best


def fast_best_dice(s, y):
    """Same as brute_best_dice, via one sort (for data too big for the loop)."""
    o = np.argsort(-s, kind="stable")
    s, y = s[o], y[o]
    tp, k = np.cumsum(y), np.arange(1, s.size + 1)
    last = np.r_[s[1:] != s[:-1], True]  # last pixel of each group of tied scores
    return float(np.max(2 * tp[last] / (k[last] + y.sum())))


def skewed(rng, n, kind):
    """Realistic skewed scores: lesion pixels (1-5%) score higher on average, with ties."""
    y = rng.random(n) < rng.choice([0.01, 0.03, 0.05])
    if kind == "lognormal":
        s = rng.lognormal(0.0, 1.5, n) * np.where(y, 2.0, 1.0)
    elif kind == "exponential":
        s = rng.exponential(1.0, n) + y * rng.exponential(0.5, n)
    else:  # rounded: heavy ties and many exact zeros (background of a rec_error map)
        s = np.round(rng.lognormal(-3.0, 2.0, n) * (1 + y), 3)
    return s.astype(np.float32), y


def test_hand_example():
    # desc: 0.8(+) 0.4(-) 0.35(+) 0.1(-). Pairs won: 0.8>both, 0.35>0.1 -> 3/4.
    # AP = .5*1 + .5*(2/3); Dice at t=0.35: TP 2, FP 1 -> 4/5, the best.
    r = pixel_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert r["auroc"] == pytest.approx(0.75, abs=1e-12)
    assert r["auprc"] == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)
    assert r["dice_best"] == pytest.approx(0.8, abs=1e-12)
    assert 0.4 > r["dice_threshold"] >= 0.35 * (1 - 2**-10)  # lower edge of 0.35's bin
    assert math.isnan(r["auroc_brain"])


def test_hand_example_with_ties_and_signed_zero():
    # pos {2, 1}, neg {1, -0.0, 1}: 2 beats 3 negs, 1 beats -0.0 and ties two 1s -> 5/6.
    # AP: t=2 P=1 R=.5; t=1 P=2/4 R=1 -> .75. Dice: t=2 -> 2/3, t=1 -> 4/6: first max, t=2.
    s = np.array([1.0, 1.0, 2.0, -0.0, 1.0])
    y = np.array([True, False, True, False, False])
    r = pixel_metrics(s, y)
    assert r["auroc"] == pytest.approx(5 / 6, abs=1e-12)
    assert r["auprc"] == pytest.approx(0.75, abs=1e-12)
    assert r["dice_best"] == pytest.approx(2 / 3, abs=1e-12)
    assert r["dice_threshold"] == 2.0  # powers of two start their bin exactly
    # -0.0 and +0.0 are one score: a positive at +0.0 ties a negative at -0.0
    assert pixel_metrics(np.array([0.0, -0.0]), np.array([1, 0]))["auroc"] == 0.5


def test_negative_scores_and_threshold_reproduces_dice():
    s = np.array([-3.0, -1.5, -1.0, 0.0, 2.5, -2.0])
    y = np.array([0, 1, 1, 0, 1, 0])
    r = pixel_metrics(s, y)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert r["dice_best"] == pytest.approx(brute_best_dice(s, y.astype(bool)), abs=1e-12)
    pred = s >= r["dice_threshold"]
    assert 2 * np.sum(pred & (y == 1)) / (pred.sum() + y.sum()) == pytest.approx(r["dice_best"])


@pytest.mark.parametrize("kind", ["lognormal", "exponential", "rounded"])
def test_agrees_with_sklearn_and_brute_force(kind):
    rng = np.random.default_rng(1)
    s, y = skewed(rng, 200_000, kind)
    r = pixel_metrics(s, y)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert r["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-3)
    assert r["dice_best"] == pytest.approx(fast_best_dice(s, y), abs=1e-3)


def test_brute_force_dice_small():
    rng = np.random.default_rng(2)
    s, y = skewed(rng, 3000, "rounded")
    assert pixel_metrics(s, y)["dice_best"] == pytest.approx(brute_best_dice(s, y), abs=1e-3)
    assert fast_best_dice(s, y) == pytest.approx(brute_best_dice(s, y), abs=1e-12)


def test_coarse_bins_lose_accuracy():
    # the bin resolution is what limits accuracy: 0 mantissa bits (one bin per octave) must
    # be visibly worse than the default on the same data, else the bins are not binning
    rng = np.random.default_rng(3)
    s, y = skewed(rng, 50_000, "exponential")
    exact = roc_auc_score(y, s)
    err0 = abs(pixel_metrics(s, y, mantissa_bits=0)["auroc"] - exact)
    err10 = abs(pixel_metrics(s, y)["auroc"] - exact)
    assert err0 > 10 * err10 and err0 > 1e-3


def test_streaming_equals_one_shot():
    rng = np.random.default_rng(4)
    s, y = skewed(rng, 30_000, "lognormal")
    b = rng.random(s.size) < 0.6
    one = pixel_metrics(s, y, b)
    acc = Accumulator()
    order = rng.permutation(7)  # chunks in any order give the same counts
    chunks = np.array_split(np.arange(s.size), 7)
    for i in order:
        acc.update(s[chunks[i]], y[chunks[i]], b[chunks[i]])
    assert acc.result() == one
    merged = Accumulator().update(s[:1000], y[:1000], b[:1000])
    merged.merge(Accumulator().update(s[1000:], y[1000:], b[1000:]))
    assert merged.result() == one


def test_state_size_does_not_grow():
    acc = Accumulator(mantissa_bits=6)
    sizes = lambda: {k: v.nbytes for k, v in vars(acc).items() if isinstance(v, np.ndarray)}
    rng = np.random.default_rng(5)
    acc.update(*skewed(rng, 100, "lognormal"))
    before = sizes()
    for _ in range(5):
        acc.update(*skewed(rng, 200_000, "lognormal"))
    assert sizes() == before and sum(before.values()) == 2 * 2 * 2 ** 15 * 8
    assert acc.n_pixels == 100 + 5 * 200_000


def test_brain_restricted_auroc():
    rng = np.random.default_rng(6)
    s, y = skewed(rng, 100_000, "rounded")
    brain = rng.random(s.size) < 0.4
    brain[y] = True  # lesions lie in the brain
    r = pixel_metrics(s.reshape(100, 1000), y.reshape(100, 1000), brain.reshape(100, 1000))
    assert r["auroc_brain"] == pytest.approx(roc_auc_score(y[brain], s[brain]), abs=1e-3)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    assert r["auroc_brain"] != pytest.approx(r["auroc"], abs=1e-3)  # it really is restricted


def test_degenerate_inputs_give_nan():
    s = np.array([0.1, 0.5, 0.2])
    healthy = pixel_metrics(s, np.zeros(3, bool))
    assert all(math.isnan(healthy[k]) for k in healthy)
    all_lesion = pixel_metrics(s, np.ones(3, bool))
    assert math.isnan(all_lesion["auroc"])
    assert all_lesion["auprc"] == 1.0 and all_lesion["dice_best"] == 1.0
    empty = pixel_metrics(np.zeros(0), np.zeros(0, bool))
    assert math.isnan(empty["auroc"])


def test_invalid_inputs_raise():
    with pytest.raises(ConfigError, match="shape"):
        pixel_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(ConfigError, match="brain mask shape"):
        pixel_metrics(np.zeros(3), np.zeros(3), np.zeros(2))
    with pytest.raises(ConfigError, match="binary"):
        pixel_metrics(np.zeros(3), np.array([0, 2, 1]))
    with pytest.raises(ConfigError, match="binary"):
        pixel_metrics(np.zeros(2), np.zeros(2), np.array([0.5, 1.0]))
    with pytest.raises(ConfigError, match="NaN"):
        pixel_metrics(np.array([0.0, np.nan]), np.array([0, 1]))
    with pytest.raises(ConfigError, match="mantissa_bits"):
        Accumulator(mantissa_bits=20)


def make_set(rng):
    """Three cases of 4 slices 8x8: case c has lesions, case h is healthy."""
    s = rng.lognormal(0.0, 1.0, (12, 8, 8)).astype(np.float32)
    lesion = np.zeros((12, 8, 8), bool)
    lesion[0:4, 2:5, 2:5] = True
    lesion[8:12, 4:7, 1:3] = True
    s[lesion] += 1.0
    brain = np.zeros((12, 8, 8), bool)
    brain[:, 1:7, 1:7] = True
    ids = np.array(["a"] * 4 + ["h"] * 4 + ["c"] * 4)
    return s, lesion, brain, ids


def test_evaluate_maps_pooled_and_per_case():
    rng = np.random.default_rng(7)
    s, lesion, brain, ids = make_set(rng)
    out = evaluate_maps({"m": s, "neg": -s}, lesion, brain, ids)
    assert set(out) == {"m", "neg"}
    res = out["m"]
    assert res["pooled"] == pixel_metrics(s, lesion, brain)
    assert list(res["per_case"]) == ["a", "c", "h"]
    for c in "ac":
        sl = ids == c
        exp = roc_auc_score(lesion[sl].ravel(), s[sl].ravel())
        assert res["per_case"][c]["auroc"] == pytest.approx(exp, abs=1e-3)
        assert res["per_case"][c] == pixel_metrics(s[sl], lesion[sl], brain[sl])
    assert math.isnan(res["per_case"]["h"]["auroc"])
    summ = res["per_case_summary"]
    assert summ["auroc"]["n"] == 2  # the healthy case is skipped, not counted as 0
    mean = (res["per_case"]["a"]["auroc"] + res["per_case"]["c"]["auroc"]) / 2
    assert summ["auroc"]["mean"] == pytest.approx(mean)
    assert out["neg"]["pooled"]["auroc"] == pytest.approx(1 - res["pooled"]["auroc"], abs=1e-9)
    only = evaluate_maps({"m": s}, lesion, None, ids, per_case=False)["m"]
    assert set(only) == {"pooled"} and math.isnan(only["pooled"]["auroc_brain"])


def test_summarize_cases_all_nan():
    nan = math.nan
    summ = summarize_cases({"h": {"auroc": nan, "auroc_brain": nan, "auprc": nan,
                                  "dice_best": nan, "dice_threshold": nan}})
    assert summ["auroc"]["n"] == 0 and math.isnan(summ["auroc"]["mean"])


def test_evaluate_maps_shape_errors():
    rng = np.random.default_rng(8)
    s, lesion, brain, ids = make_set(rng)
    with pytest.raises(ConfigError, match="map 'm' shape"):
        evaluate_maps({"m": s[:, :4]}, lesion, brain, ids)
    with pytest.raises(ConfigError, match="case_ids"):
        evaluate_maps({"m": s}, lesion, brain, ids[:3])
    with pytest.raises(ConfigError, match="brain shape"):
        evaluate_maps({"m": s}, lesion, brain[:2], ids)


def test_maps_accumulator_any_batches_equal_evaluate_maps():
    # interleaved cases (not contiguous) fed in shuffled, uneven batches: the same numbers
    # as scoring each case on its own, and a case is scored (its buffer dropped) as soon as
    # its last slice arrives
    rng = np.random.default_rng(9)
    s, lesion, brain, ids = make_set(rng)
    order = rng.permutation(len(ids))
    ids = ids[order]
    maps = {"m": s, "sq": s**2}
    want = evaluate_maps(maps, lesion, brain, ids)
    acc = MapsAccumulator(["m", "sq"], ids)
    feed = rng.permutation(len(ids))
    for part in np.split(feed, [1, 5, 6, 11]):
        acc.update(part, {k: v[part] for k, v in maps.items()}, lesion[part], brain[part])
        done = set(ids) - set(ids[feed[feed.tolist().index(part[-1]) + 1:]])
        assert set(acc._rows["m"]) == done and not done & set(acc._buffer)
    # healthy case 'h' has NaN metrics: compare the JSON text (NaN == NaN there, and order)
    assert json.dumps(acc.result()) == json.dumps(want)
    only = MapsAccumulator(["m"], ids, per_case=False).update(feed[:7], {"m": s[feed[:7]]},
                                                              lesion[feed[:7]], None)
    assert only.result() == {"m": {"pooled": pixel_metrics(s[feed[:7]], lesion[feed[:7]])}}


def test_maps_accumulator_errors():
    rng = np.random.default_rng(10)
    s, lesion, brain, ids = make_set(rng)
    acc = MapsAccumulator(["m"], ids)
    with pytest.raises(ConfigError, match=r"maps \['m'\] missing"):
        acc.update([0], {"x": s[:1]}, lesion[:1])
    with pytest.raises(ConfigError, match="one slice per index"):
        acc.update([0, 1], {"m": s[:1]}, lesion[:1])
    acc.update([0, 1], {"m": s[:2]}, lesion[:2], brain[:2])
    with pytest.raises(ConfigError, match="not fed completely"):
        acc.result()
    with pytest.raises(ConfigError, match="more slices fed"):
        acc.update([0, 1, 2], {"m": s[:3]}, lesion[:3], brain[:3])
