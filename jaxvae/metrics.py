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

Confidence intervals. The uncertainty that matters is over patients, so intervals come from
a bootstrap over cases (`bootstrap_ci`): B resamples of the cases with replacement, the
pooled metric of each computed from the summed histograms of the chosen cases (a case drawn
twice counts twice), and the 2.5 / 97.5 percentiles of the B values. A full-resolution case
histogram is 16 MiB, so each case keeps a sparse coarse copy (`CaseHist`: the nonzero bins
at `ci_bits` = 7 mantissa bits, a relative bin width of 2**-7 = 0.8 %; coarse bins are
unions of adjacent fine ones, the code's prefix) plus its exact counts at the threshold.
Hence the intervals of `dice_val` / `frac_above` are exact, those of the curve metrics use
the coarse bins (within-bin pairs count as ties; `dice_best` only sees the coarse
thresholds), while the point estimates stay the full-resolution pooled ones.
`MapsAccumulator.merge` pools accumulators of disjoint cases (e.g. the folds of a
cross-validation): metrics and intervals over the union of their cases.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from jaxvae.errors import ConfigError

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


def _curve_rows(p: np.ndarray, n: np.ndarray, auroc_only: bool = False):
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
    auroc, auprc, dice = _curve_rows(p, n)
    if not p.sum():
        nan = math.nan
        return {"auroc": nan, "auprc": nan, "dice_best": nan, "dice_threshold": nan}
    best = int(np.argmax(dice[0]))  # first maximum = highest threshold, fewest positive calls
    return {"auroc": float(auroc[0]), "auprc": float(auprc[0]), "dice_best": float(dice[0, best]),
            "dice_threshold": _bin_lower_edge(used[best], shift)}


def _dice(tp, fp, fn):
    """Dice 2TP / (2TP + FP + FN), elementwise; NaN where there is no lesion (TP + FN = 0)."""
    tp, fp, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tp + fn > 0, 2.0 * tp / (2.0 * tp + fp + fn), math.nan)


def _frac(above, total):
    """above / total, elementwise; NaN where total is 0."""
    above, total = (np.asarray(v, dtype=np.float64) for v in (above, total))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, above / total, math.nan)


def _threshold_metrics(c: Mapping[str, int]) -> dict:
    """`dice_val` and `frac_above` from the counts of `Accumulator.counts_at`."""
    return {"dice_val": float(_dice(c["tp"], c["fp"], c["fn"])),
            "frac_above": float(_frac(c["brain_above"], c["brain"]))}


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
        return float(_dice(c["tp"], c["fp"], c["fn"]))

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


@dataclass(frozen=True, eq=False)
class CaseHist:
    """Sparse coarse histogram of one case's map, kept for the bootstrap over cases.

    Attributes:
      bits: mantissa bits of the coarse bins (relative bin width 2**-bits).
      bins: (k,) ascending indices of the nonzero coarse bins (uint32).
      counts: (k, 4) counts per bin: healthy, lesion, healthy in brain, lesion in brain.
      has_brain: whether a brain mask was fed (else the brain columns are 0).
      at_threshold: exact `Accumulator.counts_at` counts at the map's threshold, or None.
    """

    bits: int
    bins: np.ndarray
    counts: np.ndarray
    has_brain: bool
    at_threshold: dict | None = None

    @classmethod
    def from_accumulator(cls, acc: Accumulator, bits: int = 7, threshold: float | None = None
                         ) -> "CaseHist":
        """Re-bin a (one case's) `Accumulator` to `bits` mantissa bits and keep its nonzero bins.

        Bins nest: a coarse bin is a prefix of the fine bins' code, i.e. the union of
        2**(mantissa_bits - bits) adjacent fine bins, so a fine bin's coarse bin is its index
        shifted right and re-binning sums the nonzero fine bins into theirs.

        Args:
          acc: the case's accumulator.
          bits: coarse mantissa bits, 0..14 (capped at `acc.mantissa_bits`).
          threshold: also keep the exact counts at this threshold (see `counts_at`).

        Returns:
          the CaseHist; its `nbytes` is 20 bytes per nonzero bin.
        """
        if not isinstance(bits, int) or not 0 <= bits <= 14:
            raise ConfigError(f"ci_bits must be an int in 0..14, got {bits!r}")
        bits = min(bits, acc.mantissa_bits)
        drop = acc.mantissa_bits - bits
        # only the nonzero fine bins are visited (a scan, then a few thousand entries)
        fine, cols, vals = [], [], []
        for j, arr in enumerate((acc.counts, acc.counts_brain)):
            i = np.flatnonzero(arr)  # positions in the flattened (n_bins, 2) counts
            fine.append(i >> 1)
            cols.append(2 * j + (i & 1))
            vals.append(arr.reshape(-1)[i])
        bins, inv = np.unique(np.concatenate(fine) >> drop, return_inverse=True)
        counts = np.zeros((bins.size, 4), dtype=np.int64)
        np.add.at(counts, (inv, np.concatenate(cols)), np.concatenate(vals))
        dtype = np.uint32 if counts.max(initial=0) < 2**32 else np.int64
        at = None if threshold is None else acc.counts_at(threshold)
        return cls(bits, bins.astype(np.uint32), counts.astype(dtype), acc.has_brain, at)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return self.bins.nbytes + self.counts.nbytes


