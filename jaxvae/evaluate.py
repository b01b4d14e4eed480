"""Evaluation: a trained model + a test set -> every anomaly map -> metrics -> results files.

Maps come from the jitted scoring functions in fixed-size batches (the last batch padded by
repeating real slices, so one compiled shape serves all and combi's batch min-max is not
changed by padding). Scoring streams: each batch's maps (and the intensity baseline, the
post-processed maps, the ensembles' predictions) go straight into streaming histogram
accumulators (jaxvae.case_metrics), so memory is bounded by a batch, not by the test set.
Nothing is chosen on test labels: the thresholds of "Dice (val. threshold)" and the
ensembles are fitted on the validation cases (`calibrate`); the oracle best Dice is
reported beside it, labelled as such. Intervals are 95 % bootstrap intervals over cases.
Metrics follow REFERENCE.md §5: pooled pixel AUROC (the paper's protocol) plus AUROC
inside the brain, AUPRC and best Dice, where a method shows that it localises more than
the image intensity already shows.
"""

import csv
import dataclasses
import io
import json
import math

import numpy as np
import scipy.ndimage as ndi
from tqdm.auto import tqdm

from jaxvae.case_metrics import MapsAccumulator
from jaxvae.ensemble import fit_samples
from jaxvae.errors import ConfigError
from jaxvae.io import all_or_nothing, markdown_table, write_text
from jaxvae.metrics import Accumulator
from jaxvae.predictors import (
    PREDICTORS,
    SIGNED_PREDICTORS,
    VARIANT_PREDICTORS,
    check_predictors,
)

ALL_PREDICTORS = (*PREDICTORS, "proj_rec_error")  # the paper's: the default
KNOWN_PREDICTORS = (*ALL_PREDICTORS, *SIGNED_PREDICTORS, *VARIANT_PREDICTORS)
ENSEMBLE_FEATURES = ("rec_error", "kl_grad", "rec_grad")
# with the one-signed maps computed: an intensity-aware ensemble of them
SIGNED_ENSEMBLE_FEATURES = ("rec_pos", "rec_grad_pos", "kl_grad", "intensity")
MAX_FIT_PIXELS = 200_000  # brain pixels of the validation cases an ensemble is fitted on
# table order: the paper's predictors, the one-signed maps, the baseline and the ensembles
ROW_ORDER = ("rec_error", "elbo_grad", "elbo_grad_sum", "kl_grad", "rec_grad", "combi",
             "proj_rec_error", "rec_pos", "rec_grad_pos", "intensity", "intensity_unclipped",
             "intensity_histeq", "ensemble_plain",
             "ensemble", "ensemble+intensity", "ensemble_signed+intensity")
