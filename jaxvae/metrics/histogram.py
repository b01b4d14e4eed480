"""Pooled pixel metrics for anomaly maps: AUROC (all pixels and brain only), AUPRC, best Dice.

The paper (Zhou et al.) scores a method by the pixel-wise AUROC of all pixels of all test
slices pooled into one ranking. Later work (Baur et al. 2021) showed that AUROC flatters
methods on images with much background, so we also report AUROC inside the brain mask,
AUPRC (average precision) and the best Dice over thresholds.

Tens of millions of pixels do not fit comfortably into `sklearn.metrics.roc_auc_score`
(it sorts everything, in float64, with several copies), so the metrics are computed from a
streaming histogram: `Accumulator` keeps, per score bin, the number of lesion and healthy
pixels (over all pixels and over brain pixels). Its state has a fixed size however many
pixels are fed, and feeding chunks in any order gives exactly the same counts.

Binning. The score range is unknown while streaming and anomaly maps are heavy-tailed
(gradient maps span decades), so linear bins over [min, max] would lose the resolution where
most pixels are. Instead a bin is the top `9 + mantissa_bits` bits of the float32 score's
order-preserving integer code (sign, 8 exponent bits, the leading mantissa bits): a
logarithmic scale fixed in advance, with no first pass and no range to guess. Every bin
spans at most a relative width of 2**-mantissa_bits of its values (about 0.1% by default),
exact zeros (background) form their own bin, negative scores and +-inf are handled. The
price: resolution is relative to magnitude, so scores that differ only far below their own
magnitude (e.g. 1000.0001 vs 1000.0002) share a bin; subtract such an offset first.

From the counts: AUROC is the trapezoid over the binned ROC curve, i.e. pixels in the same
bin count as ties, half, exactly as sklearn counts tied scores; AP is sklearn's step sum
sum_k (R_k - R_{k-1}) P_k over bins; best Dice is the maximum of 2TP / (2TP + FP + FN) over
the thresholds "score >= lower edge of a bin". All three equal sklearn / a brute-force
computation when no bin holds two different scores of opposite labels, and differ from it
only by such within-bin pairs otherwise.

Metrics at a fixed threshold. A threshold chosen on validation data (e.g. `dice_threshold`
of lesioned validation cases, or `Accumulator.threshold_at_quantile` of healthy ones: the
q-quantile of the brain scores) is applied to the test maps with `Accumulator.counts_at`:
TP / FP / FN and the brain pixels at or above it, hence `dice_val` (Dice at that threshold)
and `frac_above` (the fraction of brain pixels flagged: the false-positive rate on healthy
data). These use the threshold's bin, so they are exact for a bin lower edge (what
`dice_threshold` and `threshold_at_quantile` return); for any other threshold the pixels of
its own bin that lie just below it (within a relative 2**-mantissa_bits) count as above.

Per-case metrics of several maps, their pooling and bootstrap intervals over cases are in
jaxvae.case_metrics.
"""

import math
from collections.abc import Mapping

import numpy as np

from jaxvae.base.errors import ConfigError

METRIC_KEYS = ("auroc", "auroc_brain", "auprc", "dice_best", "dice_threshold")
# Metrics at a given threshold, present only for maps that were given one.
THRESHOLD_KEYS = ("dice_val", "frac_above")
# Metrics that get a bootstrap interval (dice_threshold is a score, not a metric).
CI_KEYS = ("auroc", "auroc_brain", "auprc", "dice_best", *THRESHOLD_KEYS)
# Chunk size for the per-pixel temporaries in `Accumulator.update` (bounded scratch memory).
_CHUNK = 1 << 22


def _check_binary(name: str, a: np.ndarray) -> np.ndarray:
    """Return `a` as bool after checking that it only holds 0/1 (or False/True)."""
    if a.dtype == bool:
        return a
    if not ((a == 0) | (a == 1)).all():
        raise ConfigError(f"{name} must be binary (0/1 or bool); got values outside {{0, 1}}")
    return a.astype(bool)


