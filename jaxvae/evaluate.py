"""Evaluation: a trained model + a test set -> every anomaly map -> metrics -> results files.

Maps come from the jitted scoring functions in fixed-size batches (the last batch padded by
repeating real slices, so one compiled shape serves all and combi's batch min-max is not
changed by padding). Scoring streams: each batch's maps (and the intensity baseline, the
post-processed maps, the ensembles' predictions) go straight into streaming histogram
accumulators (jaxvae.metrics), so memory is bounded by a batch, not by the test set; only
the ensemble's fit pixels (at most 200k values per feature) are kept between passes.
Metrics follow REFERENCE.md §5: pooled pixel AUROC (the paper's protocol) plus AUROC
inside the brain, AUPRC and best Dice, where a method shows that it localises more than
the image intensity already shows.
"""

import dataclasses
import json
import math

import numpy as np
import scipy.ndimage as ndi
from tqdm.auto import tqdm

from jaxvae.ensemble import fit_pixels, fit_samples
from jaxvae.errors import ConfigError
from jaxvae.io import all_or_nothing, write_text
from jaxvae.metrics import MapsAccumulator
from jaxvae.predictors import PREDICTORS, check_predictors

ALL_PREDICTORS = (*PREDICTORS, "proj_rec_error")
ENSEMBLE_FEATURES = ("rec_error", "kl_grad", "rec_grad")
# table order: the paper's predictors, then the baseline and the ensembles
ROW_ORDER = ("rec_error", "elbo_grad", "kl_grad", "rec_grad", "combi", "proj_rec_error",
             "intensity", "ensemble", "ensemble+intensity")
METRIC_COLUMNS = (("auroc", "AUROC"), ("auroc_brain", "AUROC brain"), ("auprc", "AUPRC"),
                  ("dice_best", "best Dice"))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How maps are computed and scored (saved into results.json).

    Attributes:
      predictors: maps to compute, among ALL_PREDICTORS.
      batch_size: slices per compiled call.
      smooth_sigma: Gaussian sigma (pixels) for the gradient maps; 0 = off.
      combi_group: combi's |kl_grad| is min-max normalised over consecutive groups of this
        many slices within each batch (64, with batch_size 64: the reference code's
        per-loader-batch normalisation); 0 = over each whole batch.
      n_samples, seed: Monte-Carlo z (0 = z is mu) and its key.
      proj_steps, proj_lam, proj_lr: Proj-Rec-Error (Adam steps on x, L1 weight, lr).
      ensemble: fit the logistic-regression ensemble on ENSEMBLE_FEATURES (+ intensity
        when `ensemble_intensity`), on `fit_fraction` of the cases.
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
    fit_fraction: float = 0.1
    postprocess: bool = False


def _map_batches(model, params, images, *, beta=1.0, settings=EvalSettings(), only=None,
                 projection=True, progress=False, desc="scoring"):
    """Yield (rows, {name: (n, 64, 64) float32 map}) per batch of `score.batches`, in order.

    Args:
      model, params, images, beta, settings: as `compute_maps`.
      only: batch numbers to compute (None: all). The others are skipped, not renumbered:
        every batch holds the same slices and Monte-Carlo key whichever are computed, so
        its maps (combi's batch min-max included) are the same.
      projection: also Proj-Rec-Error when requested (False: the cheap maps only).
      progress, desc: progress bar.
    """
    import jax  # keeps `import jaxvae.evaluate` light for tools that only read results

    from jaxvae import execution, score

    wanted = check_predictors(settings.predictors, ALL_PREDICTORS)
    grad_preds = tuple(p for p in wanted if p in PREDICTORS)
    policy = execution.current()
    key = jax.random.key(settings.seed)
    todo = [(b, idx, n) for b, (idx, n) in enumerate(score.batches(len(images),
                                                                   settings.batch_size))
            if only is None or b in only]
    for b, idx, n in tqdm(todo, desc=desc, disable=not progress, unit="batch"):
        x = np.asarray(images[idx], np.float32)[..., None]
        out = {}
        if grad_preds:
            maps = score.maps(model, params, x, policy=policy, beta=beta,
                              predictors=grad_preds, smooth_sigma=settings.smooth_sigma,
                              n_samples=settings.n_samples, combi_group=settings.combi_group,
                              key=jax.random.fold_in(key, b) if settings.n_samples else None)
            out.update({name: np.asarray(m)[:n] for name, m in maps.items()})
        if "proj_rec_error" in wanted and projection:
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
    wanted = check_predictors(settings.predictors, ALL_PREDICTORS)
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


