"""Bootstrap intervals over cases from sparse per-case histograms.

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
`jaxvae.metrics.cases.MapsAccumulator.merge` pools accumulators of disjoint cases (e.g. the
folds of a cross-validation): metrics and intervals over the union of their cases.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jaxvae.base.errors import ConfigError
from jaxvae.metrics.histogram import (
    CI_KEYS,
    THRESHOLD_KEYS,
    Accumulator,
    curve_rows,
    dice_of,
    fraction_of,
)


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
        # columns descending in score, as curve_rows wants
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
        auroc, auprc, dice = curve_rows(pos, neg)
        out["auroc"][s:s + chunk] = auroc
        out["auprc"][s:s + chunk] = auprc
        out["dice_best"][s:s + chunk] = dice.max(1) if used.size else math.nan
        del neg, pos, dice  # freed before the brain's temporaries: bounds the peak
        if has_brain:
            out["auroc_brain"][s:s + chunk] = curve_rows(w @ cols[3], w @ cols[2], True)[0]
        if at is not None:
            tp, fp, fn, brain_above, brain = (w @ at).T
            out["dice_val"][s:s + chunk] = dice_of(tp, fp, fn)
            out["frac_above"][s:s + chunk] = fraction_of(brain_above, brain)
    return out


def percentile_ci(samples: dict, n_cases: int, level: float = 0.95) -> dict:
    """{metric: [lo, hi]} percentile intervals of bootstrap samples (see `bootstrap_ci`)."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), e.g. 0.95; got {level!r}")
    pct = [100.0 * (1.0 - level) / 2.0, 100.0 * (1.0 + level) / 2.0]
    out = {}
    for k, v in samples.items():
        v = v[~np.isnan(v)]
        out[k] = ([float(x) for x in np.percentile(v, pct)] if n_cases >= 2 and v.size
                  else [math.nan, math.nan])
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
    return percentile_ci(bootstrap_samples(hists, n_boot, seed), len(hists), level)


def paired_difference(samples: dict, baseline: dict, n_cases: int, level: float = 0.95
                      ) -> dict:
    """Interval of a map's metric minus the baseline's over the SAME resamples of cases.

    Both sample dicts must come from `bootstrap_samples` with the same cases (in the same
    order) and seed: each resample then draws the same cases for both maps, so the
    difference's spread excludes what the two share (which cases were drawn), unlike two
    marginal intervals.

    Returns:
      {metric: {"ci": [lo, hi], "frac_above": fraction of resamples where the map is above
      the baseline}} for the metrics both have.
    """
    diffs = {k: samples[k] - baseline[k] for k in samples if k in baseline}
    cis = percentile_ci(diffs, n_cases, level)
    out = {}
    for k, d in diffs.items():
        d = d[~np.isnan(d)]
        out[k] = {"ci": cis[k], "frac_above": float((d > 0).mean()) if d.size else math.nan}
    return out
