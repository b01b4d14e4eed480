"""The paper's protocol across datasets: train on one cohort, localise lesions in another.

Trains a VAE on the lesion-free slices of every case of the training dataset but its
validation case(s) (BraTS2018 FLAIR by default: nine cases train, one validates), with the
validation loss deciding the checkpoint (patience, step cap), for several seeds; then scores
every case of the test dataset (the BraTS2021 case's FLAIR), every map of the paper plus
the one-signed maps (rec_pos, rec_grad_pos), the intensity baseline (clipped as the model's
input, unclipped, and histogram-equalised) and the ensembles, with the thresholds and the
ensembles fitted on the validation case. Nothing sees the test labels
but the metrics.

    python experiments/cross_dataset.py --seeds 0 1 2

Writes results/cross_dataset/cross_dataset.json and .md: per seed the full results, and the
mean and standard deviation over seeds of every metric. With one test case, a bootstrap over
test cases cannot give an interval: the spread shown is over seeds only.
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
from jaxvae.data import datasets, splits
from jaxvae.data.preprocess import PreprocessParams
from jaxvae.inference.evaluate import score_dataset, score_maps
from jaxvae.inference.settings import KNOWN_PREDICTORS, EvalSettings
from jaxvae.report.results import row_order
from jaxvae.training.checkpoint import load_run
from jaxvae.training.config import CLI_SCHEDULE, TrainConfig, model_from_config
from jaxvae.training.on_split import train_on_split
from jaxvae.training.trainer import init_state

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
METRICS = (("auroc", "AUROC"), ("auroc_brain", "AUROC brain"), ("auprc", "AUPRC"),
           ("dice_val", "Dice (val. thr.)"), ("dice_best", "best Dice (oracle)"))


def parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-data", default=str(SHARED / "brats2018_flair"))
    ap.add_argument("--test-data", default=str(SHARED / "brats2021_t2"))
    ap.add_argument("--modality", default="flair", help="several as channels: flair,t1")
    ap.add_argument("--image-size", type=int, default=64, help="64 or 128")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--latent-dim", type=int, default=64)
    ap.add_argument("--beta", type=float, default=1.0)
    # the CLI's flags, defaults and schedule, from the same dataclasses
    add_flags(ap, TrainConfig, ("lr", "batch_size", "max_steps", "patience"), help=TRAIN_HELP,
              defaults=CLI_SCHEDULE)
    add_flags(ap, EvalSettings, ("proj_steps",), help=EVAL_HELP)
    ap.add_argument("--untrained", action="store_true",
                    help="control: score the initial network of each seed (no training), with "
                         "the same validation case, thresholds and ensembles")
    ap.add_argument("--crop", action="store_true",
                    help="slices resized from the brain's bounding box (Zimmerer et al.'s code)")
    ap.add_argument("--runs", type=Path, default=Path("results/runs"))
    ap.add_argument("--out", type=Path, default=Path("results/cross_dataset"))
    return ap


def train_run(args, seed, slices, desc):
    """Train (or resume, or load) one seed's run; returns model, params, cfg, training info."""
    split = splits.make_split(slices, seed=seed)
    train_set, val, _ = split.slices(slices)
    seqs = args.modality.replace(",", "+")
    run = args.runs.resolve() / (f"xd-{Path(args.train_data).name}-{seqs}-"
                                 f"l{args.latent_dim}-b{args.beta:g}-lr{args.lr:g}-"
                                 f"ms{args.max_steps}-ps{args.patience}-s{seed}"
                                 + ("-crop" if args.crop else "")
                                 + ("" if args.image_size == 64 else f"-px{args.image_size}"))
    images = train_set.images
    cfg = TrainConfig(latent_dim=args.latent_dim, beta=args.beta, lr=args.lr,
                      batch_size=args.batch_size, epochs=100_000, image_size=args.image_size,
                      in_channels=images.shape[-1] if images.ndim == 4 else 1,
                      seed=seed, checkpoint_every=50,
                      patience=args.patience,
                      max_steps=args.max_steps,
                      data=splits.split_description(desc, folds=1, fold=0, seed=seed,
                                                    split=split,
                                                    n_train_slices=len(train_set)))
    if args.untrained:  # the control: the initial parameters of this seed's run
        model = model_from_config(cfg)
        return model, init_state(cfg)[0], cfg, val, {
            "steps": 0, "epochs": 0, "stop": "untrained", "best_step": 0,
            "train_seconds": 0.0, "val_cases": list(split.val)}
    t0 = time.time()
    _, history = train_on_split(cfg, train_set, val, split, run, resume=True, progress=False)
    model, params, cfg = load_run(run)
    best = min(history, key=lambda h: h["val_loss"])
    info = {"run": str(run), "steps": history[-1]["step"], "epochs": history[-1]["epoch"],
            "stop": history[-1].get("stop"), "best_step": best["step"],
            "best_val_loss": best["val_loss"], "train_slices": len(train_set),
            "val_cases": list(split.val), "train_cases": list(split.train),
            "train_seconds": sum(h["seconds"] for h in history),
            "wall_seconds_this_call": round(time.time() - t0, 1)}
    return model, params, cfg, val, info


