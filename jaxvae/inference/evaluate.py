"""Evaluation: a trained model + a test set -> every anomaly map -> metrics -> results files.

Maps come from the jitted scoring functions in fixed-size batches (the last batch padded by
repeating real slices, so one compiled shape serves all and combi's batch min-max is not
changed by padding). Scoring streams: each batch's maps (and the intensity baseline, the
post-processed maps, the ensembles' predictions) go straight into streaming histogram
accumulators (jaxvae.metrics.cases), so memory is bounded by a batch, not by the test set.
Nothing is chosen on test labels: the thresholds of "Dice (val. threshold)" and the
ensembles are fitted on the validation cases (`calibrate`); the oracle best Dice is
reported beside it, labelled as such. Intervals are 95 % bootstrap intervals over cases.
Metrics follow docs/method.md §5: pooled pixel AUROC (the paper's protocol) plus AUROC
inside the brain, AUPRC and best Dice, where a method shows that it localises more than
the image intensity already shows.
"""

import dataclasses

import numpy as np

from jaxvae.base.errors import ConfigError
from jaxvae.core.predictors import check_predictors, is_unsmoothed
from jaxvae.inference import compute
from jaxvae.inference.calibration import (
    Calibration,
    all_rows,
    calibrate,
    intensity_names,
    row_names,
)
from jaxvae.inference.compute import compute_maps
from jaxvae.inference.settings import KNOWN_PREDICTORS, EvalSettings
from jaxvae.metrics.cases import MapsAccumulator
from jaxvae.metrics.detection import SliceScores
from jaxvae.runtime import batching


def score_dataset(model, params, slices, *, val=None, beta=1.0, settings=EvalSettings(),
                  progress=False, keep=None):
    """Metrics of every predictor, the intensity baseline and the ensemble, streamed.

    First the validation slices are scored in memory (they are a few cases) and `calibrate`
    fits the thresholds and the ensemble on them; then each test batch's maps go straight
    into the metric accumulators (pooled and per case), so memory is bounded by a batch,
    not by the number of test slices. Nothing is fitted on the test slices.

    Args:
      model, params, beta: the trained model.
      slices: a SliceSet (images, brain, lesion, case_ids) of test slices.
      val: SliceSet of the validation cases (None or empty: no threshold, no ensemble).
      settings: EvalSettings.
      progress: show progress bars.
      keep: the slices whose maps to return: None = all (memory grows with S), or an
        integer index array / (S,) bool mask; () = none.

    Returns:
      (results dict as written to results.json, {name: (K, H, W) map} of the K kept
      slices in `keep` order, for every row: predictors, "intensity" (and with C
      sequences "intensity_<seq>": `calibration.intensity_rows`), "<name>+pp",
      "ensemble"...).
    """
    names = check_predictors(settings.predictors, KNOWN_PREDICTORS)
    images = np.asarray(slices.images, np.float32)
    cal = Calibration()
    if val is not None and len(val):
        cal = calibrate(compute_maps(model, params, val.images, beta=beta, settings=settings,
                                     progress=progress), val, settings)

    def batches(progress=False):
        return compute.map_batches(model, params, images, beta=beta, settings=settings,
                            progress=progress)

    pixels, detect, kept = _accumulate(batches, names, slices, cal, settings=settings,
                                       keep=keep, progress=progress)
    return _results(pixels, detect, [slices], [cal], beta=beta, settings=settings), kept


def score_folds(folds, *, settings=EvalSettings(), progress=False):
    """Score the folds of a cross-validation, each with its own model and calibration.

    Args:
      folds: [(model, params, beta, test SliceSet, validation SliceSet or None)], the test
        cases of different folds disjoint.
      settings: EvalSettings.

    Returns:
      (per-fold results dicts, pooled results over every fold's test cases: each case
      scored by its own fold's model at its own fold's thresholds, intervals by bootstrap
      over all cases).
    """
    names = check_predictors(settings.predictors, KNOWN_PREDICTORS)
    per_fold, merged, detected = [], None, None
    for model, params, beta, test, val in folds:
        cal = Calibration()
        if val is not None and len(val):
            cal = calibrate(compute_maps(model, params, val.images, beta=beta,
                                         settings=settings, progress=progress), val, settings)

        def batches(progress=False, model=model, params=params, beta=beta, test=test):
            return compute.map_batches(model, params, np.asarray(test.images, np.float32),
                                       beta=beta, settings=settings, progress=progress)

        pixels, detect, _ = _accumulate(batches, names, test, cal, settings=settings,
                                        keep=(), progress=progress)
        per_fold.append(_results(pixels, detect, [test], [cal], beta=beta, settings=settings))
        merged = pixels if merged is None else merged.merge(pixels)
        detected = detect if detected is None else detected.merge(detect)
    pooled = _results(merged, detected, [f[3] for f in folds],
                      [r["calibration"] for r in per_fold], beta=folds[0][2], settings=settings)
    return per_fold, pooled


