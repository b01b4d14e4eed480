"""Evaluation: a trained model + a test set -> every anomaly map -> metrics -> results files.

Maps come from the jitted scoring functions in fixed-size batches (the last batch padded by
repeating real slices, so one compiled shape serves all and combi's batch min-max is not
changed by padding). Metrics follow REFERENCE.md §5: pooled pixel AUROC (the paper's
protocol) plus AUROC inside the brain, AUPRC and best Dice, where a method shows that it
localises more than the image intensity already shows.
"""

import dataclasses
import json
import math

import numpy as np
import scipy.ndimage as ndi
from tqdm.auto import tqdm

from jaxvae.ensemble import fit_ensemble
from jaxvae.io import all_or_nothing, write_text
from jaxvae.metrics import evaluate_maps
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


def compute_maps(model, params, images, *, beta=1.0, settings=EvalSettings(), progress=False):
    """All requested anomaly maps of a stack of slices, batch by batch.

    Args:
      model, params: the trained ConvVAE and its parameters.
      images: (S, 64, 64) float32 pre-processed slices.
      beta: the model's beta (for elbo_grad).
      settings: EvalSettings (predictors, batch size, smoothing, projection...).
      progress: show a progress bar.

    Returns:
      {name: (S, 64, 64) float32 numpy map}.
    """
    import jax  # keeps `import jaxvae.evaluate` light for tools that only read results

    from jaxvae import execution, score

    wanted = check_predictors(settings.predictors, ALL_PREDICTORS)
    grad_preds = tuple(p for p in wanted if p in PREDICTORS)
    images = np.asarray(images, np.float32)
    out = {p: np.empty(images.shape, np.float32) for p in wanted}
    policy = execution.current()
    key = jax.random.key(settings.seed)
    for b, (idx, n) in enumerate(tqdm(list(score.batches(len(images), settings.batch_size)),
                                      desc="scoring", disable=not progress, unit="batch")):
        x = images[idx][..., None]
        if grad_preds:
            maps = score.maps(model, params, x, policy=policy, beta=beta,
                              predictors=grad_preds, smooth_sigma=settings.smooth_sigma,
                              n_samples=settings.n_samples, combi_group=settings.combi_group,
                              key=jax.random.fold_in(key, b) if settings.n_samples else None)
            for name, m in maps.items():
                out[name][idx[:n]] = np.asarray(m)[:n]
        if "proj_rec_error" in wanted:
            _, m = score.project(model, params, x, policy=policy, lam=settings.proj_lam,
                                 steps=settings.proj_steps, lr=settings.proj_lr)
            out["proj_rec_error"][idx[:n]] = np.asarray(m)[:n]
    return out


def postprocess_maps(maps, brain, *, erode=3, median=5):
    """Baur et al. (2021) post-processing: zero outside the eroded brain, then median filter.

    Args:
      maps: (S, H, W) map; brain: (S, H, W) bool.
      erode: erosion iterations of the brain mask (pixels), in-plane.
      median: in-plane median filter size.
    """
    struct = np.zeros((3, 3, 3), bool)
    struct[1] = ndi.generate_binary_structure(2, 1)  # in-plane only: slices are independent
    inner = ndi.binary_erosion(brain, struct, iterations=erode)
    return ndi.median_filter(maps * inner, size=(1, median, median)).astype(np.float32)


def score_dataset(model, params, slices, *, beta=1.0, settings=EvalSettings(), progress=False):
    """Maps and metrics of every predictor, the intensity baseline and the ensemble.

    Args:
      model, params, beta: the trained model.
      slices: a SliceSet (images, brain, lesion, case_ids) of test slices.
      settings: EvalSettings.

    Returns:
      (results dict as written to results.json, {name: (S, 64, 64) map}).
    """
    maps = compute_maps(model, params, slices.images, beta=beta, settings=settings,
                        progress=progress)
    return score_maps(maps, slices, beta=beta, settings=settings), maps


def score_maps(maps, slices, *, beta=1.0, settings=EvalSettings()):
    """Metrics of precomputed maps (plus intensity baseline, post-processing, ensemble).

    Args:
      maps: {name: (S, 64, 64)} from `compute_maps`; rows are added to it in place
        ("intensity", "<name>+pp", "ensemble"...), so callers can draw them.
      slices: the SliceSet the maps belong to.

    Returns:
      the results dict written to results.json.
    """
    maps["intensity"] = np.asarray(slices.images, np.float32)  # Meissen et al. 2021 baseline
    if settings.postprocess:
        for name in list(maps):
            maps[f"{name}+pp"] = postprocess_maps(maps[name], slices.brain)
    scored = evaluate_maps(maps, slices.lesion, slices.brain, slices.case_ids)
    rows = {name: {**r["pooled"], "per_case": r["per_case_summary"]}
            for name, r in scored.items()}
    results = {"n_cases": len(np.unique(slices.case_ids)), "n_slices": int(len(slices.images)),
               "n_lesion_pixels": int(np.sum(slices.lesion)),
               "settings": dataclasses.asdict(settings), "beta": float(beta),
               "predictors": rows}
    feats = [f for f in ENSEMBLE_FEATURES if f in maps]
    if settings.ensemble and len(feats) == len(ENSEMBLE_FEATURES):
        results["ensemble"] = _ensemble(maps, feats, slices, settings)
    return results


def _ensemble(maps, feats, slices, settings):
    """Fit the ensemble(s) on fit_fraction of the cases; score on the others."""
    out = {}
    variants = {"ensemble": feats}
    if settings.ensemble_intensity:
        variants["ensemble+intensity"] = [*feats, "intensity"]
    for name, names in variants.items():
        ens = fit_ensemble({f: maps[f] for f in names}, slices.lesion, slices.case_ids,
                           fit_fraction=settings.fit_fraction, seed=settings.seed,
                           brain=slices.brain, log_features=feats)  # the maps >= 0
        test = np.isin(np.asarray(slices.case_ids).astype(str), ens.test_cases)
        scored_maps = {name: ens.predict({f: maps[f][test] for f in names})}
        # the single predictors on the same held-out cases, for a like-for-like comparison
        scored_maps.update({f: maps[f][test] for f in names})
        scored = evaluate_maps(scored_maps, slices.lesion[test], slices.brain[test],
                               np.asarray(slices.case_ids)[test], per_case=False)
        maps[name] = np.zeros(slices.lesion.shape, np.float32)  # 0 on the fit cases
        maps[name][test] = scored_maps[name]
        out[name] = {**scored[name]["pooled"], "weights": ens.to_json(),
                     "singles_on_test_cases": {f: scored[f]["pooled"] for f in names}}
    return out


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
