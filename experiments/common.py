"""Shared machinery of the experiment scripts: data, folds, cached training runs, pooling.

Default data: the embedded phantoms (healthy cases train, lesion cases test; minutes).
With `--data ../shared/data/brats2018_flair --modality flair`: K-fold cross-validation by
case (default 2): train on the lesion-free slices of one fold, test on all slices of the
other, both ways; maps of all folds are pooled before the metrics are computed.

Training runs are cached in `--runs` (one run directory per setting and fold) and resumed,
so scripts that share a setting (Table 1 l=64 and Table 2 beta=1) train it once, and a
killed experiment continues where it stopped.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jaxvae.checkpoint import load_run
from jaxvae.config import TrainConfig
from jaxvae.data import datasets, splits
from jaxvae.data.datasets import SliceSet
from jaxvae.evaluate import EvalSettings, compute_maps, row_order, score_maps
from jaxvae.figures import map_figure
from jaxvae.io import markdown_table, write_text
from jaxvae.model import reconstruct
from jaxvae.train import train

_TABLES = Path(__file__).resolve().parents[1].parent / "shared/reference/paper_tables.json"
PAPER = json.loads(_TABLES.read_text()) if _TABLES.is_file() else {}  # the paper's numbers


def parser(description, *, epochs=40):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", default="phantom", help="'phantom' or a BraTS-layout folder")
    ap.add_argument("--modality", default=None, help="default: t2 (phantom), flair (otherwise)")
    ap.add_argument("--folds", type=int, default=None, help="default: 1 (phantom), 2 (otherwise)")
    ap.add_argument("--epochs", type=int, default=epochs)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--proj-steps", type=int, default=100)
    ap.add_argument("--proj-lam", type=float, default=1.0)
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
    return args


def load_folds(args):
    """[(fold, train SliceSet, test SliceSet)] and the dataset description."""
    slices, desc = datasets.load_dataset(args.data, args.modality, progress=True)
    folds = []
    for i in range(args.folds):
        tr, te = splits.split(slices, folds=args.folds, fold=i, seed=args.seed)
        folds.append((i, tr, te, splits.split_description(desc, folds=args.folds, fold=i,
                                                            seed=args.seed, train=tr, test=te)))
    return folds


def trained(args, fold, train_set, data_desc, *, latent_dim, beta):
    """Train (or resume, or just load) the run of one setting and fold."""
    run = args.runs / (f"{args.tag}-{args.modality}-l{latent_dim}-b{beta:g}-e{args.epochs}"
                       f"-lr{args.lr:g}-s{args.seed}-f{fold}of{args.folds}")
    cfg = TrainConfig(latent_dim=latent_dim, beta=beta, lr=args.lr, batch_size=args.batch_size,
                      epochs=args.epochs, seed=args.seed,
                      checkpoint_every=max(1, args.epochs // 5), data=data_desc)
    t0 = time.time()
    train(cfg, train_set.images, run, resume=True)
    model, params, cfg = load_run(run)
    return model, params, cfg, time.time() - t0


def pooled_setting(args, folds, *, latent_dim, beta, predictors, figure=None, postprocess=False,
                   smooth_sigma=3.0, n_samples=0):
    """Train every fold of one setting, pool the test maps, and score them."""
    settings = EvalSettings(predictors=predictors, proj_steps=args.proj_steps,
                            proj_lam=args.proj_lam, seed=args.seed, postprocess=postprocess,
                            smooth_sigma=smooth_sigma, n_samples=n_samples)
    tests, maps, recons, seconds = [], [], [], 0.0
    for fold, tr, te, desc in folds:
        model, params, cfg, s = trained(args, fold, tr, desc, latent_dim=latent_dim, beta=beta)
        seconds += s
        maps.append(compute_maps(model, params, te.images, beta=beta, settings=settings,
                                 progress=True))
        x = te.images[..., None]
        recons.append(np.asarray(reconstruct(model, params, x))[..., 0])
        tests.append(te)
    test = SliceSet.concat(tests)
    pooled = {k: np.concatenate([m[k] for m in maps]) for k in maps[0]}
    results = score_maps(pooled, test, beta=beta, settings=settings)
    results["train_seconds"] = seconds
    results["epochs"] = args.epochs
    results["n_train_slices"] = int(sum(len(tr) for _, tr, _, _ in folds))
    if figure is not None:
        shown = {k: pooled[k] for k in (*predictors, "intensity") if k in pooled}
        map_figure(figure, test.images, test.lesion, shown, recon=np.concatenate(recons),
                   case_ids=test.case_ids,
                   overwrite=True, title=f"latent {latent_dim}, beta {beta:g}")
    return results


METRICS = (("auroc", "AUROC"), ("auroc_brain", "AUROC brain"), ("auprc", "AUPRC"),
           ("dice_best", "Dice"))


def table(rows, paper=None, *, setting_label):
    """Markdown: one row per (setting, predictor); ours beside the paper's AUROC."""
    header = [setting_label, "predictor", *(m for _, m in METRICS), "paper AUROC"]
    lines = []
    for setting, res in rows.items():
        entries = dict(res["predictors"])
        entries.update(res.get("ensemble", {}))
        for pred, r in sorted(entries.items(), key=lambda kv: row_order(kv[0])):
            p = (paper or {}).get(setting, {}).get(pred)
            vals = ["n/a" if r.get(k) is None or np.isnan(r[k]) else f"{r[k]:.3f}"
                    for k, _ in METRICS]
            label = "intensity (baseline)" if pred == "intensity" else pred
            lines.append([setting, label, *vals, "" if p is None else f"{p:.3f}"])
    return markdown_table(header, lines)


def write_outputs(args, name, rows, md_title, paper=None, *, setting_label, extra=None):
    """results/<name>/<name>.json and .md, with the command line and the paper's numbers."""
    import sys

    command = "python " + " ".join([f"experiments/{name}.py", *sys.argv[1:]])
    payload = {"experiment": name, "command": command, "data": args.data,
               "modality": args.modality, "folds": args.folds, "epochs": args.epochs,
               "lr": args.lr, "results": rows, "paper": paper, **(extra or {})}
    md = (f"# {md_title}\n\n`{command}`\n\nData: {args.tag} ({args.modality}), "
          f"{args.folds} fold(s), {args.epochs} epochs, lr {args.lr:g}.\n\n"
          + table(rows, paper, setting_label=setting_label))
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{name}.json", json.dumps(payload, indent=1, default=float),
               overwrite=True)
    write_text(args.out / f"{name}.md", md, overwrite=True)
    print(md)
    return md