def _bin_index(scores: np.ndarray, shift: int) -> np.ndarray:
    """Map scores to bin indices that increase with the score (see the module docstring)."""
    # -0.0 + 0.0 == +0.0 under IEEE rounding: the two zeros are equal scores, so one bin
    s = np.asarray(scores, dtype=np.float32).ravel() + np.float32(0.0)
    if np.isnan(s).any():
        raise ConfigError("scores contain NaN; anomaly maps must be finite (or +-inf)")
    u = s.view(np.uint32)
    # Order-preserving code: flip all bits of negatives, set the sign bit of non-negatives.
    key = np.where(u >> 31 == 1, ~u, u | np.uint32(0x80000000))
    return (key >> np.uint32(shift)).astype(np.intp)


def _bin_lower_edge(b: int, shift: int) -> float:
    """Smallest float32 in bin `b`: "score >= edge" selects exactly the bins >= b."""
    k = int(b) << shift
    u = k ^ 0x80000000 if k >= 0x80000000 else (~k) & 0xFFFFFFFF
    v = float(np.array([u], dtype=np.uint32).view(np.float32)[0])
    return -math.inf if math.isnan(v) else v  # the bin holding -inf starts among NaN codes


def curve_rows(p: np.ndarray, n: np.ndarray, auroc_only: bool = False):
    """AUROC, AP and the Dice curve of several histograms at once (one per row).

    Args:
      p, n: (r, k) float64 positive / negative counts, columns in DESCENDING score order
        (empty columns are allowed: they add nothing).
      auroc_only: skip AP and Dice (then returned as None).

    Returns:
      (auroc (r,), auprc (r,), dice (r, k)): dice[:, j] is the Dice of "score >= column j";
      AUROC is NaN without both classes, AP and dice without positives.
    """
    n_pos, n_neg = p.sum(1), n.sum(1)
    tp = np.cumsum(p, 1)  # positives with score >= each column
    with np.errstate(divide="ignore", invalid="ignore"):
        # Each negative beats the positives in higher bins and ties (half) with its own.
        auroc = np.sum(n * (tp - 0.5 * p), 1) / (n_pos * n_neg)
    auroc[(n_pos == 0) | (n_neg == 0)] = math.nan
    if auroc_only:
        return auroc, None, None
    fp = np.cumsum(n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=p > 0)
        auprc = np.sum(p * prec, 1) / n_pos
        dice = 2.0 * tp / (tp + fp + n_pos[:, None])
    # no lesion: undefined (not 0), so per-case means and bootstrap percentiles skip them
    auprc[n_pos == 0] = math.nan
    dice[n_pos == 0] = math.nan
    return auroc, auprc, dice


def _curve_metrics(pos: np.ndarray, neg: np.ndarray, shift: int) -> dict:
    """AUROC, AP and best Dice (with its threshold) from per-bin counts.

    Args:
      pos, neg: (n_bins,) counts of positive / negative pixels per bin, bins ascending in score.
      shift: bit shift that defined the bins (to turn the best bin back into a threshold).

    Returns:
      dict with `auroc`, `auprc`, `dice_best`, `dice_threshold` (floats, NaN when undefined).
    """
    used = np.flatnonzero((pos > 0) | (neg > 0))[::-1]  # occupied bins, highest score first
    p = pos[used].astype(np.float64)[None]
    n = neg[used].astype(np.float64)[None]
    auroc, auprc, dice = curve_rows(p, n)
    if not p.sum():
        nan = math.nan
        return {"auroc": nan, "auprc": nan, "dice_best": nan, "dice_threshold": nan}
    best = int(np.argmax(dice[0]))  # first maximum = highest threshold, fewest positive calls
    return {"auroc": float(auroc[0]), "auprc": float(auprc[0]), "dice_best": float(dice[0, best]),
            "dice_threshold": _bin_lower_edge(used[best], shift)}