# Elements per (resamples x bins) temporary of the bootstrap: bounds its scratch memory
# (4 MiB per array, ~35 MiB in all) whatever the number of resamples.
_BOOT_CHUNK = 1 << 19


def bootstrap_samples(hists: Sequence[CaseHist], n_boot: int = 1000, seed: int = 0) -> dict:
    """Pooled metrics of `n_boot` resamples of the cases, drawn with replacement.

    Resample b takes the cases `picks[b]` with `picks = np.random.default_rng(seed).integers(
    0, n_cases, size=(n_boot, n_cases))`, and computes its pooled metrics from the sum of
    those cases' histograms (a case drawn twice counts twice). The same `hists` order and seed
    give the same resamples for every map: intervals of different maps are paired.

    All cases go into one dense (n_cases, n_bins_used) matrix per count column, built once;
    the resampled histograms of a chunk of resamples are then (chunk, n_cases) multiplicity
    weights times that matrix (float64 products of integer counts: exact below 2**53).

    Args:
      hists: one `CaseHist` per case, all with the same `bits`; `dice_val` and `frac_above`
        come too when every one has `at_threshold`.
      n_boot: number of resamples (>= 1); seed: seed of the draws.

    Returns:
      {metric: (n_boot,) float64} for `auroc`, `auroc_brain` (NaN without a brain mask),
      `auprc`, `dice_best` and maybe `dice_val`, `frac_above`; NaN where a resample leaves
      the metric undefined (e.g. no lesion among the drawn cases).
    """
    if not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ConfigError(f"n_boot must be an int >= 1, got {n_boot!r}")
    n = len(hists)
    if n == 0:
        raise ConfigError("no cases to resample; feed at least one case")
    if len({h.bits for h in hists}) > 1:
        raise ConfigError(f"case histograms have different bits {sorted({h.bits for h in hists})}"
                          "; make them all with the same ci_bits")
    with_at = [h.at_threshold is not None for h in hists]
    if any(with_at) and not all(with_at):
        raise ConfigError("only some case histograms have threshold counts; give every case "
                          "the map's threshold or none")
    used = np.unique(np.concatenate([h.bins for h in hists]))
    cols = np.zeros((4, n, used.size))
    for i, h in enumerate(hists):
        # columns descending in score, as _curve_rows wants
        cols[:, i, used.size - 1 - np.searchsorted(used, h.bins)] = h.counts.T
    at = None
    if all(with_at):
        keys = ("tp", "fp", "fn", "brain_above", "brain")
        at = np.array([[h.at_threshold[k] for k in keys] for h in hists], dtype=np.float64)
    has_brain = any(h.has_brain for h in hists)

    picks = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    names = [k for k in CI_KEYS if at is not None or k not in THRESHOLD_KEYS]
    out = {k: np.full(n_boot, math.nan) for k in names}
    chunk = max(1, _BOOT_CHUNK // max(used.size, 1))
    for s in range(0, n_boot, chunk):
        pk = picks[s:s + chunk]
        rows = np.arange(len(pk))[:, None]
        w = np.bincount((rows * n + pk).ravel(), minlength=len(pk) * n).reshape(len(pk), n)
        w = w.astype(np.float64)  # w[r, i]: how often resample r drew case i
        neg, pos = w @ cols[0], w @ cols[1]
        auroc, auprc, dice = _curve_rows(pos, neg)
        out["auroc"][s:s + chunk] = auroc
        out["auprc"][s:s + chunk] = auprc
        out["dice_best"][s:s + chunk] = dice.max(1) if used.size else math.nan
        del neg, pos, dice  # freed before the brain's temporaries: bounds the peak
        if has_brain:
            out["auroc_brain"][s:s + chunk] = _curve_rows(w @ cols[3], w @ cols[2], True)[0]
        if at is not None:
            tp, fp, fn, brain_above, brain = (w @ at).T
            out["dice_val"][s:s + chunk] = _dice(tp, fp, fn)
            out["frac_above"][s:s + chunk] = _frac(brain_above, brain)
    return out


def bootstrap_ci(hists: Sequence[CaseHist], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Percentile bootstrap interval over cases of every pooled metric.

    Args:
      hists: one `CaseHist` per case (see `bootstrap_samples`).
      n_boot: number of resamples; seed: seed of the draws (see `bootstrap_samples`).
      level: coverage; the interval runs between the 100 (1 - level) / 2 and
        100 (1 + level) / 2 percentiles (np.percentile, linear) of the resamples' values.

    Returns:
      {metric: [lo, hi]} for the metrics of `bootstrap_samples`. Resamples where a metric is
      undefined are left out of its percentiles; [nan, nan] when none defines it, and for
      every metric with fewer than 2 cases (one case resamples to itself: no interval).
    """
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    samples = bootstrap_samples(hists, n_boot, seed)
    pct = [100.0 * (1.0 - level) / 2.0, 100.0 * (1.0 + level) / 2.0]
    out = {}
    for k, v in samples.items():
        v = v[~np.isnan(v)]
        out[k] = ([float(x) for x in np.percentile(v, pct)] if len(hists) >= 2 and v.size
                  else [math.nan, math.nan])
    return out


class MapsAccumulator:
    """Pooled and per-case metrics of several named maps, fed batch by batch of slices.

    The pooled counts of each map live in one `Accumulator` (fixed size). A case is scored
    when its last slice has arrived: its slices wait in a buffer until then (a case is a few
    hundred slices; one `Accumulator` per map and open case would be 16 MiB each), are
    scored with a fresh `Accumulator` per map, which is merged into the pooled one, and are
    dropped. Fed in case order (as SliceSets are), the buffers hold at most one batch plus
    one case; any order gives the same numbers, since counts do not depend on order.

    For the bootstrap intervals (`result(n_boot=...)`) each finished case also keeps a
    `CaseHist` per map: its nonzero bins at `ci_bits` mantissa bits, 20 bytes per bin (a
    few thousand bins for a map spanning ten octaves at 7 bits), so this state grows with
    the number of cases; `ci_bits=None` keeps none.

    Args:
      names: the map names every `update` brings.
      case_ids: (S,) case id of each of the S slices that will be fed, each exactly once.
      per_case: also score every case on its own; False keeps only the pooled counts (then
        slices need not be fed completely, nor are they checked; no intervals).
      thresholds: optional {name: threshold}, e.g. chosen on validation data; those maps
        also get `dice_val` and `frac_above` (see `Accumulator.counts_at`), others not.
      ci_bits: mantissa bits of the per-case histograms kept for the bootstrap, or None.
      **opts: passed to `Accumulator` (`mantissa_bits`).
    """

    def __init__(self, names, case_ids, *, per_case: bool = True,
                 thresholds: Mapping[str, float] | None = None, ci_bits: int | None = 7,
                 **opts):
        self.names = tuple(names)
        self.per_case = per_case
        self.thresholds = {k: float(v) for k, v in (thresholds or {}).items()}
        unknown = sorted(set(self.thresholds) - set(self.names))
        if unknown:
            raise ConfigError(f"thresholds given for maps {unknown} that are not among the "
                              f"names {list(self.names)}")
        bad = [k for k, v in self.thresholds.items() if math.isnan(v)]
        if bad:
            raise ConfigError(f"threshold of {bad[0]!r} is NaN; give a number")
        if ci_bits is not None and (not isinstance(ci_bits, int) or not 0 <= ci_bits <= 14):
            raise ConfigError(f"ci_bits must be an int in 0..14 or None, got {ci_bits!r}")
        self.ci_bits = ci_bits
        self._opts = opts
        self._case_ids = np.asarray(case_ids).astype(str)
        self.pooled = {n: Accumulator(**opts) for n in self.names}
        self._rows = {n: {} for n in self.names}
        self._hists = {n: {} for n in self.names}  # name -> case -> CaseHist
        self._counts = {n: {} for n in self.thresholds}  # name -> case -> counts_at
        self._mixed = False  # merged parts with different thresholds
        cases, counts = np.unique(self._case_ids, return_counts=True)
        self._left = dict(zip(cases.tolist(), counts.tolist(), strict=True)) if per_case else {}
        self._buffer = {}  # case -> [(maps, lesion, brain)] of its slices seen so far

    def update(self, index, maps: Mapping[str, np.ndarray], lesion, brain=None
               ) -> "MapsAccumulator":
        """Add a batch of slices.

        Args:
          index: (n,) positions of the batch's slices in `case_ids`.
          maps: {name: (n, H, W) scores} for every name in `names`.
          lesion: (n, H, W) binary lesion mask; brain: (n, H, W) brain mask or None.

        Returns:
          self, for chaining.
        """
        index = np.asarray(index).reshape(-1)
        lesion = np.asarray(lesion)
        if lesion.ndim != 3 or lesion.shape[0] != index.size:
            raise ConfigError(f"lesion must have shape ({index.size}, H, W) (one slice per "
                              f"index), got {lesion.shape}")
        missing = [n for n in self.names if n not in maps]
        if missing:
            raise ConfigError(f"maps {missing} missing from the batch; got {sorted(maps)}")
        for name in self.names:
            if np.shape(maps[name]) != lesion.shape:
                raise ConfigError(f"map {name!r} shape {np.shape(maps[name])} != lesion shape "
                                  f"{lesion.shape}")
        if brain is not None and np.shape(brain) != lesion.shape:
            raise ConfigError(f"brain shape {np.shape(brain)} != lesion shape {lesion.shape}")
        if not self.per_case:
            for name in self.names:
                self.pooled[name].update(maps[name], lesion, brain)
            return self
        cases, inv = np.unique(self._case_ids[index], return_inverse=True)
        order = np.argsort(inv, kind="stable")
        for c, sel in zip(cases.tolist(), np.split(order, np.cumsum(np.bincount(inv))[:-1]),
                          strict=True):
            part = ({n: np.asarray(maps[n])[sel] for n in self.names}, lesion[sel],
                    None if brain is None else np.asarray(brain)[sel])
            self._buffer.setdefault(c, []).append(part)
            self._left[c] -= sel.size
            if self._left[c] < 0:
                raise ConfigError(f"case {c!r}: more slices fed than it has; feed each slice "
                                  "once")
            if self._left[c] == 0:
                self._finish(c)
        return self

    def _finish(self, case: str):
        parts = self._buffer.pop(case)
        lesion = np.concatenate([p[1] for p in parts])
        brain = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
        for name in self.names:
            acc = Accumulator(**self._opts).update(np.concatenate([p[0][name] for p in parts]),
                                                   lesion, brain)
            row = acc.result()
            row["lesion_pixels"] = int(acc.counts[:, 1].sum())
            row["brain_pixels"] = int(acc._region().sum())
            t = self.thresholds.get(name)
            if t is not None:
                c = acc.counts_at(t)
                self._counts[name][case] = c
                row.update(tp=c["tp"], fp=c["fp"], fn=c["fn"], **_threshold_metrics(c))
            self._rows[name][case] = row
            if self.ci_bits is not None:
                self._hists[name][case] = CaseHist.from_accumulator(acc, self.ci_bits, t)
            self.pooled[name].merge(acc)  # pooled counts are the sum of the per-case ones

    def merge(self, other: "MapsAccumulator") -> "MapsAccumulator":
        """Take in another accumulator of the same maps over DISJOINT cases.

        E.g. the per-fold accumulators of a cross-validation: merged, `result` gives the
        pooled metrics and intervals over the union of the cases. Slices fed afterwards are
        indexed in `self`'s case_ids followed by `other`'s.

        Each part may have its own thresholds (e.g. fitted on each fold's own validation
        cases) for the same maps: the pooled `dice_val` / `frac_above` are then those of
        the summed per-case counts, every case at its own part's threshold.

        Args:
          other: an accumulator with the same names, thresholded maps, per_case, ci_bits
            and options; left as it is.

        Returns:
          self, for chaining.
        """
        for what, a, b in [("names", self.names, other.names),
                           ("thresholded maps", sorted(self.thresholds),
                            sorted(other.thresholds)),
                           ("per_case", self.per_case, other.per_case),
                           ("ci_bits", self.ci_bits, other.ci_bits),
                           ("options", self._opts, other._opts)]:
            if a != b:
                raise ConfigError(f"cannot merge MapsAccumulators with different {what}: "
                                  f"{a!r} and {b!r}")
        shared = sorted(set(self._case_ids.tolist()) & set(other._case_ids.tolist()))
        if shared:
            raise ConfigError(f"cannot merge MapsAccumulators that share cases ({len(shared)}, "
                              f"e.g. {shared[0]!r}); each case must be scored once")
        self._case_ids = np.concatenate([self._case_ids, other._case_ids])
        for n in self.names:
            self.pooled[n].merge(other.pooled[n])
            self._rows[n].update(other._rows[n])
            self._hists[n].update(other._hists[n])
        for n in self._counts:
            self._counts[n].update(other._counts[n])
        if other.thresholds != self.thresholds:
            if not self.per_case:
                raise ConfigError("merging accumulators with different thresholds needs "
                                  "per_case=True (the pooled counts are the per-case sums)")
            self._mixed = True
        self._left.update(other._left)
        self._buffer.update({c: list(p) for c, p in other._buffer.items()})
        return self

    def _pooled(self, name: str) -> dict:
        """Pooled metrics of one map, with the threshold metrics if it has a threshold."""
        out = self.pooled[name].result()
        if name in self.thresholds and self._mixed:
            rows = self._counts[name].values()
            out.update(_threshold_metrics({k: sum(c[k] for c in rows) for k in
                                           ("tp", "fp", "fn", "brain_above", "brain")}))
        elif name in self.thresholds:
            out.update(_threshold_metrics(self.pooled[name].counts_at(self.thresholds[name])))
        return out

    def result(self, n_boot: int = 0, seed: int = 0, level: float = 0.95) -> dict:
        """{name: {"pooled", "per_case", "per_case_summary"}} as `evaluate_maps` returns.

        Args:
          n_boot: bootstrap resamples of the cases for the intervals (e.g. 1000); 0: none.
          seed: seed of the resamples (the same draws for every map: paired intervals).
          level: coverage of the intervals.

        Returns:
          per name: "pooled": `Accumulator.result` keys, plus `dice_val`, `frac_above` for a
          map with a threshold, plus "ci": {metric: [lo, hi]} when n_boot > 0 (see
          `bootstrap_ci`: coarse bins for the curve metrics, [nan, nan] with < 2 cases);
          "per_case": {case: row} in sorted case order, a row being `Accumulator.result`
          keys, `lesion_pixels`, `brain_pixels` (all pixels without a brain mask) and for a
          map with a threshold `tp`, `fp`, `fn`, `dice_val`, `frac_above`;
          "per_case_summary": `summarize_cases` of the rows. Only "pooled" when per_case
          is False.
        """
        if n_boot and not self.per_case:
            raise ConfigError("bootstrap intervals resample cases; they need per_case=True")
        if n_boot and self.ci_bits is None:
            raise ConfigError("bootstrap intervals need the per-case histograms; construct "
                              "with ci_bits (e.g. 7), not None")
        if not self.per_case:
            return {n: {"pooled": self._pooled(n)} for n in self.names}
        open_cases = sorted(c for c, k in self._left.items() if k)
        if open_cases:
            raise ConfigError(f"{len(open_cases)} cases not fed completely (e.g. "
                              f"{open_cases[0]!r}, {self._left[open_cases[0]]} slices missing); "
                              "feed every slice once before asking for the result")
        out = {}
        for n in self.names:
            cases = sorted(self._rows[n])  # stable order, and the bootstrap's case order
            rows = {c: self._rows[n][c] for c in cases}
            pooled = self._pooled(n)
            if n_boot:
                pooled["ci"] = bootstrap_ci([self._hists[n][c] for c in cases], n_boot, seed,
                                            level)
            out[n] = {"pooled": pooled, "per_case": rows,
                      "per_case_summary": summarize_cases(rows)}
        return out


def evaluate_maps(maps: Mapping[str, np.ndarray], lesion, brain, case_ids, *,
                  per_case: bool = True, thresholds: Mapping[str, float] | None = None,
                  n_boot: int = 0, seed: int = 0, **opts) -> dict:
    """Pooled (and per-case) metrics of several anomaly maps on one test set.

    Args:
      maps: {name: (S, H, W) scores}, S slices.
      lesion: (S, H, W) binary lesion mask.
      brain: (S, H, W) binary brain mask, or None (then `auroc_brain` is NaN).
      case_ids: (S,) case (patient) id of each slice.
      per_case: also score every case on its own.
      thresholds: optional {name: threshold} (see `MapsAccumulator`).
      n_boot, seed: bootstrap intervals over cases (see `MapsAccumulator.result`).
      **opts: passed to `MapsAccumulator` (`ci_bits`) and `Accumulator` (`mantissa_bits`).

    Returns:
      {name: {"pooled": metrics, "per_case": {case_id: metrics},
              "per_case_summary": summarize_cases(per_case)}}; the per-case entries are only
      present when `per_case` is True. Keys as from `MapsAccumulator.result`.
    """
    lesion = np.asarray(lesion)
    if lesion.ndim != 3:
        raise ConfigError(f"lesion must have shape (S, H, W), got {lesion.shape}")
    if brain is not None and np.shape(brain) != lesion.shape:
        raise ConfigError(f"brain shape {np.shape(brain)} != lesion shape {lesion.shape}")
    case_ids = np.asarray(case_ids).astype(str)
    if case_ids.shape != lesion.shape[:1]:
        raise ConfigError(f"case_ids must have shape ({lesion.shape[0]},) (one per slice), "
                          f"got {case_ids.shape}")
    for name, m in maps.items():
        if np.shape(m) != lesion.shape:
            raise ConfigError(f"map {name!r} shape {np.shape(m)} != lesion shape {lesion.shape}")
    thresholds = dict(thresholds or {})
    unknown = sorted(set(thresholds) - set(maps))
    if unknown:
        raise ConfigError(f"thresholds given for maps {unknown} that are not among the maps "
                          f"{sorted(maps)}")
    out = {}
    for name, m in maps.items():  # one map at a time: one map's case buffers, not all
        acc = MapsAccumulator([name], case_ids, per_case=per_case,
                              thresholds={k: v for k, v in thresholds.items() if k == name},
                              **opts)
        acc.update(np.arange(len(case_ids)), {name: m}, lesion, brain)
        out[name] = acc.result(n_boot=n_boot, seed=seed)[name]
    return out
