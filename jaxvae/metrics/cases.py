"""Per-case and pooled metrics of several maps, fed batch by batch, with bootstrap intervals.

`MapsAccumulator` scores every case of a test set on its own when its last slice arrives
and adds its counts to the pooled ones (`histogram.Accumulator`), optionally at a
threshold chosen on validation data.

Intervals: jaxvae.bootstrap.
"""

import math
from collections.abc import Mapping

import numpy as np

from jaxvae.base.errors import ConfigError
from jaxvae.metrics.bootstrap import CaseHist, bootstrap_samples, paired_difference, percentile_ci
from jaxvae.metrics.histogram import Accumulator, summarize_cases, threshold_metrics


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
                row.update(tp=c["tp"], fp=c["fp"], fn=c["fn"], **threshold_metrics(c))
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
            out.update(threshold_metrics({k: sum(c[k] for c in rows) for k in
                                           ("tp", "fp", "fn", "brain_above", "brain")}))
        elif name in self.thresholds:
            out.update(threshold_metrics(self.pooled[name].counts_at(self.thresholds[name])))
        return out

    def result(self, n_boot: int = 0, seed: int = 0, level: float = 0.95,
               baseline: str = "intensity", null: str = "best_null") -> dict:
        """{name: {"pooled", "per_case", "per_case_summary"}} as `evaluate_maps` returns.

        Args:
          n_boot: bootstrap resamples of the cases for the intervals (e.g. 1000); 0: none.
          seed: seed of the resamples (the same draws for every map: paired intervals).
          level: coverage of the intervals.
          baseline: with n_boot, every other map also gets "vs_baseline": the paired
            bootstrap interval of its metric minus this map's (`paired_difference`), when
            this map is among the names.
          null: likewise "vs_null": each map minus this one (the best fair null, chosen on
            the calibration cases), when it is among the names.

        Returns:
          per name: "pooled": `Accumulator.result` keys, plus `dice_val`, `frac_above` for a
          map with a threshold, plus "ci": {metric: [lo, hi]} when n_boot > 0 (see
          `bootstrap_ci`: coarse bins for the curve metrics, [nan, nan] with < 2 cases)
          and "vs_baseline": {"baseline": name, metric: {"ci", "frac_above"}};
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
        out, samples = {}, {}
        for n in self.names:
            cases = sorted(self._rows[n])  # stable order, and the bootstrap's case order
            rows = {c: self._rows[n][c] for c in cases}
            pooled = self._pooled(n)
            if n_boot:
                samples[n] = bootstrap_samples([self._hists[n][c] for c in cases], n_boot, seed)
                pooled["ci"] = percentile_ci(samples[n], len(cases), level)
            out[n] = {"pooled": pooled, "per_case": rows,
                      "per_case_summary": summarize_cases(rows)}
        for key, ref in (("vs_baseline", baseline), ("vs_null", null)):
            if n_boot and ref in samples:  # every map saw the same cases: paired draws
                for n in self.names:
                    if n != ref:
                        out[n]["pooled"][key] = {"baseline": ref, **paired_difference(
                            samples[n], samples[ref], len(self._rows[n]), level)}
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
