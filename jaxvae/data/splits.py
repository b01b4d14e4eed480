"""Splits by case (REFERENCE.md §4), never by slice.

- folds > 1: K-fold cross-validation by case; training uses the lesion-free slices of the
  training cases, testing all brain slices of the test cases.
- folds == 1: cases without any lesion train (a healthy cohort, as HCP in the paper),
  cases with lesions test.
"""

import json

import numpy as np

from jaxvae.data.datasets import SliceSet
from jaxvae.errors import ConfigError


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


def split(slices: SliceSet, *, folds=1, fold=0, seed=0):
    """(train SliceSet of lesion-free slices, test SliceSet) by case; see the module doc."""
    if folds > 1:
        train_ids, test_ids = split_cases(slices.case_ids, folds, fold, seed)
    else:
        if fold != 0:
            raise ConfigError(f"fold {fold} given without --folds > 1")
        sick = np.unique(slices.case_ids[slices.lesion.any(axis=(1, 2))])
        train_ids = sorted(set(slices.cases) - set(sick.tolist()))
        test_ids = sorted(sick.tolist())
        if not train_ids:
            raise ConfigError("every case has a lesion, so there is no healthy cohort to train "
                              "on: use cross-validation (--folds 2) to train on the lesion-free "
                              "slices of half of the cases")
    train = slices.for_cases(train_ids).lesion_free()
    test = slices.for_cases(test_ids)
    return train, test


def split_description(desc, *, folds, fold, seed, train: SliceSet, test: SliceSet) -> dict:
    """JSON-able record of which data and split a run used (stored in its config)."""
    return json.loads(json.dumps({**desc, "folds": folds, "fold": fold, "split_seed": seed,
                                  "train_cases": train.cases, "test_cases": test.cases,
                                  "n_train_slices": len(train)}))