def score_calibrated(model, params, test, folds, *, cal_slices=None, beta=1.0,
                     settings=EvalSettings(), progress=False, keep=None):
    """Score a dataset whose calibration cases are set aside from it (or from another one).

    The paper's protocol (train on healthy subjects, test on patients) has no lesion among
    the run's validation cases: thresholds, ensembles and the fair nulls' settings are
    fitted on calibration cases of the target data instead (`splits.calibration_folds`):
    fold by fold, each fold's test cases scored at the calibration of its own calibration
    cases, which appear in none of its test metrics. The model is the same in every fold,
    so each slice's maps are computed once.

    Args:
      model, params, beta: the model.
      test: SliceSet of the dataset; each fold scores its test cases of it.
      folds: [(test case IDs, calibration case IDs)], the test IDs of different folds
        disjoint.
      cal_slices: SliceSet the calibration cases come from (None: `test` itself).
      settings, progress: as `score_dataset`.
      keep: slices of `test` whose maps to return (as `score_dataset`; None: all).

    Returns:
      (results pooled over the folds' test cases, with "calibration": {"folds": [...]} and
      "calibration_plan": the folds; {row: (K, H, W)} maps of the kept slices).
    """
    names = check_predictors(settings.predictors, KNOWN_PREDICTORS)
    maps = compute_maps(model, params, test.images, beta=beta, settings=settings,
                        progress=progress)
    source = test if cal_slices is None else cal_slices
    source_maps = maps if cal_slices is None else compute_maps(
        model, params, cal_slices.images, beta=beta, settings=settings, progress=progress)
    keep = np.arange(len(test)) if keep is None else np.asarray(keep).reshape(-1)
    merged = detected = kept = None
    parts, cals = [], []
    for test_ids, cal_ids in folds:
        csel = np.flatnonzero(np.isin(source.case_ids, list(cal_ids)))
        cal = calibrate({k: v[csel] for k, v in source_maps.items()}, source.subset(csel),
                        settings)
        tsel = np.flatnonzero(np.isin(test.case_ids, list(test_ids)))
        part = test.subset(tsel)

        def batches(progress=False, tsel=tsel):
            for idx, n in batching.batches(len(tsel), settings.batch_size):
                yield idx[:n], {k: m[tsel[idx[:n]]] for k, m in maps.items()}

        here = np.flatnonzero(np.isin(tsel, keep))  # kept slices of this fold, in tsel order
        pixels, detect, fold_kept = _accumulate(batches, names, part, cal, settings=settings,
                                                keep=here)
        if kept is None:
            kept = {k: np.zeros((keep.size, *test.images.shape[1:3]), np.float32)
                    for k in fold_kept}
        where = {int(t): p for p, t in enumerate(keep)}  # test slice -> its place in keep
        pos = np.array([where[int(t)] for t in tsel[here]], np.intp)
        for k, m in fold_kept.items():
            kept[k][pos] = m
        merged = pixels if merged is None else merged.merge(pixels)
        detected = detect if detected is None else detected.merge(detect)
        parts.append(part)
        cals.append(cal)
    results = _results(merged, detected, parts, cals, beta=beta, settings=settings)
    if len(cals) == 1:  # one form whatever the number of folds
        results["calibration"] = {"folds": [cals[0].to_json()], "method": cals[0].method}
    results["calibration_plan"] = {"source": "test data" if cal_slices is None else
                                   "other data", "folds": [{"test": list(t), "calibration":
                                                            list(c)} for t, c in folds]}
    return results, kept


