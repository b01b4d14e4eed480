"""Sample-wise detection: does a slice, or a case, contain a lesion? AUROC and AP per map.

The UPD study (Lagogiannis et al., "Unsupervised pathology detection: a deep dive into the
state of the art", 2023) reports, beside the pixel metrics, how well an anomaly map ranks
whole samples. Here:

- slice level: a slice's score is the 0.99 quantile of its map inside the brain mask (one
  bright pixel does not decide, a lesion of a few dozen pixels does); it is positive when
  it has any lesion pixel. Slices without a brain pixel have no score: they are left out
  and counted (`n_excluded`).
- volume level: the q-quantile over all brain pixels of a case would need every pixel of
  the case at once; instead a case's score is the MAXIMUM of its slice scores (a case is as
  anomalous as its most anomalous slice), so the per-slice scores (S floats per map) are
  all that is kept while streaming. A case is positive when any of its slices has a lesion
  pixel; a case without any scored slice is left out and counted.

AUROC and AP (average precision) are sklearn's `roc_auc_score` and
`average_precision_score` of these scores. A level whose samples are all of one class has
no AUROC / AP: its rows are {} and a "note" says why (never a silent NaN).
"""

import math
from collections.abc import Mapping

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from jaxvae.base.errors import ConfigError

QUANTILE = 0.99


def slice_scores(maps, brain=None, q: float = QUANTILE) -> np.ndarray:
    """The q-quantile of each slice's map inside its brain mask.

    Args:
      maps: (n, H, W) anomaly scores.
      brain: (n, H, W) binary brain mask, or None (all pixels).
      q: quantile in [0, 1] (numpy's default linear interpolation).

    Returns:
      (n,) float64; NaN for a slice without any brain pixel.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ConfigError(f"maps must have shape (n, H, W), got {maps.shape}")
    if brain is None:
        brain = np.ones(maps.shape, bool)
    brain = np.asarray(brain, bool)
    if brain.shape != maps.shape:
        raise ConfigError(f"brain shape {brain.shape} != maps shape {maps.shape}")
    out = np.full(len(maps), math.nan)
    for i, (m, b) in enumerate(zip(maps, brain, strict=True)):
        if b.any():
            out[i] = np.quantile(m[b].astype(np.float64), q)
    return out


class SliceScores:
    """Per-slice detection scores of several named maps, filled batch by batch.

    Args:
      names: the map names every `update` brings.
      lesion: (S, H, W) lesion mask of the S slices that will be fed (or (S,) bool: the
        slices with a lesion).
      case_ids: (S,) case of each slice.
      q: the quantile of `slice_scores`.
    """

    def __init__(self, names, lesion, case_ids, q: float = QUANTILE):
        lesion = np.asarray(lesion, bool)
        self.names = tuple(names)
        self.q = q
        self.positive = lesion.reshape(len(lesion), -1).any(1) if lesion.ndim > 1 else lesion
        self.case_ids = np.asarray(case_ids).astype(str)
        if self.case_ids.shape != self.positive.shape:
            raise ConfigError(f"case_ids must have shape ({len(lesion)},), got "
                              f"{self.case_ids.shape}")
        self.scores = {n: np.full(len(lesion), math.nan) for n in self.names}
        self.scored = np.zeros(len(lesion), bool)  # fed, with a brain pixel

    def update(self, index, maps: Mapping[str, np.ndarray], brain=None) -> "SliceScores":
        """Score the slices `index` (positions among the S) of every map in `maps`."""
        index = np.asarray(index).reshape(-1)
        self.scored[index] = True if brain is None else np.asarray(brain).reshape(
            index.size, -1).any(1)
        for n in self.names:
            self.scores[n][index] = slice_scores(maps[n], brain, self.q)
        return self

    def merge(self, other: "SliceScores") -> "SliceScores":
        """Append another set's slices (e.g. another fold's test cases, scored by its model)."""
        if other.names != self.names or other.q != self.q:
            raise ConfigError(f"cannot merge SliceScores of maps {other.names} (q {other.q}) "
                              f"into {self.names} (q {self.q})")
        self.positive = np.concatenate([self.positive, other.positive])
        self.case_ids = np.concatenate([self.case_ids, other.case_ids])
        self.scored = np.concatenate([self.scored, other.scored])
        self.scores = {n: np.concatenate([self.scores[n], other.scores[n]]) for n in self.names}
        return self

    def result(self) -> dict:
        """{"slice": level, "volume": level}, a level being {"score": how, "n_pos", "n_neg",
        "n_excluded", "rows": {name: {"auroc", "ap"}}} (+ "note" and rows {} when undefined).
        """
        valid = self.scored
        out = {"slice": _level(f"q{self.q:g} of the map inside the brain", "slice",
                               self.positive[valid],
                               {n: s[valid] for n, s in self.scores.items()},
                               int((~valid).sum()))}
        cases, inv = np.unique(self.case_ids, return_inverse=True)
        pos = np.zeros(len(cases), bool)
        np.logical_or.at(pos, inv, self.positive)
        scored = np.zeros(len(cases), bool)
        scored[inv[valid]] = True
        case_scores = {}
        for n, s in self.scores.items():
            best = np.full(len(cases), -np.inf)
            np.maximum.at(best, inv[valid], s[valid])
            case_scores[n] = best[scored]
        out["volume"] = _level("max over the case's slices of the slice score", "case",
                               pos[scored], case_scores, int((~scored).sum()))
        return out


def _level(how: str, unit: str, positive, scores, n_excluded: int) -> dict:
    """One level's counts and the AUROC / AP of every map (see `SliceScores.result`)."""
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    out = {"score": how, "n_pos": n_pos, "n_neg": n_neg, "n_excluded": n_excluded, "rows": {}}
    if not n_pos or not n_neg:
        what = (f"no test {unit}" if not positive.size else
                f"every test {unit} has a lesion" if n_neg == 0 else
                f"no test {unit} has a lesion")
        out["note"] = f"undefined: {what}"
        return out
    big = np.finfo(np.float64).max  # sklearn refuses inf; the order is all that counts
    for n, s in scores.items():
        s = np.nan_to_num(s, posinf=big, neginf=-big)
        out["rows"][n] = {"auroc": float(roc_auc_score(positive, s)),
                          "ap": float(average_precision_score(positive, s))}
    return out