def score_dataset(model, params, slices, *, beta=1.0, settings=EvalSettings(), progress=False,
                  keep=None):
    """Metrics of every predictor, the intensity baseline and the ensemble, streamed.

    Each batch's maps go straight into the metric accumulators (pooled and per case), so
    memory is bounded by a batch, not by the number of slices: first the maps of the
    batches holding the ensemble's fit pixels are computed (the cheap maps only) and the
    fit pixels' values kept, the ensemble is fitted, then every batch is scored once. The
    results equal those of `compute_maps` + `score_maps`.

    Args:
      model, params, beta: the trained model.
      slices: a SliceSet (images, brain, lesion, case_ids) of test slices.
      settings: EvalSettings.
      progress: show progress bars.
      keep: the slices whose maps to return: None = all (memory grows with S), or an
        integer index array / (S,) bool mask; () = none.

    Returns:
      (results dict as written to results.json, {name: (K, 64, 64) map} of the K kept
      slices in `keep` order, for every row: predictors, "intensity", "<name>+pp",
      "ensemble"... (the ensembles 0 on their fit cases)).
    """
    names = check_predictors(settings.predictors, ALL_PREDICTORS)
    images = np.asarray(slices.images, np.float32)

    def batches(**kw):
        return _map_batches(model, params, images, beta=beta, settings=settings, **kw)

    return _score(batches, names, slices, beta=beta, settings=settings, keep=keep,
                  progress=progress)


def score_maps(maps, slices, *, beta=1.0, settings=EvalSettings()):
    """Metrics of precomputed maps (plus intensity baseline, post-processing, ensemble).

    Args:
      maps: {name: (S, 64, 64)} from `compute_maps`; rows are added to it in place
        ("intensity", "<name>+pp", "ensemble"...), so callers can draw them.
      slices: the SliceSet the maps belong to.

    Returns:
      the results dict written to results.json.
    """
    from jaxvae import score

    names = [k for k in maps if k != "intensity"]

    def batches(only=None, projection=True, progress=False, desc=None):
        for b, (idx, n) in enumerate(score.batches(len(slices.images), settings.batch_size)):
            if only is None or b in only:
                yield idx[:n], {k: np.asarray(maps[k][idx[:n]], np.float32) for k in names}

    results, rows = _score(batches, names, slices, beta=beta, settings=settings,
                           keep_names=lambda k: k not in names)
    maps.update(rows)
    return results


def _score(batches, names, slices, *, beta, settings, keep=None, keep_names=None,
           progress=False):
    """Stream the maps of `batches` into the metrics of every row (see `score_dataset`).

    Args:
      batches: callable(only=None, projection=True, progress=False, desc=...) yielding
        (rows, {name: (n, 64, 64) map}) for the consecutive batches of
        `score.batches(S, settings.batch_size)`; batch b holds slices b*batch_size...
      names: the map names `batches` yields, in row order.
      keep: slices whose maps to return (see `score_dataset`); keep_names: a predicate on
        the row names to return (None: all).
    """
    images, lesion, brain = slices.images, slices.lesion, slices.brain
    case_ids = np.asarray(slices.case_ids).astype(str)
    rows = [*names, "intensity"]
    if settings.postprocess:
        rows += [f"{name}+pp" for name in rows]
    ensembles, variants = _fit_ensembles(batches, names, slices, settings, progress)
    singles = list(dict.fromkeys(f for fs in variants.values() for f in fs))
    test = np.isin(case_ids, ensembles[next(iter(ensembles))].test_cases) if ensembles else None
    pixels = MapsAccumulator(rows, case_ids)
    held_out = MapsAccumulator([*ensembles, *singles], case_ids, per_case=False)

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
    kept = {k: np.zeros((keep.size, *images.shape[1:]), np.float32) for k in [*rows, *ensembles]
            if keep_names is None or keep_names(k)}

    for r, maps in batches(progress=progress, desc="scoring"):
        maps = {**maps, "intensity": images[r]}  # Meissen et al. 2021 baseline
        if settings.postprocess:
            maps.update({f"{name}+pp": postprocess_maps(maps[name], brain[r])
                         for name in list(maps)})
        pixels.update(r, maps, lesion[r], brain[r])
        if ensembles:
            t = test[r]
            for name in ensembles:
                maps[name] = np.zeros(lesion[r].shape, np.float32)  # 0 on the fit cases
            if t.any():
                singles_t = {f: maps[f][t] for f in singles}
                # the ensembles on the held-out cases, and the single maps on the same cases
                # for a like-for-like comparison
                preds = {name: e.predict(singles_t) for name, e in ensembles.items()}
                held_out.update(r[t], {**preds, **singles_t}, lesion[r][t], brain[r][t])
                for name, pred in preds.items():
                    maps[name][t] = pred
        k = pos[r]
        for name, out in kept.items():
            out[k[k >= 0]] = maps[name][k >= 0]

    scored = pixels.result()
    results = {"n_cases": len(np.unique(case_ids)), "n_slices": int(len(images)),
               "n_lesion_pixels": int(np.sum(lesion)),
               "settings": dataclasses.asdict(settings), "beta": float(beta),
               "predictors": {name: {**r["pooled"], "per_case": r["per_case_summary"]}
                              for name, r in scored.items()}}
    if ensembles:
        scored = held_out.result()
        results["ensemble"] = {
            name: {**scored[name]["pooled"], "weights": e.to_json(),
                   "singles_on_test_cases": {f: scored[f]["pooled"] for f in variants[name]}}
            for name, e in ensembles.items()}
    return results, kept