def score_maps(maps, slices, *, val_maps=None, val=None, beta=1.0, settings=EvalSettings()):
    """Metrics of precomputed maps (plus intensity baseline, post-processing, ensemble).

    Args:
      maps: {name: (S, H, W)} from `compute_maps`; rows are added to it in place
        ("intensity", "<name>+pp", "ensemble"...), so callers can draw them.
      slices: the SliceSet the maps belong to.
      val_maps, val: maps of the validation slices and their SliceSet (None: no
        calibration).

    Returns:
      the results dict written to results.json.
    """
    given = [k for k in maps if k not in intensity_names(slices)]
    names = [k for k in given if not is_unsmoothed(k)]  # twins are no rows
    cal = Calibration() if val is None or not len(val) else calibrate(dict(val_maps), val,
                                                                        settings)

    def batches(progress=False):
        for idx, n in batching.batches(len(slices.images), settings.batch_size):
            yield idx[:n], {k: np.asarray(maps[k][idx[:n]], np.float32) for k in given}

    pixels, detect, rows = _accumulate(batches, names, slices, cal, settings=settings,
                                       keep_names=lambda k: k not in names)
    maps.update(rows)
    return _results(pixels, detect, [slices], [cal], beta=beta, settings=settings)


def _accumulate(batches, names, slices, cal, *, settings, keep=None, keep_names=None,
                progress=False):
    """Stream the maps of `batches` into the metrics of every row (see `score_dataset`).

    Args:
      batches: callable(progress=False) yielding (rows, {name: (n, H, W) map}) for
        consecutive batches of the slices.
      names: the map names `batches` yields, in row order.
      cal: the Calibration fitted on the validation cases.
      keep: slices whose maps to return (see `score_dataset`); keep_names: a predicate on
        the row names to return (None: all).

    Returns:
      (the MapsAccumulator of every row, their per-slice detection scores (SliceScores),
      {row: kept maps}).
    """
    images, lesion, brain = slices.images, slices.lesion, slices.brain
    case_ids = np.asarray(slices.case_ids).astype(str)
    rows = row_names(names, slices, settings, cal)
    pixels = MapsAccumulator(rows, case_ids,
                             thresholds={k: t for k, t in cal.thresholds.items() if k in rows})
    detect = SliceScores(rows, lesion, case_ids)
    keep = np.arange(len(images)) if keep is None else np.asarray(keep)
    if keep.dtype == bool:
        if keep.shape != (len(images),):
            raise ConfigError(f"a boolean keep mask needs shape ({len(images)},) (one per "
                              f"slice), got {keep.shape}")
        keep = np.flatnonzero(keep)
    keep = keep.reshape(-1).astype(np.intp)  # () and [] give no slice
    if np.unique(keep).size != keep.size:
        raise ConfigError("keep holds a slice twice; give each slice index once")
    pos = np.full(len(images), -1)
    pos[keep] = np.arange(keep.size)
    kept = {k: np.zeros((keep.size, *images.shape[1:3]), np.float32) for k in rows
            if keep_names is None or keep_names(k)}

    for r, maps in batches(progress=progress):
        maps = all_rows(maps, slices.subset(r), cal, settings)
        pixels.update(r, maps, lesion[r], brain[r])
        detect.update(r, maps, brain[r])
        k = pos[r]
        for name, out in kept.items():
            out[k[k >= 0]] = maps[name][k >= 0]

    return pixels, detect, kept


def _results(pixels, detect, parts, cals, *, beta, settings) -> dict:
    """The results dict of an accumulator (and the SliceScores `detect`) fed with the
    SliceSets `parts`, calibrated by `cals` (Calibrations or their JSON: one, or one per
    fold). Beside the pixel metrics: "detection" (jaxvae.metrics.detection: slice- and case-level
    AUROC / AP) and "curves" ({row: `Accumulator.curves()`}: ROC and PR over all pixels,
    the region of "auroc")."""
    scored = pixels.result(n_boot=settings.n_boot, seed=settings.seed)
    cals = [c.to_json() if isinstance(c, Calibration) else c for c in cals]
    return {"n_cases": int(sum(len(p.cases) for p in parts)),
            "n_slices": int(sum(len(p) for p in parts)),
            "n_lesion_pixels": int(sum(p.lesion.sum() for p in parts)),
            "settings": dataclasses.asdict(settings), "beta": float(beta),
            "calibration": cals[0] if len(cals) == 1 else {"folds": cals,
                                                           "method": cals[0]["method"]},
            "predictors": {name: {**r["pooled"], "per_case": r["per_case_summary"]}
                           for name, r in scored.items()},
            "per_case": {name: r["per_case"] for name, r in scored.items()},
            "detection": detect.result(),
            "curves": {name: acc.curves() for name, acc in pixels.pooled.items()}}
