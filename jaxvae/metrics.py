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
"""

import math
from collections.abc import Mapping

import numpy as np

from jaxvae.errors import ConfigError

METRIC_KEYS = ("auroc", "auroc_brain", "auprc", "dice_best", "dice_threshold")
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


def _curve_metrics(pos: np.ndarray, neg: np.ndarray, shift: int) -> dict:
    """AUROC, AP and best Dice (with its threshold) from per-bin counts.

    Args:
      pos, neg: (n_bins,) counts of positive / negative pixels per bin, bins ascending in score.
      shift: bit shift that defined the bins (to turn the best bin back into a threshold).

    Returns:
      dict with `auroc`, `auprc`, `dice_best`, `dice_threshold` (floats, NaN when undefined).
    """
    used = np.flatnonzero((pos > 0) | (neg > 0))[::-1]  # occupied bins, highest score first
    p = pos[used].astype(np.float64)
    n = neg[used].astype(np.float64)
    n_pos, n_neg = p.sum(), n.sum()
    tp, fp = np.cumsum(p), np.cumsum(n)  # counts with score >= each bin
    nan = math.nan
    if n_pos == 0:
        # no lesion: AUROC, AP and Dice are undefined (not 0), so per-case means can skip them
        return {"auroc": nan, "auprc": nan, "dice_best": nan, "dice_threshold": nan}
    # Each negative beats the positives in higher bins and ties (half) with those in its own.
    auroc = float(np.sum(n * (tp - 0.5 * p)) / (n_pos * n_neg)) if n_neg > 0 else nan
    auprc = float(np.sum(p * tp / (tp + fp)) / n_pos)
    dice = 2.0 * tp / (tp + fp + n_pos)
    best = int(np.argmax(dice))  # first maximum = highest threshold, fewest positive calls
    return {"auroc": auroc, "auprc": auprc, "dice_best": float(dice[best]),
            "dice_threshold": _bin_lower_edge(used[best], shift)}


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
      per_case: {case_id: metrics dict as from `pixel_metrics`}.

    Returns:
      {metric: {"mean", "median", "n"}} for every metric except `dice_threshold`; mean and
      median are NaN when no case defines the metric.
    """
    out = {}
    for key in METRIC_KEYS:
        if key == "dice_threshold":  # thresholds of different cases are not comparable
            continue
        v = np.array([m[key] for m in per_case.values()], dtype=np.float64)
        v = v[~np.isnan(v)]
        out[key] = {"mean": float(v.mean()) if v.size else math.nan,
                    "median": float(np.median(v)) if v.size else math.nan, "n": int(v.size)}
    return out


class MapsAccumulator:
    """Pooled and per-case metrics of several named maps, fed batch by batch of slices.

    The pooled counts of each map live in one `Accumulator` (fixed size). A case is scored
    when its last slice has arrived: its slices wait in a buffer until then (a case is a few
    hundred slices; one `Accumulator` per map and open case would be 16 MiB each), are
    scored with a fresh `Accumulator` per map, which is merged into the pooled one, and are
    dropped. Fed in case order (as SliceSets are), the buffers hold at most one batch plus
    one case; any order gives the same numbers, since counts do not depend on order.

    Args:
      names: the map names every `update` brings.
      case_ids: (S,) case id of each of the S slices that will be fed, each exactly once.
      per_case: also score every case on its own; False keeps only the pooled counts (then
        slices need not be fed completely, nor are they checked).
      **opts: passed to `Accumulator` (`mantissa_bits`).
    """

    def __init__(self, names, case_ids, *, per_case: bool = True, **opts):
        self.names = tuple(names)
        self.per_case = per_case
        self._opts = opts
        self._case_ids = np.asarray(case_ids).astype(str)
        self.pooled = {n: Accumulator(**opts) for n in self.names}
        self._rows = {n: {} for n in self.names}
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
            self._rows[name][case] = acc.result()
            self.pooled[name].merge(acc)  # pooled counts are the sum of the per-case ones

    def result(self) -> dict:
        """{name: {"pooled", "per_case", "per_case_summary"}} as `evaluate_maps` returns."""
        if not self.per_case:
            return {n: {"pooled": self.pooled[n].result()} for n in self.names}
        open_cases = sorted(c for c, k in self._left.items() if k)
        if open_cases:
            raise ConfigError(f"{len(open_cases)} cases not fed completely (e.g. "
                              f"{open_cases[0]!r}, {self._left[open_cases[0]]} slices missing); "
                              "feed every slice once before asking for the result")
        out = {}
        for n in self.names:
            rows = {c: self._rows[n][c] for c in sorted(self._rows[n])}  # stable order
            out[n] = {"pooled": self.pooled[n].result(), "per_case": rows,
                      "per_case_summary": summarize_cases(rows)}
        return out


def evaluate_maps(maps: Mapping[str, np.ndarray], lesion, brain, case_ids, *,
                  per_case: bool = True, **opts) -> dict:
    """Pooled (and per-case) metrics of several anomaly maps on one test set.

    Args:
      maps: {name: (S, H, W) scores}, S slices.
      lesion: (S, H, W) binary lesion mask.
      brain: (S, H, W) binary brain mask, or None (then `auroc_brain` is NaN).
      case_ids: (S,) case (patient) id of each slice.
      per_case: also score every case on its own.
      **opts: passed to `Accumulator` (`mantissa_bits`).

    Returns:
      {name: {"pooled": metrics, "per_case": {case_id: metrics},
              "per_case_summary": summarize_cases(per_case)}}; the per-case entries are only
      present when `per_case` is True. Metrics dicts as from `pixel_metrics`.
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
    out = {}
    for name, m in maps.items():  # one map at a time: one map's case buffers, not all
        acc = MapsAccumulator([name], case_ids, per_case=per_case, **opts)
        out[name] = acc.update(np.arange(len(case_ids)), {name: m}, lesion, brain).result()[name]
    return out