def _fit_ensembles(batches, names, slices, settings, progress):
    """Fit the ensemble(s) on fit_fraction of the cases, from their fit pixels' values only.

    Returns:
      ({name: Ensemble}, {name: feature names}); empty when the ensemble is off or a
      feature map is not computed.
    """
    feats = [f for f in ENSEMBLE_FEATURES if f in names]
    if not (settings.ensemble and len(feats) == len(ENSEMBLE_FEATURES)):
        return {}, {}
    variants = {"ensemble": feats}
    if settings.ensemble_intensity:
        variants["ensemble+intensity"] = [*feats, "intensity"]
    images, lesion = slices.images, slices.lesion
    fit_ids, test_ids, index = fit_pixels(slices.case_ids, images.shape,
                                          fit_fraction=settings.fit_fraction,
                                          seed=settings.seed, brain=slices.brain)
    hw = images.shape[1] * images.shape[2]
    samples = {f: np.empty(index.size, np.float32) for f in feats}
    only = set(np.unique(index // hw // settings.batch_size).tolist())
    filled = 0
    for r, maps in batches(only=only, projection="proj_rec_error" in feats,
                           progress=progress, desc="ensemble fit maps"):
        lo, hi = np.searchsorted(index, [r[0] * hw, (r[-1] + 1) * hw])
        for f in feats:
            samples[f][lo:hi] = maps[f].reshape(-1)[index[lo:hi] - r[0] * hw]
        filled += hi - lo
    assert filled == index.size, "the fit batches must cover every fit pixel"
    samples["intensity"] = images.reshape(-1)[index]
    y = lesion.reshape(-1)[index]
    ensembles = {name: fit_samples({f: samples[f] for f in fs}, y, fit_cases=fit_ids,
                                   test_cases=test_ids, log_features=feats)  # the maps >= 0
                 for name, fs in variants.items()}
    return ensembles, variants


def row_order(name):
    """Sort key of a result row: ROW_ORDER, each map before its post-processed '+pp' row."""
    base = name.removesuffix("+pp")
    return (ROW_ORDER.index(base) if base in ROW_ORDER else len(ROW_ORDER),
            name.endswith("+pp"), name)


def _fmt(v):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def results_table(results, paper=None) -> str:
    """Markdown table of a results dict; `paper` optionally maps predictor -> paper AUROC."""
    cols = [label for _, label in METRIC_COLUMNS] + (["paper AUROC"] if paper else [])
    lines = ["| predictor | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    rows = dict(results["predictors"])
    rows.update(results.get("ensemble", {}))
    for name, r in sorted(rows.items(), key=lambda kv: row_order(kv[0])):
        label = f"{name} (baseline)" if name == "intensity" else name
        vals = [_fmt(r.get(k)) for k, _ in METRIC_COLUMNS]
        if paper:
            vals.append(_fmt(paper.get(name)))
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def write_results(results, out_dir, *, overwrite=False, paper=None, title="jaxvae results"):
    """Write results.json and results.md (atomically, both or neither) into out_dir."""
    from pathlib import Path

    out_dir = Path(out_dir)
    md = (f"# {title}\n\n{results['n_cases']} cases, {results['n_slices']} slices, "
          f"pixel metrics pooled over all test slices.\n\n" + results_table(results, paper))
    with all_or_nothing([out_dir / "results.json", out_dir / "results.md"]):
        write_text(out_dir / "results.json",
                   json.dumps(results, indent=1, default=_json_default), overwrite=overwrite)
        write_text(out_dir / "results.md", md, overwrite=overwrite)
    return md


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o)}")