def dice_of(tp, fp, fn):
    """Dice 2TP / (2TP + FP + FN), elementwise; NaN where there is no lesion (TP + FN = 0)."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tp + fn > 0, 2.0 * tp / (2.0 * tp + fp + fn), math.nan)


def fraction_of(above, total):
    """above / total, elementwise; NaN where total is 0."""
    above, total = (np.asarray(v, dtype=np.float64) for v in (above, total))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, above / total, math.nan)


def threshold_metrics(c: Mapping[str, int]) -> dict:
    """`dice_val` and `frac_above` from the counts of `Accumulator.counts_at`."""
    return {"dice_val": float(dice_of(c["tp"], c["fp"], c["fn"])),
            "frac_above": float(fraction_of(c["brain_above"], c["brain"]))}


class Accumulator:
    """Streaming histogram of (score, label) pairs from which the pixel metrics are computed.

    State: per-bin counts of negative / positive pixels, for all pixels and for brain
    pixels, shape (n_bins, 2) each with n_bins = 2**(9 + mantissa_bits); it never grows.

    Args:
      mantissa_bits: mantissa bits kept per bin, 0..14; a bin spans a relative score width
        of at most 2**-mantissa_bits. The default 10 (0.1%, 524288 bins, 16 MiB of state)
        agrees with sklearn to ~1e-5 on realistic maps.
    """

    def __init__(self, mantissa_bits: int = 10):
        if not isinstance(mantissa_bits, int) or not 0 <= mantissa_bits <= 14:
            raise ConfigError(f"mantissa_bits must be an int in 0..14, got {mantissa_bits!r}")
        self.mantissa_bits = mantissa_bits
        self.shift = 32 - (9 + mantissa_bits)
        self.n_bins = 1 << (9 + mantissa_bits)
        self.counts = np.zeros((self.n_bins, 2), dtype=np.int64)  # [:, 0] negative, 1 positive
        self.counts_brain = np.zeros((self.n_bins, 2), dtype=np.int64)
        self.has_brain = False

    def update(self, scores, labels, brain=None) -> "Accumulator":
        """Add a chunk of pixels.

        Args:
          scores: anomaly scores, any shape; converted to float32.
          labels: same shape, binary (lesion = 1).
          brain: optional same-shape binary brain mask; only its pixels enter `auroc_brain`.

        Returns:
          self, for chaining.
        """
        scores, labels = np.asarray(scores), np.asarray(labels)
        if scores.shape != labels.shape:
            raise ConfigError(f"scores shape {scores.shape} != labels shape {labels.shape}; "
                              "pass one score per labelled pixel")
        if brain is not None:
            brain = np.asarray(brain)
            if brain.shape != scores.shape:
                raise ConfigError(f"brain mask shape {brain.shape} != scores shape "
                                  f"{scores.shape}; pass one mask value per pixel")
            self.has_brain = True
        s, y = scores.reshape(-1), labels.reshape(-1)
        m = None if brain is None else brain.reshape(-1)
        for i in range(0, s.size, _CHUNK):  # chunked so the temporaries stay small
            yc = _check_binary("labels", y[i:i + _CHUNK])
            # one bincount over (bin, label) pairs fills both columns
            idx = 2 * _bin_index(s[i:i + _CHUNK], self.shift) + yc
            self.counts += np.bincount(idx, minlength=2 * self.n_bins).reshape(-1, 2)
            if m is not None:
                mc = _check_binary("brain", m[i:i + _CHUNK])
                self.counts_brain += np.bincount(idx[mc],
                                                 minlength=2 * self.n_bins).reshape(-1, 2)
        return self

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Add another accumulator's counts (e.g. per-case ones into a pooled one)."""
        if other.mantissa_bits != self.mantissa_bits:
            raise ConfigError(f"cannot merge accumulators with mantissa_bits "
                              f"{self.mantissa_bits} and {other.mantissa_bits}")
        self.counts += other.counts
        self.counts_brain += other.counts_brain
        self.has_brain |= other.has_brain
        return self

    @property
    def n_pixels(self) -> int:
        """Number of pixels fed so far."""
        return int(self.counts.sum())

    def _region(self) -> np.ndarray:
        """(n_bins, 2) counts of the brain pixels (of all pixels without a brain mask)."""
        return self.counts_brain if self.has_brain else self.counts

    def counts_at(self, threshold: float) -> dict:
        """Pixel counts of the prediction "score >= threshold".

        Binned: exact when `threshold` is a bin lower edge (as `dice_threshold` and
        `threshold_at_quantile` are). Otherwise every pixel in the threshold's own bin counts
        as >= it, including those just below it (within a relative 2**-mantissa_bits).

        Args:
          threshold: the score threshold (taken as float32); -inf flags every pixel.

        Returns:
          {"tp", "fp", "fn", "brain_above", "brain"} (ints): lesion / healthy pixels at or
          above the threshold, lesion pixels below it, and the brain pixels at or above it /
          in all. Without a brain mask the last two count all pixels.
        """
        if math.isnan(threshold):
            raise ConfigError("threshold is NaN; give a number (e.g. a dice_threshold)")
        b = int(_bin_index(np.array([threshold]), self.shift)[0])
        neg, pos = self.counts[b:].sum(0)  # row slices: contiguous reads, each bin once
        region = self._region()
        above = int(region[b:].sum())
        return {"tp": int(pos), "fp": int(neg), "fn": int(self.counts[:b, 1].sum()),
                "brain_above": above, "brain": above + int(region[:b].sum())}

    def dice_at(self, threshold: float) -> float:
        """Dice of "score >= threshold" (binned as in `counts_at`); NaN without lesion pixels."""
        c = self.counts_at(threshold)
        return float(dice_of(c["tp"], c["fp"], c["fn"]))

    def threshold_at_quantile(self, q: float) -> float:
        """The threshold that flags about a fraction 1 - q of the brain pixels.

        It is the lower edge of the lowest bin at which the fraction of brain pixels (all
        pixels without a brain mask) with score >= edge is <= 1 - q: about the q-quantile of
        the brain scores, rounded up to a bin edge (so at most 1 - q are flagged, and the
        next lower edge flags more). For thresholds taken from healthy validation maps.

        Args:
          q: quantile in [0, 1], e.g. 0.99 to flag ~1 % of the brain pixels; 0 gives -inf.

        Returns:
          the threshold (float; +inf only when q = 1 and some score is +inf).
        """
        if not 0.0 <= q <= 1.0:
            raise ConfigError(f"quantile q must be in [0, 1], got {q!r}")
        c = self._region().sum(1)
        total = int(c.sum())
        if total == 0:
            raise ConfigError("no (brain) pixels were fed; a quantile needs pixels")
        above = np.cumsum(c[::-1])[::-1]  # pixels in bins >= b
        ok = np.flatnonzero(above <= (1.0 - q) * total)
        if not ok.size or ok[0] > _bin_index(np.array([np.inf]), self.shift)[0]:
            return math.inf  # above +inf's bin lie NaN codes, whose "edge" means nothing
        return _bin_lower_edge(int(ok[0]), self.shift)

    def curves(self, max_points: int = 256, *, brain: bool = False) -> dict:
        """ROC and precision-recall curves from the histogram counts (no pass over pixels).

        By default over ALL pixels fed (background included), the region of `auroc` and
        `auprc` (`brain=True`: the brain pixels, the region of `auroc_brain`). Point j is
        the prediction "score >= lower edge of the j-th highest occupied bin", after a
        first point at an infinite threshold (nothing flagged): ROC runs from (0, 0) to
        (1, 1), fpr / tpr / recall rise and precision is that of each threshold, with
        precision 1 at recall 0 first (as sklearn's `precision_recall_curve`). The
        trapezoid area under the full ROC is `auroc`. Curves with more points are thinned
        to points evenly spaced along the curves' total variation (|d fpr| + |d tpr| +
        |d precision|), both ends kept, so the area moves by ~1e-4 at 256 points.

        Args:
          max_points: at most this many points per curve (>= 2).
          brain: the brain pixels instead of all pixels.

        Returns:
          {"fpr", "tpr", "recall", "precision"}: lists of floats of equal length, index j
          the same threshold in all four; all empty when the region lacks lesion or healthy
          pixels (the curves are then undefined).
        """
        if not isinstance(max_points, int) or max_points < 2:
            raise ConfigError(f"max_points must be an int >= 2, got {max_points!r}")
        if brain and not self.has_brain:
            raise ConfigError("brain=True needs an accumulator fed with a brain mask")
        c = self.counts_brain if brain else self.counts
        used = np.flatnonzero(c.any(1))[::-1]  # occupied bins, highest score first
        n_neg, n_pos = c[used].sum(0)
        if not n_pos or not n_neg:
            return {"fpr": [], "tpr": [], "recall": [], "precision": []}
        tp = np.concatenate([[0], np.cumsum(c[used, 1])]).astype(np.float64)
        fp = np.concatenate([[0], np.cumsum(c[used, 0])]).astype(np.float64)
        fpr, tpr = fp / n_neg, tp / n_pos
        with np.errstate(divide="ignore", invalid="ignore"):
            prec = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        if fpr.size > max_points:
            arc = np.concatenate([[0], np.cumsum(np.abs(np.diff(fpr)) + np.abs(np.diff(tpr))
                                                 + np.abs(np.diff(prec)))])
            idx = np.searchsorted(arc, np.linspace(0, arc[-1], max_points)[1:-1])
            idx = np.unique(np.concatenate([[0], idx, [fpr.size - 1]]))
            fpr, tpr, prec = fpr[idx], tpr[idx], prec[idx]
        return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "recall": tpr.tolist(),
                "precision": prec.tolist()}

    def result(self) -> dict:
        """The metrics of all pixels fed so far.

        Returns:
          dict with `auroc`, `auroc_brain` (NaN if no brain mask was given), `auprc`,
          `dice_best`, `dice_threshold` (predict lesion where score >= threshold); floats,
          NaN where undefined (AUROC without both classes; everything without lesion pixels).
        """
        out = _curve_metrics(self.counts[:, 1], self.counts[:, 0], self.shift)
        brain = math.nan
        if self.has_brain:
            brain = _curve_metrics(self.counts_brain[:, 1], self.counts_brain[:, 0],
                                   self.shift)["auroc"]
        return {"auroc": out["auroc"], "auroc_brain": brain, "auprc": out["auprc"],
                "dice_best": out["dice_best"], "dice_threshold": out["dice_threshold"]}


