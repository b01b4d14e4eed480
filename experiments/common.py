"""Shared machinery of the experiment scripts: data, folds, cached training runs, scoring.

Default data: the embedded phantoms (healthy cases train, lesion cases test; minutes).
With `--data ../shared/data/brats2018_flair --modality flair`: K-fold cross-validation by
case (default 2). In each fold the training folds' cases minus ~10 % (one case here) train
on their lesion-free slices; the held-out validation case gives the validation loss (which
picks the checkpoint and stops training: --patience, --max-steps), the thresholds of
"Dice (val. threshold)" and the ensembles; the test fold is scored by its own fold's model.
Results per fold and pooled over the folds' test cases, with 95 % intervals by bootstrap
over cases; with several --seeds, every seed is a separate set of runs, and the tables show
mean ± sd over seeds.

Training runs are cached in `--runs` (one run directory per setting, seed and fold) and
resumed, so scripts that share a setting (Table 1 l=64 and Table 2 beta=1) train it once,
and a killed experiment continues where it stopped.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from jaxvae.base.io import write_text
from jaxvae.base.table import Table
from jaxvae.cli.app import EVAL_HELP, TRAIN_HELP
from jaxvae.cli.flags import add_flags
from jaxvae.core.model import reconstruct
from jaxvae.data import datasets, splits
from jaxvae.data.preprocess import PreprocessParams
from jaxvae.inference.compute import compute_maps
from jaxvae.inference.evaluate import score_folds
from jaxvae.inference.settings import EvalSettings
from jaxvae.report.figures import map_figure
from jaxvae.report.results import row_order
from jaxvae.training.checkpoint import load_run
from jaxvae.training.config import CLI_SCHEDULE, TrainConfig
from jaxvae.training.on_split import train_on_split
from jaxvae.training.trainer import init_state

_TABLES = Path(__file__).resolve().parents[1].parent / "shared/reference/paper_tables.json"
PAPER = json.loads(_TABLES.read_text()) if _TABLES.is_file() else {}  # the paper's numbers
METRICS = (("auroc", "AUROC"), ("auroc_brain", "AUROC brain"), ("auprc", "AUPRC"),
           ("dice_val", "Dice (val. thr.)"), ("dice_best", "best Dice (oracle)"))


def parser(description):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", default="phantom", help="'phantom' or a BraTS-layout folder")
    ap.add_argument("--modality", default=None,
                    help="default: t2 (phantom), flair (otherwise); several as channels: flair,t1")
    ap.add_argument("--image-size", type=int, default=64, help="64 or 128")
    ap.add_argument("--folds", type=int, default=None, help="default: 1 (phantom), 2 (otherwise)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    # the CLI's flags, defaults and schedule (trained until the validation loss stops
    # improving), from the same dataclasses
    add_flags(ap, TrainConfig, ("max_steps", "patience", "batch_size", "lr"), help=TRAIN_HELP,
              defaults=CLI_SCHEDULE)
    add_flags(ap, EvalSettings, ("proj_steps", "proj_lam", "n_boot"), help=EVAL_HELP)
    ap.add_argument("--out", type=Path, default=None, help="default: results/<experiment>")
    ap.add_argument("--runs", type=Path, default=Path("results/runs"))
    return ap


def finish_args(args, name):
    phantom = args.data == "phantom"
    args.modality = args.modality or ("t2" if phantom else "flair")
    args.folds = args.folds or (1 if phantom else 2)
    args.out = args.out or Path("results") / name
    args.runs = args.runs.resolve()  # orbax wants absolute checkpoint paths
    args.tag = "phantom" if phantom else Path(args.data).name
    # run names: the sequences joined by '+'; the size only when not the paper's 64
    args.seq_tag = args.modality.replace(",", "+") + ("" if args.image_size == 64 else
                                                      f"-px{args.image_size}")
    return args


def load_folds(args):
    """{seed: [(fold, Split, train, val, test SliceSets, data description)]}."""
    params = PreprocessParams(size=args.image_size)
    slices, desc = datasets.load_dataset(args.data, args.modality, params=params,
                                         progress=True)
    if params != PreprocessParams():  # the run remembers its slice size (evaluate, score)
        desc = {**desc, "preprocess": dataclasses.asdict(params)}
    out = {}
    for seed in args.seeds:
        out[seed] = []
        for i in range(args.folds):
            split = splits.make_split(slices, folds=args.folds, fold=i, seed=seed)
            tr, val, te = split.slices(slices)
            out[seed].append((i, split, tr, val, te, splits.split_description(
                desc, folds=args.folds, fold=i, seed=seed, split=split,
                n_train_slices=len(tr))))
    return out


def trained(args, fold, split, train_set, val, data_desc, *, latent_dim, beta, seed):
    """Train (or resume, or just load) the run of one setting, seed and fold."""
    run = args.runs / (f"{args.tag}-{args.seq_tag}-l{latent_dim}-b{beta:g}-lr{args.lr:g}"
                       f"-ms{args.max_steps}-ps{args.patience}-s{seed}-f{fold}of{args.folds}")
    images = train_set.images
    cfg = TrainConfig(latent_dim=latent_dim, beta=beta, lr=args.lr, batch_size=args.batch_size,
                      epochs=100_000, seed=seed, checkpoint_every=50,
                      image_size=args.image_size,
                      in_channels=images.shape[-1] if images.ndim == 4 else 1,
                      patience=args.patience,
                      max_steps=args.max_steps, data=data_desc)
    _, history = train_on_split(cfg, train_set, val, split, run, resume=True, progress=False)
    model, params, cfg = load_run(run)
    best = min(history, key=lambda h: h.get("val_loss", np.inf))
    info = {"fold": fold, "untrained_params": init_state(cfg)[0],  # the control's network
            "steps": history[-1]["step"], "epochs": history[-1]["epoch"],
            "stop": history[-1].get("stop"), "best_step": best["step"],
            "best_val_loss": best.get("val_loss"),
            "train_seconds": round(sum(h["seconds"] for h in history), 1)}
    return model, params, info


def pooled_setting(args, folds, *, latent_dim, beta, predictors, figure=None, postprocess=False,
                   smooth_sigma=3.0, n_samples=0, **settings_kw):
    """Train every fold of one setting for every seed and score it, and the same seeds'
    initial networks (the untrained control) with the same calibration cases.

    Returns:
      {"seeds": {seed: pooled results (with "per_fold" and "training")}, "summary":
      {predictor: {metric: {"mean", "sd", "n"}}} over seeds, "untrained": the same two for
      the initial networks}.
    """
    settings = EvalSettings(predictors=predictors, proj_steps=args.proj_steps,
                            proj_lam=args.proj_lam, postprocess=postprocess,
                            smooth_sigma=smooth_sigma, n_samples=n_samples,
                            n_boot=args.n_boot, **settings_kw)
    per_seed, control = {}, {}
    for seed, parts in folds.items():
        t0 = time.time()
        runs = [(f, *trained(args, f, split, tr, val, desc, latent_dim=latent_dim, beta=beta,
                             seed=seed), te, val) for f, split, tr, val, te, desc in parts]
        control[seed] = score_folds([(m, info.pop("untrained_params"), beta, te, val)
                                     for _, m, _, info, te, val in runs], settings=settings)[1]
        per_fold, pooled = score_folds([(m, p, beta, te, val) for _, m, p, _, te, val in runs],
                                       settings=settings)
        pooled["per_fold"] = [{k: r[k] for k in ("n_cases", "predictors", "calibration")}
                              for r in per_fold]
        pooled["training"] = [info for _, _, _, info, _, _ in runs]
        pooled["wall_seconds"] = round(time.time() - t0, 1)
        per_seed[seed] = pooled
        if figure is not None and seed == args.seeds[0]:
            _, model, params, _, te, _ = runs[0]
            maps = compute_maps(model, params, te.images, beta=beta, settings=settings)
            x = te.images if te.images.ndim == 4 else te.images[..., None]
            first = x[..., 0]  # the first sequence is drawn
            maps["intensity"] = first
            recon = np.asarray(reconstruct(model, params, x))[..., 0]
            map_figure(figure, first, te.lesion, maps, recon=recon, case_ids=te.case_ids,
                       overwrite=True, title=f"latent {latent_dim}, beta {beta:g} (fold 0)")
    return {"seeds": per_seed, "summary": summarize_seeds(per_seed),
            "untrained": {"seeds": control, "summary": summarize_seeds(control)}}


def summarize_seeds(per_seed):
    """{predictor: {metric: {"mean", "sd", "n"}}} of the pooled results over seeds."""
    out = {}
    names = next(iter(per_seed.values()))["predictors"]
    for name in names:
        out[name] = {}
        for key, _ in METRICS:
            v = np.array([r["predictors"][name][key] for r in per_seed.values()], float)
            out[name][key] = {"mean": float(np.mean(v)),
                              "sd": float(np.std(v, ddof=1)) if v.size > 1 else None,
                              "n": int(v.size)}
    return out


def _cell(res, name, key):
    """One seed: value [95 % case-bootstrap interval]; several: mean ± sd over seeds."""
    s = res["summary"][name][key]
    if s["n"] > 1:
        return f"{s['mean']:.3f} ± {s['sd']:.3f}"
    r = next(iter(res["seeds"].values()))["predictors"][name]
    lo, hi = r.get("ci", {}).get(key, (np.nan, np.nan))
    if np.isnan(r[key]):
        return "n/a"
    return f"{r[key]:.3f}" + ("" if np.isnan(lo) or key == "dice_best" else
                              f" [{lo:.3f}, {hi:.3f}]")


def _vs_null(res, name):
    """One seed: the paired AUPRC difference to best_null [95 %]; several: mean ± sd of the
    pooled difference over seeds."""
    seeds = list(res["seeds"].values())
    if name not in seeds[0]["predictors"] or "best_null" not in seeds[0]["predictors"]:
        return ""
    d = np.array([r["predictors"][name]["auprc"] - r["predictors"]["best_null"]["auprc"]
                  for r in seeds], float)
    if len(seeds) > 1:
        return f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}"
    ci = seeds[0]["predictors"][name].get("vs_null", {}).get("auprc", {}).get("ci")
    return f"{d[0]:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci and not np.isnan(ci[0])
                             else "")


def table(rows, paper=None, *, setting_label):
    """Markdown: one row per (setting, predictor); ours beside the untrained control's
    AUPRC, the paired AUPRC difference to the best fair null and the paper's AUROC."""
    header = [setting_label, "predictor", *(m for _, m in METRICS), "untrained AUPRC",
              "AUPRC - best null", "paper AUROC"]
    lines = []
    for setting, res in rows.items():
        ctl = res.get("untrained")
        for pred in sorted(res["summary"], key=row_order):
            p = (paper or {}).get(setting, {}).get(pred)
            label = "intensity (baseline)" if pred == "intensity" else pred
            lines.append([setting, label, *(_cell(res, pred, k) for k, _ in METRICS),
                          _cell(ctl, pred, "auprc") if ctl and pred in ctl["summary"] else "",
                          _vs_null(res, pred), "" if p is None else f"{p:.3f}"])
    return Table(header, lines).markdown()