METRIC_COLUMNS = (("auroc", "AUROC"), ("auroc_brain", "AUROC brain"), ("auprc", "AUPRC"),
                  ("dice_val", "Dice (val. threshold)"), ("dice_best", "best Dice (oracle)"))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How maps are computed and scored (saved into results.json).

    Attributes:
      predictors: maps to compute, among KNOWN_PREDICTORS (default: the paper's).
      batch_size: slices per compiled call.
      smooth_sigma: Gaussian sigma (pixels) for the gradient maps; 0 = off.
      combi_group: combi's |kl_grad| is min-max normalised over consecutive groups of this
        many slices within each batch (64, with batch_size 64: the reference code's
        per-loader-batch normalisation); 0 = over each whole batch.
      n_samples, seed: Monte-Carlo z (0 = z is mu) and its key.
      proj_steps, proj_lam, proj_lr: Proj-Rec-Error (Adam steps on x, L1 weight, lr).
      ensemble: fit the logistic-regression ensembles on the validation cases (when they
        have lesions): "ensemble" on ENSEMBLE_FEATURES (log-scaled, class-balanced),
        "ensemble_plain" the paper's plain regression on the same features, and with
        `ensemble_intensity` "ensemble+intensity" (+ the image) and, when the one-signed
        maps are computed, "ensemble_signed+intensity" (SIGNED_ENSEMBLE_FEATURES).
      val_quantile: with healthy validation cases, each map's threshold is this quantile of
        its values on their brain pixels (0.99: 1 % of healthy brain pixels flagged).
      n_boot: bootstrap resamples of the cases for the 95 % intervals (0: none).
      postprocess: also score each map multiplied by the eroded brain mask and median
        filtered (Baur et al. 2021), as rows "<name>+pp".
    """

    predictors: tuple[str, ...] = ALL_PREDICTORS
    batch_size: int = 64
    smooth_sigma: float = 3.0
    combi_group: int = 64
    n_samples: int = 0
    seed: int = 0
    proj_steps: int = 100
    proj_lam: float = 1.0
    proj_lr: float = 0.03
    ensemble: bool = True
    ensemble_intensity: bool = True
    val_quantile: float = 0.99
    n_boot: int = 1000
    postprocess: bool = False


def _map_batches(model, params, images, *, beta=1.0, settings=EvalSettings(), progress=False,
                 desc="scoring"):
    """Yield (rows, {name: (n, 64, 64) float32 map}) per batch of `score.batches`, in order.

    Args:
      model, params, images, beta, settings: as `compute_maps`.
      progress, desc: progress bar.
    """
    import jax  # keeps `import jaxvae.evaluate` light for tools that only read results

    from jaxvae import execution, score

    wanted = check_predictors(settings.predictors, KNOWN_PREDICTORS)
    grad_preds = tuple(p for p in wanted if p != "proj_rec_error")
    policy = execution.current()
    key = jax.random.key(settings.seed)
    todo = list(enumerate(score.batches(len(images), settings.batch_size)))
    for b, (idx, n) in tqdm(todo, desc=desc, disable=not progress, unit="batch"):
        x = np.asarray(images[idx], np.float32)[..., None]
        out = {}
        if grad_preds:
            maps = score.maps(model, params, x, policy=policy, beta=beta,
                              predictors=grad_preds, smooth_sigma=settings.smooth_sigma,
                              n_samples=settings.n_samples, combi_group=settings.combi_group,
                              key=jax.random.fold_in(key, b) if settings.n_samples else None)
            out.update({name: np.asarray(m)[:n] for name, m in maps.items()})
        if "proj_rec_error" in wanted:
            _, m = score.project(model, params, x, policy=policy, lam=settings.proj_lam,
                                 steps=settings.proj_steps, lr=settings.proj_lr)
            out["proj_rec_error"] = np.asarray(m)[:n]
        yield idx[:n], {p: out[p] for p in wanted if p in out}


def compute_maps(model, params, images, *, beta=1.0, settings=EvalSettings(), progress=False):
    """All requested anomaly maps of a stack of slices, batch by batch, as arrays.

    For metrics, `score_dataset` streams instead: it holds a batch of maps, not S slices.

    Args:
      model, params: the trained ConvVAE and its parameters.
      images: (S, 64, 64) float32 pre-processed slices.
      beta: the model's beta (for elbo_grad).
      settings: EvalSettings (predictors, batch size, smoothing, projection...).
      progress: show a progress bar.

    Returns:
      {name: (S, 64, 64) float32 numpy map}.
    """
    images = np.asarray(images, np.float32)
    wanted = check_predictors(settings.predictors, KNOWN_PREDICTORS)
    out = {p: np.empty(images.shape, np.float32) for p in wanted}
    for rows, maps in _map_batches(model, params, images, beta=beta, settings=settings,
                                   progress=progress):
        for name, m in maps.items():
            out[name][rows] = m
    return out


def postprocess_maps(maps, brain, *, erode=3, median=5):
    """Baur et al. (2021) post-processing: zero outside the eroded brain, then median filter.

    Every step is in-plane, so a batch of slices gives the slices' rows of the whole stack.

    Args:
      maps: (S, H, W) map; brain: (S, H, W) bool.
      erode: erosion iterations of the brain mask (pixels), in-plane.
      median: in-plane median filter size.
    """
    struct = np.zeros((3, 3, 3), bool)
    struct[1] = ndi.generate_binary_structure(2, 1)  # in-plane only: slices are independent
    inner = ndi.binary_erosion(brain, struct, iterations=erode)
    return ndi.median_filter(maps * inner, size=(1, median, median)).astype(np.float32)


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
      (results dict as written to results.json, {name: (K, 64, 64) map} of the K kept
      slices in `keep` order, for every row: predictors, "intensity", "<name>+pp",
      "ensemble"...).
    """
    names = check_predictors(settings.predictors, KNOWN_PREDICTORS)
    images = np.asarray(slices.images, np.float32)
    cal = Calibration()
    if val is not None and len(val):
        cal = calibrate(compute_maps(model, params, val.images, beta=beta, settings=settings,
                                     progress=progress), val, settings)

    def batches(progress=False):
        return _map_batches(model, params, images, beta=beta, settings=settings,
                            progress=progress)

    pixels, kept = _accumulate(batches, names, slices, cal, settings=settings, keep=keep,
                               progress=progress)
    return _results(pixels, [slices], [cal], beta=beta, settings=settings), kept


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
    per_fold, merged = [], None
    for model, params, beta, test, val in folds:
        cal = Calibration()
        if val is not None and len(val):
            cal = calibrate(compute_maps(model, params, val.images, beta=beta,
                                         settings=settings, progress=progress), val, settings)

        def batches(progress=False, model=model, params=params, beta=beta, test=test):
            return _map_batches(model, params, np.asarray(test.images, np.float32), beta=beta,
                                settings=settings, progress=progress)

        pixels, _ = _accumulate(batches, names, test, cal, settings=settings, keep=(),
                                progress=progress)
        per_fold.append(_results(pixels, [test], [cal], beta=beta, settings=settings))
        merged = pixels if merged is None else merged.merge(pixels)
    pooled = _results(merged, [f[3] for f in folds], [r["calibration"] for r in per_fold],
                      beta=folds[0][2], settings=settings)
    return per_fold, pooled


def score_maps(maps, slices, *, val_maps=None, val=None, beta=1.0, settings=EvalSettings()):
    """Metrics of precomputed maps (plus intensity baseline, post-processing, ensemble).

    Args:
      maps: {name: (S, 64, 64)} from `compute_maps`; rows are added to it in place
        ("intensity", "<name>+pp", "ensemble"...), so callers can draw them.
      slices: the SliceSet the maps belong to.
      val_maps, val: maps of the validation slices and their SliceSet (None: no
        calibration).

    Returns:
      the results dict written to results.json.
    """
    from jaxvae import score

    names = [k for k in maps if k != "intensity"]
    cal = Calibration() if val is None or not len(val) else calibrate(dict(val_maps), val,
                                                                        settings)

    def batches(progress=False):
        for idx, n in score.batches(len(slices.images), settings.batch_size):
            yield idx[:n], {k: np.asarray(maps[k][idx[:n]], np.float32) for k in names}

    pixels, rows = _accumulate(batches, names, slices, cal, settings=settings,
                               keep_names=lambda k: k not in names)
    maps.update(rows)
    return _results(pixels, [slices], [cal], beta=beta, settings=settings)


@dataclasses.dataclass
class Calibration:
    """What is fitted on the validation cases: thresholds and ensembles.

    Attributes:
      thresholds: {row: score threshold} (a pixel is called lesion where score >= it).
      ensembles: {"ensemble" / "ensemble+intensity": Ensemble} (only with val lesions).
      method: "val_best_dice" (the threshold of best Dice on the validation cases, which
        have lesions), "val_quantile" (`settings.val_quantile` of the validation maps inside
        the brain: healthy validation cases) or "none" (no validation cases).
      val_cases: the validation case IDs.
      val_results: pooled metrics of every row on the validation cases.
    """

    thresholds: dict = dataclasses.field(default_factory=dict)
    ensembles: dict = dataclasses.field(default_factory=dict)
    method: str = "none"
    val_cases: tuple = ()
    val_results: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {"method": self.method, "val_cases": list(self.val_cases),
                "thresholds": self.thresholds, "val_pooled": self.val_results,
                "ensemble_weights": {k: e.to_json() for k, e in self.ensembles.items()}}


def _rows_of(maps, slices, settings):
    """The maps plus the intensity baseline and (when asked) the post-processed rows."""
    maps = {**maps, "intensity": np.asarray(slices.images, np.float32)}  # Meissen et al. 2021
    if settings.postprocess:
        maps.update({f"{name}+pp": postprocess_maps(maps[name], slices.brain)
                     for name in list(maps)})
    return maps


# An ensemble is a model of brain pixels (it is fitted on them only): outside the brain its
# score is the lowest there is, as every map's is ~0 there, instead of an extrapolation of
# the regression to background values it never saw.
_OUTSIDE = np.float32(np.finfo(np.float32).min)


def _ensemble_map(ensemble, maps, brain):
    """The ensemble's score of every pixel, the lowest score outside the brain."""
    pred = ensemble.predict({f: maps[f] for f in ensemble.feature_names})
    return np.where(brain, pred, _OUTSIDE).astype(np.float32)


def calibrate(val_maps, val, settings=EvalSettings()) -> Calibration:
    """Fit thresholds (and, where the validation cases have lesions, the ensembles) on them.

    Args:
      val_maps: {name: (V, 64, 64)} maps of the validation slices.
      val: their SliceSet.
      settings: EvalSettings (ensemble switches, val_quantile, seed).
    """
    maps = _rows_of(val_maps, val, settings)
    ensembles = {}
    has_lesion = bool(val.lesion.any())
    feats = [f for f in ENSEMBLE_FEATURES if f in maps]
    if has_lesion and settings.ensemble and len(feats) == len(ENSEMBLE_FEATURES):
        variants = {"ensemble": feats, "ensemble_plain": feats}
        if settings.ensemble_intensity:
            variants["ensemble+intensity"] = [*feats, "intensity"]
            if all(f in maps for f in SIGNED_ENSEMBLE_FEATURES):
                variants["ensemble_signed+intensity"] = list(SIGNED_ENSEMBLE_FEATURES)
        idx = np.flatnonzero(val.brain.reshape(-1))
        rng = np.random.default_rng(settings.seed)
        if idx.size > MAX_FIT_PIXELS:
            idx = np.sort(rng.choice(idx, size=MAX_FIT_PIXELS, replace=False))
        y = val.lesion.reshape(-1)[idx]
        for name, fs in variants.items():
            # "ensemble_plain": the paper's plain logistic regression (no log transform, no
            # class weights) on the same pixels, beside ours
            plain = name == "ensemble_plain"
            ensembles[name] = fit_samples({f: maps[f].reshape(-1)[idx] for f in fs}, y,
                                          fit_cases=val.cases, balanced=not plain,
                                          log_features=[] if plain else
                                          [f for f in fs if f != "intensity"])
            maps[name] = _ensemble_map(ensembles[name], maps, val.brain)
    pooled = {name: Accumulator().update(m, val.lesion, val.brain) for name, m in maps.items()}
    if has_lesion:
        thresholds = {k: a.result()["dice_threshold"] for k, a in pooled.items()}
        method = "val_best_dice"
    else:
        thresholds = {k: a.threshold_at_quantile(settings.val_quantile)
                      for k, a in pooled.items()}
        method = "val_quantile"
    return Calibration(thresholds=thresholds, ensembles=ensembles, method=method,
                       val_cases=tuple(val.cases),
                       val_results={k: a.result() for k, a in pooled.items()})


def _accumulate(batches, names, slices, cal, *, settings, keep=None, keep_names=None,
                progress=False):
    """Stream the maps of `batches` into the metrics of every row (see `score_dataset`).

    Args:
      batches: callable(progress=False) yielding (rows, {name: (n, 64, 64) map}) for
        consecutive batches of the slices.
      names: the map names `batches` yields, in row order.
      cal: the Calibration fitted on the validation cases.
      keep: slices whose maps to return (see `score_dataset`); keep_names: a predicate on
        the row names to return (None: all).

    Returns:
      (the MapsAccumulator of every row, {row: kept maps}).
    """
    images, lesion, brain = slices.images, slices.lesion, slices.brain
    case_ids = np.asarray(slices.case_ids).astype(str)
    rows = [*names, "intensity"]
    if settings.postprocess:
        rows += [f"{name}+pp" for name in rows]
    rows += list(cal.ensembles)
    pixels = MapsAccumulator(rows, case_ids,
                             thresholds={k: t for k, t in cal.thresholds.items() if k in rows})
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
    kept = {k: np.zeros((keep.size, *images.shape[1:]), np.float32) for k in rows
            if keep_names is None or keep_names(k)}

    for r, maps in batches(progress=progress):
        maps = _rows_of(maps, slices.subset(r), settings)
        for name, e in cal.ensembles.items():
            maps[name] = _ensemble_map(e, maps, brain[r])
        pixels.update(r, maps, lesion[r], brain[r])
        k = pos[r]
        for name, out in kept.items():
            out[k[k >= 0]] = maps[name][k >= 0]

    return pixels, kept


def _results(pixels, parts, cals, *, beta, settings) -> dict:
    """The results dict of an accumulator fed with the SliceSets `parts`, calibrated by
    `cals` (Calibrations or their JSON: one, or one per fold)."""
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
            "per_case": {name: r["per_case"] for name, r in scored.items()}}


