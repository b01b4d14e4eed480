"""Splits by case (docs/method.md §4), never by slice: train, validation and test cases.

A split is data: three lists of case IDs, written into every run directory as split.json
(`{"train": [...], "val": [...], "test": [...]}`) and readable back with `read_split`.
`make_split` chooses one from a dataset:

- folds > 1: K-fold cross-validation by case; fold i's cases test.
- folds == 1 and some cases have no lesion, some have: the healthy cases train (a healthy
  cohort, as HCP in the paper), the cases with lesions test, and so do ~`val_fraction` of
  the healthy cases (at least one of three or more, never a validation case): healthy test
  brains, so that case-level detection has negatives and the pooled pixel metrics see
  healthy brains too.
- folds == 1 and no case has a lesion: the healthy cases train; nothing is held out for
  testing (evaluate the run on another dataset).
- folds == 1 and every case has a lesion: every case trains on its lesion-free slices;
  nothing is held out for testing (evaluate the run on another dataset).

Validation cases are whole cases held out of training, chosen by case with the seed:
~`val_fraction` of the training cases (at least one when there are two or more), and, when
the training cohort is healthy and there are at least two lesion cases, also ~`val_fraction`
of those (at least one), so that thresholds and the ensemble can be fitted on lesions that
are not test lesions. Training uses the lesion-free slices of the training cases, the
validation loss those of the validation cases.
"""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from jaxvae.base.errors import ConfigError
from jaxvae.base.io import write_text
from jaxvae.data.datasets import SliceSet

PARTS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Split:
    """Case IDs of the training, validation and test parts (disjoint, each sorted)."""

    train: tuple[str, ...]
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()

    def __post_init__(self):
        for part in PARTS:
            object.__setattr__(self, part, tuple(sorted(str(c) for c in getattr(self, part))))
        seen = {}
        for part in PARTS:
            for c in getattr(self, part):
                if c in seen:
                    raise ConfigError(f"case {c!r} is in both {seen[c]!r} and {part!r}; a case "
                                      "belongs to one part only")
                seen[c] = part
        if not self.train:
            raise ConfigError("the split has no training case")

    def to_dict(self) -> dict:
        return {part: list(getattr(self, part)) for part in PARTS}

    def slices(self, slices: SliceSet) -> tuple[SliceSet, SliceSet, SliceSet]:
        """(training slices: lesion-free, validation slices: all, test slices: all)."""
        return (slices.for_cases(self.train).lesion_free(), slices.for_cases(self.val),
                slices.for_cases(self.test))


