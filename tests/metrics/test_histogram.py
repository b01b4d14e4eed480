"""Tests of jaxvae.metrics.histogram: hand-computed examples, sklearn / brute-force agreement,
streaming."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from jaxvae.base.errors import ConfigError
from jaxvae.metrics import bootstrap
from jaxvae.metrics.bootstrap import CaseHist, bootstrap_ci, bootstrap_samples
from jaxvae.metrics.cases import MapsAccumulator, evaluate_maps
from jaxvae.metrics.histogram import METRIC_KEYS, Accumulator, pixel_metrics, summarize_cases


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
        row = res["per_case"][c]
        assert {k: row[k] for k in METRIC_KEYS} == pixel_metrics(s[sl], lesion[sl], brain[sl])
        assert row["lesion_pixels"] == lesion[sl].sum() and row["brain_pixels"] == brain[sl].sum()
        assert set(row) == {*METRIC_KEYS, "lesion_pixels", "brain_pixels"}  # no threshold
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


def brute_counts(s, y, brain, t):
    """tp, fp, fn, brain_above, brain of "s >= t", the obvious way."""
    pred = s >= t
    return {"tp": int(np.sum(pred & y)), "fp": int(np.sum(pred & ~y)),
            "fn": int(np.sum(~pred & y)), "brain_above": int(np.sum(pred & brain)),
            "brain": int(brain.sum())}


def brute_dice(c):
    return 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) if c["tp"] + c["fn"] else math.nan


def test_counts_at_bin_edges_equal_brute_force():
    rng = np.random.default_rng(11)
    s, y = skewed(rng, 50_000, "rounded")  # heavy ties and exact zeros
    brain = rng.random(s.size) < 0.5
    brain[y] = True
    acc = Accumulator().update(s, y, brain)
    # bin lower edges: dice_threshold, a quantile, 0, a power of two, -inf, and some pixels'
    # scores with the 13 low bits (below the 10 kept mantissa bits) cleared
    low = (s[rng.integers(0, s.size, 5)].view(np.uint32) & ~np.uint32(0x1FFF)).view(np.float32)
    edges = [acc.result()["dice_threshold"], acc.threshold_at_quantile(0.9), 0.0, 2.0**-5,
             -math.inf, *low.tolist()]
    for t in edges:
        want = brute_counts(s, y, brain, t)
        assert acc.counts_at(t) == want, t
        assert acc.dice_at(t) == pytest.approx(brute_dice(want), abs=1e-12)
    assert acc.dice_at(acc.result()["dice_threshold"]) == pytest.approx(acc.result()["dice_best"])
    # without a brain mask, "brain" counts all pixels
    plain = Accumulator().update(s, y).counts_at(2.0**-5)
    assert plain == brute_counts(s, y, np.ones(s.size, bool), 2.0**-5)


def test_counts_at_inside_a_bin_counts_the_whole_bin():
    # documented: a threshold that is not a bin edge counts its whole bin as >= it
    s = np.array([1.0, 1.0001, 1.5, 0.5])
    y = np.array([1, 0, 1, 0])
    c = Accumulator().update(s, y).counts_at(1.0002)  # same bin as 1.0 and 1.0001
    assert (c["tp"], c["fp"], c["fn"]) == (2, 1, 0)
    assert brute_counts(s, y == 1, np.ones(4, bool), 1.0002)["tp"] == 1  # the exact answer
    with pytest.raises(ConfigError, match="NaN"):
        Accumulator().update(s, y).counts_at(math.nan)


def test_threshold_at_quantile_flags_the_right_fraction():
    rng = np.random.default_rng(12)
    s = rng.lognormal(0.0, 1.5, 100_000).astype(np.float32)
    brain = rng.random(s.size) < 0.6
    s[~brain] *= 10  # outside the brain is different: the quantile must ignore it
    acc = Accumulator().update(s, np.zeros(s.size, bool), brain)
    sb = s[brain]
    for q in (0.5, 0.9, 0.99):
        t = acc.threshold_at_quantile(q)
        # at most 1 - q flagged at t, more at the next lower bin edge (t is positive here)
        assert np.sum(sb >= t) <= (1 - q) * sb.size < np.sum(sb >= t * (1 - 2**-10))
        assert t == pytest.approx(np.quantile(sb, q), rel=2e-3)
        assert acc.counts_at(t)["brain_above"] == np.sum(sb >= t)  # an edge: exact
    plain = Accumulator().update(s, np.zeros(s.size, bool))  # no mask: all pixels
    t = plain.threshold_at_quantile(0.99)
    assert np.sum(s >= t) <= 0.01 * s.size < np.sum(s >= t * (1 - 2**-10))
    assert acc.threshold_at_quantile(0.0) == -math.inf
    assert acc.counts_at(acc.threshold_at_quantile(1.0))["brain_above"] == 0
    with pytest.raises(ConfigError, match="quantile"):
        acc.threshold_at_quantile(1.5)
    with pytest.raises(ConfigError, match="no .*pixels"):
        Accumulator().threshold_at_quantile(0.5)


def test_maps_accumulator_thresholds_per_case_and_pooled():
    rng = np.random.default_rng(13)
    s, lesion, brain, ids = make_set(rng)
    t_m = pixel_metrics(s, lesion, brain)["dice_threshold"]  # a bin edge
    maps = {"m": s, "sq": s**2, "plain": -s}
    thr = {"m": t_m, "sq": 2.0}
    acc = MapsAccumulator(list(maps), ids, thresholds=thr)
    for part in np.split(rng.permutation(len(ids)), [5]):
        acc.update(part, {k: v[part] for k, v in maps.items()}, lesion[part], brain[part])
    res = acc.result()
    for name, t in thr.items():
        for c in "ach":
            sl = ids == c
            want = brute_counts(maps[name][sl], lesion[sl], brain[sl], t)
            row = res[name]["per_case"][c]
            assert {k: row[k] for k in ("tp", "fp", "fn")} == {k: want[k] for k in
                                                                ("tp", "fp", "fn")}
            np.testing.assert_allclose(row["dice_val"], brute_dice(want), atol=1e-12)
            assert row["frac_above"] == pytest.approx(want["brain_above"] / want["brain"])
            assert row["lesion_pixels"] == lesion[sl].sum() and row["brain_pixels"] == 144
        want = brute_counts(maps[name], lesion, brain, t)
        pooled = res[name]["pooled"]
        assert pooled["dice_val"] == pytest.approx(brute_dice(want), abs=1e-12)
        assert pooled["frac_above"] == pytest.approx(want["brain_above"] / want["brain"])
        assert 0 < pooled["dice_val"] < 1 and 0 < pooled["frac_above"] < 1  # not trivial
    assert math.isnan(res["m"]["per_case"]["h"]["dice_val"])  # healthy: no Dice
    summ = res["m"]["per_case_summary"]
    assert summ["dice_val"]["n"] == 2 and summ["frac_above"]["n"] == 3
    rows = res["m"]["per_case"]
    assert summ["dice_val"]["mean"] == pytest.approx((rows["a"]["dice_val"]
                                                      + rows["c"]["dice_val"]) / 2)
    # a map without a threshold gets none of the threshold keys
    assert "dice_val" not in res["plain"]["pooled"] and "tp" not in res["plain"]["per_case"]["a"]
    assert "dice_val" not in res["plain"]["per_case_summary"]
    with pytest.raises(ConfigError, match="not among"):
        MapsAccumulator(["m"], ids, thresholds={"x": 1.0})
    with pytest.raises(ConfigError, match="NaN"):
        MapsAccumulator(["m"], ids, thresholds={"m": math.nan})


def test_case_hist_rebins_exactly():
    # bins nest: re-binning a 10-bit histogram to 7 bits equals binning at 7 bits directly
    rng = np.random.default_rng(14)
    s, y = skewed(rng, 20_000, "lognormal")
    s[:50] = -s[:50]
    b = rng.random(s.size) < 0.5
    h = CaseHist.from_accumulator(Accumulator().update(s, y, b), bits=7, threshold=1.0)
    a7 = Accumulator(mantissa_bits=7).update(s, y, b)
    both = np.concatenate([a7.counts, a7.counts_brain], 1)
    nz = np.flatnonzero(both.any(1))
    assert np.array_equal(h.bins, nz) and np.array_equal(h.counts, both[nz])
    assert h.nbytes == 20 * nz.size < 100_000 and h.has_brain
    assert h.at_threshold == Accumulator().update(s, y, b).counts_at(1.0)  # exact, not coarse


def _auc(y, s):
    return roc_auc_score(y, s) if 0 < y.sum() < y.size else math.nan


def test_bootstrap_matches_direct_resampling(monkeypatch):
    # powers of two: no two different scores share a (coarse) bin, so every resample's
    # metrics equal sklearn's on the drawn cases' pixels
    rng = np.random.default_rng(15)
    cases = []
    for c in range(5):
        s = (2.0 ** rng.integers(-6, 6, 30)).astype(np.float32)
        y = rng.random(30) < 0.3
        y[:2], y[2] = c < 4, False  # case 4 is healthy
        brain = rng.random(30) < 0.7
        brain[y] = True
        cases.append((s, y, brain))
    t = 4.0
    hists = [CaseHist.from_accumulator(Accumulator().update(*c), 7, t) for c in cases]
    n_boot, seed = 300, 5
    picks = np.random.default_rng(seed).integers(0, 5, size=(n_boot, 5))
    want = {k: [] for k in ("auroc", "auroc_brain", "auprc", "dice_best", "dice_val",
                            "frac_above")}
    for pk in picks:
        s, y, b = (np.concatenate([cases[i][j] for i in pk]) for j in range(3))
        has = y.any()
        want["auroc"].append(_auc(y, s))
        want["auroc_brain"].append(_auc(y[b], s[b]))
        want["auprc"].append(average_precision_score(y, s) if has else math.nan)
        want["dice_best"].append(fast_best_dice(s, y) if has else math.nan)
        want["dice_val"].append(brute_dice(brute_counts(s, y, b, t)))
        want["frac_above"].append(np.mean(s[b] >= t))
    samples = bootstrap_samples(hists, n_boot, seed)
    got = bootstrap_ci(hists, n_boot, seed)
    assert set(samples) == set(got) == set(want)
    for k, v in want.items():
        v = np.array(v)
        np.testing.assert_allclose(samples[k], v, atol=1e-9, err_msg=k)
        exp = np.percentile(v[~np.isnan(v)], [2.5, 97.5])
        np.testing.assert_allclose(got[k], exp, atol=1e-9, err_msg=k)
        assert got[k][0] < got[k][1], k  # a real interval
    # chunks of resamples (7 at a time: 300 = 42 * 7 + 6) give the same values as one chunk
    n_bins = np.unique(np.concatenate([h.bins for h in hists])).size
    monkeypatch.setattr(bootstrap, "_BOOT_CHUNK", 7 * n_bins)
    chunked = bootstrap_samples(hists, n_boot, seed)
    assert all(np.array_equal(chunked[k], samples[k], equal_nan=True) for k in samples)
    # the same through MapsAccumulator: one slice per case, cases in sorted id order
    ids = np.array([f"c{i}" for i in range(5)])
    acc = MapsAccumulator(["m"], ids, thresholds={"m": t})
    acc.update(np.arange(5), {"m": np.stack([c[0] for c in cases]).reshape(5, 5, 6)},
               np.stack([c[1] for c in cases]).reshape(5, 5, 6),
               np.stack([c[2] for c in cases]).reshape(5, 5, 6))
    pooled = acc.result(n_boot=n_boot, seed=seed)["m"]["pooled"]
    assert pooled["ci"] == got
    assert pooled["ci"]["auroc"][0] <= pooled["auroc"] <= pooled["ci"]["auroc"][1]


def test_bootstrap_edge_cases():
    rng = np.random.default_rng(16)
    s, lesion, brain, ids = make_set(rng)
    one = ids == "a"
    acc = MapsAccumulator(["m"], ids[one], thresholds={"m": 2.0})
    acc.update(np.arange(4), {"m": s[one]}, lesion[one], brain[one])
    ci = acc.result(n_boot=20)["m"]["pooled"]["ci"]
    assert set(ci) == {"auroc", "auroc_brain", "auprc", "dice_best", "dice_val", "frac_above"}
    assert all(math.isnan(lo) and math.isnan(hi) for lo, hi in ci.values())  # one case
    assert "ci" not in acc.result()["m"]["pooled"]  # n_boot=0: no interval
    healthy = [CaseHist.from_accumulator(Accumulator().update(s[ids == "h"], lesion[ids == "h"],
                                                              brain[ids == "h"]), 7, 2.0)] * 3
    ci = bootstrap_ci(healthy, 50)
    assert math.isnan(ci["dice_val"][0]) and math.isnan(ci["auroc"][1])  # no lesion anywhere
    assert 0 < ci["frac_above"][0] <= ci["frac_above"][1] < 1  # but a false-positive rate
    no_thr = bootstrap_ci([CaseHist.from_accumulator(Accumulator().update(s, lesion))] * 2, 10)
    assert "dice_val" not in no_thr and math.isnan(no_thr["auroc_brain"][0])
    with pytest.raises(ConfigError, match="per_case=True"):
        MapsAccumulator(["m"], ids, per_case=False).result(n_boot=10)
    with pytest.raises(ConfigError, match="ci_bits"):
        MapsAccumulator(["m"], ids, ci_bits=None).result(n_boot=10)
    with pytest.raises(ConfigError, match="level"):
        bootstrap_ci(healthy, 10, level=95)
    with pytest.raises(ConfigError, match="n_boot"):
        bootstrap_ci(healthy, 0)


def test_merged_accumulators_of_disjoint_cases_equal_one():
    # e.g. the folds of a cross-validation, each with its own accumulator, pooled afterwards
    rng = np.random.default_rng(17)
    s, lesion, brain, ids = make_set(rng)
    maps = {"m": s, "sq": s**2}
    thr = {"m": 2.0}
    whole = MapsAccumulator(list(maps), ids, thresholds=thr)
    whole.update(np.arange(len(ids)), maps, lesion, brain)
    folds = []
    for fold in (["a", "h"], ["c"]):
        sel = np.flatnonzero(np.isin(ids, fold))
        acc = MapsAccumulator(list(maps), ids[sel], thresholds=thr)
        folds.append(acc.update(np.arange(sel.size), {k: v[sel] for k, v in maps.items()},
                                lesion[sel], brain[sel]))
    merged = folds[0].merge(folds[1])
    assert json.dumps(merged.result(n_boot=100, seed=2)) == json.dumps(
        whole.result(n_boot=100, seed=2))
    assert merged.result()["m"]["pooled"]["dice_val"] == whole.result()["m"]["pooled"]["dice_val"]
    # evaluate_maps passes thresholds and n_boot through
    ev = evaluate_maps(maps, lesion, brain, ids, thresholds=thr, n_boot=100, seed=2)
    assert json.dumps(ev) == json.dumps(whole.result(n_boot=100, seed=2))
    with pytest.raises(ConfigError, match="share cases"):
        MapsAccumulator(list(maps), ids, thresholds=thr).merge(whole)
    with pytest.raises(ConfigError, match="different thresholded maps"):
        MapsAccumulator(list(maps), ids[:1]).merge(folds[1])
    # each fold at its own threshold: pooled dice_val / frac_above from the summed counts
    parts = []
    for fold, t in ((["a", "h"], 2.0), (["c"], 0.5)):
        sel = np.flatnonzero(np.isin(ids, fold))
        acc = MapsAccumulator(["m"], ids[sel], thresholds={"m": t})
        parts.append(acc.update(np.arange(sel.size), {"m": s[sel]}, lesion[sel], brain[sel]))
    got = parts[0].merge(parts[1]).result(n_boot=20)["m"]["pooled"]
    call = np.where(np.isin(ids, ["c"])[:, None, None], s >= 0.5, s >= 2.0)
    tp, fp = (call & lesion).sum(), (call & ~lesion).sum()
    assert got["dice_val"] == pytest.approx(2 * tp / (2 * tp + fp + (lesion & ~call).sum()))
    assert got["frac_above"] == pytest.approx((call & brain).sum() / brain.sum())
    assert got["dice_val"] != whole.result()["m"]["pooled"]["dice_val"]
    with pytest.raises(ConfigError, match="not among"):
        evaluate_maps(maps, lesion, brain, ids, thresholds={"x": 1.0})


# ---- ROC / PR curves from the counts --------------------------------------------------------

def test_curves_equal_sklearn_when_every_score_has_its_own_bin():
    from sklearn.metrics import precision_recall_curve, roc_curve

    rng = np.random.default_rng(11)
    s = rng.integers(0, 40, 3000).astype(np.float32)  # small integers: one bin each
    y = rng.random(s.size) < 0.1 + 0.02 * s  # higher scores, more lesions
    c = Accumulator().update(s, y).curves(max_points=1000)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)  # (0, 0) then scores descending
    np.testing.assert_allclose(c["fpr"], fpr, atol=1e-12)
    np.testing.assert_allclose(c["tpr"], tpr, atol=1e-12)
    assert c["recall"] == c["tpr"]
    prec, rec, pthr = precision_recall_curve(y, s)  # thresholds ascending
    at = {float(t): p for t, p in zip(pthr, prec[:-1], strict=True)}
    for t, p in zip(thr[1:], c["precision"][1:], strict=True):  # the same thresholds
        if float(t) in at:
            assert p == pytest.approx(at[float(t)], abs=1e-12)
    assert c["precision"][0] == 1.0 and len(at) > 30
    # the area under the full curve is the row's AUROC, and sklearn's
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("kind", ["lognormal", "rounded"])
def test_downsampled_curves_keep_ends_order_and_area(kind):
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(12)
    s, y = skewed(rng, 200_000, kind)
    acc = Accumulator().update(s, y)
    c = acc.curves()  # default: at most 256 points
    n = len(c["fpr"])
    assert 100 < n <= 256 and all(len(v) == n for v in c.values())
    assert (c["fpr"][0], c["tpr"][0], c["fpr"][-1], c["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
    for key in ("fpr", "tpr", "recall"):
        assert np.all(np.diff(c[key]) >= 0), key
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(acc.result()["auroc"], abs=1e-3)
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(roc_auc_score(y, s), abs=1e-3)
    # a bin's lower edge flags what its lowest score flags: every point, thinned or not, is
    # one of sklearn's (at that score), ROC and PR alike
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    prec, rec, _ = precision_recall_curve(y, s)
    roc_points = set(zip(np.round(fpr, 12), np.round(tpr, 12), strict=True))
    pr_points = set(zip(np.round(rec, 12), np.round(prec, 12), strict=True))
    assert all((round(f, 12), round(t, 12)) in roc_points
               for f, t in zip(c["fpr"], c["tpr"], strict=True))
    assert all((round(r, 12), round(p, 12)) in pr_points
               for r, p in zip(c["recall"], c["precision"], strict=True))
    small = acc.curves(max_points=5)
    assert len(small["fpr"]) <= 5 and small["fpr"][-1] == 1.0 and small["tpr"][0] == 0.0


def test_curves_of_the_brain_region_and_undefined_curves():
    rng = np.random.default_rng(13)
    s, y = skewed(rng, 50_000, "rounded")
    brain = rng.random(s.size) < 0.4
    brain[y] = True
    acc = Accumulator().update(s, y, brain)
    c = acc.curves(brain=True)
    area = np.trapezoid(c["tpr"], c["fpr"])
    assert area == pytest.approx(acc.result()["auroc_brain"], abs=1e-3)
    assert area != pytest.approx(acc.result()["auroc"], abs=1e-3)
    healthy = Accumulator().update(s, np.zeros(s.size, bool)).curves()
    assert healthy == {"fpr": [], "tpr": [], "recall": [], "precision": []}
    with pytest.raises(ConfigError, match="max_points"):
        acc.curves(max_points=1)
    with pytest.raises(ConfigError, match="brain mask"):
        Accumulator().update(s, y).curves(brain=True)


def test_paired_difference_against_the_baseline_uses_the_same_resamples():
    """A map a little better than the baseline in every case: the paired interval of the
    difference excludes 0 although the two marginal intervals overlap (the cases' own
    difficulty, shared by both maps, dominates the marginal spread)."""
    from jaxvae.metrics.bootstrap import paired_difference

    rng = np.random.default_rng(7)
    n_cases, s = 12, 2
    lesion = np.zeros((n_cases * s, 16, 16), bool)
    lesion[:, 4:10, 4:10] = True
    contrast = np.repeat(rng.uniform(0.2, 2.0, n_cases), s)[:, None, None]  # case difficulty
    base = rng.normal(size=lesion.shape) + contrast * lesion
    better = base + 0.3 * lesion
    ids = np.repeat([f"c{i:02d}" for i in range(n_cases)], s)
    acc = MapsAccumulator(["intensity", "better", "same"], ids)
    acc.update(np.arange(len(ids)), {"intensity": base, "better": better, "same": base.copy()},
               lesion)
    r = acc.result(n_boot=300, seed=1)
    vs = r["better"]["pooled"]["vs_baseline"]
    assert vs["baseline"] == "intensity" and "vs_baseline" not in r["intensity"]["pooled"]
    assert vs["auprc"]["ci"][0] > 0 and vs["auprc"]["frac_above"] == 1.0
    lo_b, hi_b = r["better"]["pooled"]["ci"]["auprc"]
    lo_i, hi_i = r["intensity"]["pooled"]["ci"]["auprc"]
    assert lo_b < hi_i  # the marginal intervals overlap
    same = r["same"]["pooled"]["vs_baseline"]
    assert same["auroc"]["ci"] == [0.0, 0.0] and same["auroc"]["frac_above"] == 0.0
    # the same numbers from the samples by hand
    cases = sorted(set(ids))
    hist = {n: [acc._hists[n][c] for c in cases] for n in ("better", "intensity")}
    a, b = (bootstrap_samples(hist[n], 300, 1) for n in ("better", "intensity"))
    d = a["auprc"] - b["auprc"]
    np.testing.assert_allclose(vs["auprc"]["ci"], np.percentile(d, [2.5, 97.5]))
    assert paired_difference(a, b, n_cases)["auprc"] == vs["auprc"]