def row_order(name):
    """Sort key of a result row: ROW_ORDER, each map before its post-processed '+pp' row."""
    base = name.removesuffix("+pp")
    return (ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER),
            name.endswith("+pp"), name)


def _fmt(v, ci=None):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if ci is None or any(c is None or math.isnan(c) for c in ci):
        return f"{v:.3f}"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def results_table(results, paper=None) -> str:
    """Markdown table of a results dict, 95 % case-bootstrap intervals in brackets.

    Args:
      results: from `score_dataset` / `score_maps`.
      paper: optional {predictor: the paper's AUROC}.
    """
    cols = list(METRIC_COLUMNS)
    if not results.get("n_lesion_pixels"):  # healthy data: what can be measured there
        cols = [("frac_above", "brain pixels >= val threshold")]
    header = ["predictor", *(label for _, label in cols), *(["paper AUROC"] if paper else [])]
    lines = []
    for name, r in sorted(results["predictors"].items(), key=lambda kv: row_order(kv[0])):
        label = f"{name} (baseline)" if name == "intensity" else name
        ci = r.get("ci", {})
        vals = [_fmt(r.get(k), ci.get(k) if k != "dice_best" else None) for k, _ in cols]
        lines.append([label, *vals, *([_fmt(paper.get(name))] if paper else [])])
    return markdown_table(header, lines)