def training_note(rows) -> str:
    """Optimiser steps, stop reasons and wall time of every run behind a table."""
    parts = []
    for setting, res in rows.items():
        for seed, r in res["seeds"].items():
            runs = "; ".join(f"fold {t['fold']}: {t['steps']} steps (best {t['best_step']}, "
                             f"{t['stop']}, {t['train_seconds']:.0f} s)" for t in r["training"])
            parts.append(f"- {setting}, seed {seed}: {runs}; scoring and training wall "
                         f"{r['wall_seconds']:.0f} s")
    return "\n".join(parts)


def write_outputs(args, name, rows, md_title, paper=None, *, setting_label, extra=None):
    """results/<name>/<name>.json and .md, with the command line and the paper's numbers."""
    command = "python " + " ".join([f"experiments/{name}.py", *sys.argv[1:]])
    payload = {"experiment": name, "command": command, "data": args.data,
               "modality": args.modality, "folds": args.folds, "seeds": args.seeds,
               "max_steps": args.max_steps, "patience": args.patience,
               "lr": args.lr,
               "results": rows, "paper": paper, **(extra or {})}
    md = (f"# {md_title}\n\n`{command}`\n\nData: {args.tag} ({args.modality}), "
          f"{args.folds} fold(s) by case, one validation case per fold, lr {args.lr:g}, at most "
          f"{args.max_steps} steps, patience ~{args.patience} steps, seeds {args.seeds}. "
          "Cells: pooled over the folds' test cases; one seed: value [95 % case-bootstrap "
          "interval]; several: mean ± sd over seeds. Dice (val. thr.): threshold fitted on "
          "each fold's validation case; best Dice: oracle threshold on the test labels. "
          "Untrained: the same seeds' initial networks, the same calibration. AUPRC - best "
          "null: paired over the bootstrap resamples of the test cases (best_null: the fair "
          "null of best AUPRC on the validation case). Every row restricted to the brain."
          "\n\n"
          + table(rows, paper, setting_label=setting_label) + "\nTraining:\n\n"
          + training_note(rows) + "\n")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{name}.json", json.dumps(payload, indent=1, default=float),
               overwrite=True)
    write_text(args.out / f"{name}.md", md, overwrite=True)
    print(md)
    return md