def baseline_variants(args, val, test):
    """The intensity baseline unclipped and histogram-equalised (Meissen et al. 2021), scored
    like every map: thresholds from the same validation case, beside the clipped one."""
    unclipped = PreprocessParams(clip=None, crop=args.crop, size=args.image_size)
    raw_val = datasets.load_dataset(args.train_data, args.modality,
                                    params=unclipped)[0].for_cases(val.cases)
    raw_test = datasets.load_dataset(args.test_data, args.modality, params=unclipped)[0]
    for raw, ref in ((raw_val, val), (raw_test, test)):  # the same slices, other intensities
        assert (raw.slice_index == ref.slice_index).all() and (raw.case_ids == ref.case_ids).all()

    def maps(s):
        return {"intensity_unclipped": s.images, "intensity_histeq": datasets.equalized(s)}

    res = score_maps(maps(raw_test), test, val_maps=maps(raw_val), val=val,
                     settings=EvalSettings(ensemble=False, n_boot=0))
    return {k: v for k, v in res["predictors"].items() if k != "intensity"}


def summary_table(per_seed):
    """Mean +- sd over seeds of every metric, one row per predictor."""
    names = sorted(per_seed[0]["results"]["predictors"], key=row_order)
    rows = []
    for name in names:
        cells = []
        for key, _ in METRICS:
            v = np.array([s["results"]["predictors"][name][key] for s in per_seed], float)
            cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1
                         else f"{v[0]:.3f}")
        rows.append([f"{name} (baseline)" if name == "intensity" else name, *cells])
    return Table(["predictor", *(label for _, label in METRICS)], rows).markdown()


def main(argv=None):
    args = parser().parse_args(argv)
    params = PreprocessParams(crop=args.crop, size=args.image_size)
    slices, desc = datasets.load_dataset(args.train_data, args.modality, params=params,
                                         progress=True)
    if params != PreprocessParams():
        desc = {**desc, "preprocess": dataclasses.asdict(params)}
    test, _ = datasets.load_dataset(args.test_data, args.modality, params=params,
                                    progress=True)
    settings = EvalSettings(predictors=KNOWN_PREDICTORS, proj_steps=args.proj_steps, n_boot=0)
    per_seed = []
    for seed in args.seeds:
        model, params, cfg, val, info = train_run(args, seed, slices, desc)
        t0 = time.time()
        results, _ = score_dataset(model, params, test, val=val, beta=cfg.beta,
                                   settings=settings, keep=())
        if test.images.ndim == 3:  # one sequence: its unclipped / equalised variants too
            results["predictors"].update(baseline_variants(args, val, test))
        info["eval_seconds"] = round(time.time() - t0, 1)
        per_seed.append({"seed": seed, "training": info, "results": results})
        print(json.dumps({"seed": seed, **info}), file=sys.stderr)
    command = "python " + " ".join(["experiments/cross_dataset.py", *(argv or sys.argv[1:])])
    steps = ", ".join(f"seed {s['seed']}: {s['training']['steps']} steps "
                      f"(best {s['training']['best_step']}, {s['training']['stop']}, "
                      f"{s['training']['train_seconds']:.0f} s)" for s in per_seed)
    what = ("untrained control (initial networks, no training)" if args.untrained
            else f"trained on {Path(args.train_data).name}")
    md = (f"# Cross-dataset: {what}, tested on "
          f"{Path(args.test_data).name} ({args.modality})\n\n`{command}`\n\n"
          f"l = {args.latent_dim}, beta = {args.beta:g}, lr {args.lr:g}, batch "
          f"{args.batch_size}, at most "
          f"{args.max_steps} steps, patience ~{args.patience} steps"
          f"{', slices cropped to the brain box' if args.crop else ''}; {steps}. "
          f"{len(test.cases)} test case(s), {len(test)} slices. Thresholds and ensembles "
          f"fitted on each run's validation case. Mean ± sd over {len(per_seed)} seed(s).\n\n"
          + summary_table(per_seed))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"experiment": "cross_dataset", "command": command, "args": vars(args),
               "seeds": per_seed}
    write_text(args.out / "cross_dataset.json", json.dumps(payload, indent=1, default=str),
               overwrite=True)
    write_text(args.out / "cross_dataset.md", md, overwrite=True)
    print(md)


if __name__ == "__main__":
    main()