PER_CASE_COLUMNS = ("auroc", "auroc_brain", "auprc", "dice_val", "dice_best", "lesion_pixels",
                    "frac_above")


def per_case_csv(results) -> str:
    """One row per case and predictor: the per-case metrics of `results["per_case"]`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "predictor", *PER_CASE_COLUMNS])
    for name in sorted(results.get("per_case", {}), key=row_order):
        for case, m in results["per_case"][name].items():
            w.writerow([case, name, *("" if m.get(k) is None else m[k]
                                      for k in PER_CASE_COLUMNS)])
    return buf.getvalue()


def describe(results) -> str:
    """The lines above the table: test set, calibration, intervals."""
    cal, settings = results.get("calibration", {}), results.get("settings", {})
    n_val = sum(len(c.get("val_cases", [])) for c in cal.get("folds", [cal]))
    how = {"val_best_dice": "the best-Dice threshold and the ensemble fitted on the "
                            f"{n_val} validation case(s)" + (" of each fold" if "folds" in cal
                                                             else ""),
           "val_quantile": f"the {settings.get('val_quantile')} quantile of the healthy "
                           "validation cases' brain pixels (no ensemble: no validation lesion)",
           }.get(cal.get("method"), "no validation cases (no threshold, no ensemble)")
    n_boot = settings.get("n_boot", 0)
    return (f"{results['n_cases']} test cases, {results['n_slices']} slices, pixel metrics "
            f"pooled over all test slices; Dice at {how}; best Dice is the oracle (threshold "
            f"chosen on the test labels). " + (f"95 % intervals: {n_boot} bootstrap resamples "
                                               "of the test cases." if n_boot else ""))


def write_results(results, out_dir, *, overwrite=False, paper=None, title="jaxvae results"):
    """Write results.json, results.md and per_case.csv (atomically, all or none) to out_dir."""
    from pathlib import Path

    out_dir = Path(out_dir)
    md = f"# {title}\n\n{describe(results)}\n\n" + results_table(results, paper)
    files = {"results.json": json.dumps(results, indent=1, default=_json_default),
             "results.md": md, "per_case.csv": per_case_csv(results)}
    with all_or_nothing([out_dir / f for f in files]):
        for name, text in files.items():
            write_text(out_dir / name, text, overwrite=overwrite)
    return md


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o)}")