def pixel_metrics(scores, labels, brain=None, **opts) -> dict:
    """Pooled pixel metrics of one anomaly map (or a stack of them) against a lesion mask.

    Args:
      scores: anomaly scores, any shape, e.g. (S, H, W).
      labels: lesion mask, same shape, binary.
      brain: optional brain mask, same shape, binary (for `auroc_brain`).
      **opts: passed to `Accumulator` (`mantissa_bits`).

    Returns:
      dict with `auroc`, `auroc_brain`, `auprc`, `dice_best`, `dice_threshold` (see
      `Accumulator.result`).
    """
    return Accumulator(**opts).update(scores, labels, brain).result()


def summarize_cases(per_case: Mapping[str, Mapping[str, float]]) -> dict:
    """Mean, median and count over cases of each metric, skipping NaN (e.g. healthy cases).

    Args:
      per_case: {case_id: metrics dict as from `pixel_metrics`, possibly with `dice_val` and
        `frac_above` (see `MapsAccumulator`)}.

    Returns:
      {metric: {"mean", "median", "n"}} for every metric of METRIC_KEYS except
      `dice_threshold`, plus `dice_val` and `frac_above` when every case has them; mean and
      median are NaN when no case defines the metric.
    """
    keys = [k for k in METRIC_KEYS if k != "dice_threshold"]  # thresholds: not comparable
    if per_case:
        keys += [k for k in THRESHOLD_KEYS if all(k in m for m in per_case.values())]
    out = {}
    for key in keys:
        v = np.array([m[key] for m in per_case.values()], dtype=np.float64)
        v = v[~np.isnan(v)]
        out[key] = {"mean": float(v.mean()) if v.size else math.nan,
                    "median": float(np.median(v)) if v.size else math.nan, "n": int(v.size)}
    return out