def split_cases(case_ids, n_folds: int, fold: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic K-fold split by case: each case is in the test part of exactly one fold.

    Args:
      case_ids: case IDs (repeats, e.g. one per slice, are fine).
      n_folds: number of folds; 1 means everything is training data and the test part is empty.
      fold: which fold is the test part, 0 <= fold < n_folds.
      seed: seed of the permutation of the sorted unique IDs.

    Returns:
      (train_ids, test_ids), each sorted.

    Raises:
      ConfigError: n_folds < 1, more folds than cases, or fold out of range.
    """
    ids = np.unique(np.asarray(list(case_ids), dtype=str))  # sorted: order of input is irrelevant
    if n_folds < 1 or not 0 <= fold < n_folds:
        raise ConfigError(f"need n_folds >= 1 and 0 <= fold < n_folds, got fold {fold} of "
                          f"{n_folds}")
    if n_folds > len(ids):
        raise ConfigError(f"{n_folds} folds but only {len(ids)} cases")
    perm = np.random.default_rng(seed).permutation(len(ids))
    test = np.zeros(len(ids), bool)
    if n_folds > 1:
        test[np.array_split(perm, n_folds)[fold]] = True
    return sorted(ids[~test].tolist()), sorted(ids[test].tolist())


def calibration_folds(case_ids, *, n: int = 0, ids=(), seed: int = 0
                      ) -> list[tuple[list[str], list[str]]]:
    """Calibration cases set aside from a test dataset, rotating so each case tests once.

    The paper's protocol trains on healthy subjects; thresholds, ensemble weights and every
    validation-chosen setting then need a few lesion cases of the target dataset. With `n`,
    the sorted unique cases are permuted with the seed and cut into K = len // n folds
    (np.array_split); fold k tests its own cases and calibrates on the n cases that follow
    them in the permuted order (cyclically), so every case is a test case exactly once and
    never in its own fold's calibration. With `ids`, one fold: those cases calibrate, the
    others test.

    Args:
      case_ids: the dataset's case IDs (repeats fine).
      n: calibration cases per fold (>= 1), or 0 with `ids`.
      ids: explicit calibration case IDs (instead of n).
      seed: seed of the permutation.

    Returns:
      [(test case IDs, calibration case IDs)] per fold, each sorted.

    Raises:
      ConfigError: both or neither of n and ids, an unknown ID, too few cases.
    """
    cases = np.unique(np.asarray(list(case_ids), dtype=str)).tolist()
    ids = sorted(set(ids or ()))
    if bool(n) == bool(ids):
        raise ConfigError("give the calibration cases either by count or by ID, not both "
                          "(and one of them)")
    if ids:
        unknown = [c for c in ids if c not in cases]
        if unknown:
            raise ConfigError(f"calibration case {unknown[0]!r} is not among the "
                              f"{len(cases)} cases (e.g. {cases[0]!r})")
        if len(ids) == len(cases):
            raise ConfigError("every case would calibrate: leave at least one to test")
        return [(sorted(set(cases) - set(ids)), ids)]
    if n < 1 or 2 * n > len(cases):
        raise ConfigError(f"{n} calibration cases per fold need at least {2 * max(n, 1)} "
                          f"cases (and n >= 1); the data has {len(cases)}")
    perm = np.random.default_rng(seed).permutation(len(cases))
    order = [cases[i] for i in perm]
    folds = []
    for part in np.array_split(np.arange(len(cases)), len(cases) // n):
        after = [order[(part[-1] + 1 + j) % len(order)] for j in range(n)]
        test = [order[i] for i in part]
        assert not set(test) & set(after)  # len(part) + n <= len(cases) when 2n <= it
        folds.append((sorted(test), sorted(after)))
    return folds


def _held_out(ids, fraction: float, seed: int, salt: int) -> list[str]:
    """~fraction of ids (at least one of two or more, never all), drawn with the seed."""
    ids = sorted(ids)
    if fraction <= 0 or len(ids) < 2:
        return []
    n = min(max(math.floor(fraction * len(ids) + 0.5), 1), len(ids) - 1)
    perm = np.random.default_rng((seed, salt)).permutation(len(ids))
    return sorted(ids[i] for i in perm[:n])


def make_split(slices: SliceSet, *, folds: int = 1, fold: int = 0, seed: int = 0,
               val_fraction: float = 0.1) -> Split:
    """The default split of a dataset (see the module doc).

    Args:
      slices: every slice of the dataset (case IDs and lesion masks are used).
      folds, fold: K-fold cross-validation by case (folds=1: no folds).
      seed: seeds the fold and the validation draws.
      val_fraction: fraction of the training cases held out for validation, in [0, 1).

    Returns:
      the Split.
    """
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    sick = set(np.unique(slices.case_ids[slices.lesion.any(axis=(1, 2))]).tolist())
    if folds > 1:
        train, test = split_cases(slices.case_ids, folds, fold, seed)
        return Split(*_without(train, _held_out(train, val_fraction, seed, 1)), test)
    if fold != 0:
        raise ConfigError(f"fold {fold} given without --folds > 1")
    healthy = sorted(set(slices.cases) - sick)
    if not healthy:  # every case has a lesion: their lesion-free slices train
        return Split(*_without(slices.cases, _held_out(slices.cases, val_fraction, seed, 1)))
    val_sick = _held_out(sick, val_fraction, seed, 2)
    train, val = _without(healthy, _held_out(healthy, val_fraction, seed, 1))
    test_healthy = []
    if sick and len(healthy) >= 3 and val_fraction > 0:
        # as many as validation would take of them, from the rest, one training case kept
        n = min(max(math.floor(val_fraction * len(healthy) + 0.5), 1), len(train) - 1)
        perm = np.random.default_rng((seed, 3)).permutation(len(train))
        test_healthy = [train[i] for i in perm[:n]]
    train, test_healthy = _without(train, test_healthy)
    return Split(train, [*val, *val_sick], [*sorted(sick - set(val_sick)), *test_healthy])


def _without(ids, held):
    return [c for c in ids if c not in held], held


def read_split(path, cases=None) -> Split:
    """Read a split.json, refusing anything that is not a valid split of `cases`.

    Args:
      path: JSON file `{"train": [...], "val": [...], "test": [...]}` of case IDs ("val" and
        "test" may be missing or empty).
      cases: the dataset's case IDs; IDs outside it are refused (None: not checked).

    Raises:
      ConfigError: unreadable file, bad JSON or structure, unknown IDs, a case in two parts
        or no training case; the message names the file.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read split file ({e.strerror})") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return split_from_dict(d, cases, where=path)


def split_from_dict(d, cases=None, *, where="split") -> Split:
    """A split from its JSON object (see `read_split`); errors start with `where`."""
    if not isinstance(d, dict) or set(d) - set(PARTS):
        extra = sorted(set(d) - set(PARTS)) if isinstance(d, dict) else type(d).__name__
        raise ConfigError(f"{where}: a split is a JSON object with keys {list(PARTS)} "
                          f"(lists of case IDs); got {extra}")
    for part, v in d.items():
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise ConfigError(f"{where}: {part!r} must be a list of case ID strings")
    try:
        split = Split(**{part: d.get(part, []) for part in PARTS})
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if cases is not None:
        unknown = sorted(set().union(*map(set, split.to_dict().values())) - set(cases))
        if unknown:
            raise ConfigError(f"{where}: {len(unknown)} case(s) not in the dataset, e.g. "
                              f"{unknown[0]!r} (the dataset has {len(set(cases))} cases)")
    return split


def write_split(split: Split, path, *, overwrite: bool = False) -> None:
    """Write split.json (atomically)."""
    write_text(Path(path), json.dumps(split.to_dict(), indent=1) + "\n", overwrite=overwrite)


def split_description(desc, *, folds, fold, seed, split: Split, n_train_slices: int) -> dict:
    """JSON-able record of which data and split a run used (stored in its config)."""
    return json.loads(json.dumps({**desc, "folds": folds, "fold": fold, "split_seed": seed,
                                  "split": split.to_dict(), "n_train_slices": n_train_slices}))


def run_split(data: dict) -> Split | None:
    """The split recorded in a run's config `data` (older runs: train/test lists only)."""
    if "split" in data:
        return Split(**data["split"])
    if data.get("train_cases"):
        return Split(data["train_cases"], (), data.get("test_cases", ()))
    return None
