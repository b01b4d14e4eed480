"""Command line: `jaxvae train|score|evaluate|demo|bench`.

Thin: parses, calls the library, prints. Every expected failure is a JaxvaeError (or an
OSError) printed as one line on stderr with exit code 2; `--debug` shows the traceback.
"""

import argparse
import json
import sys
import time
from pathlib import Path

from jaxvae.errors import ConfigError, JaxvaeError, OutputError

EPILOG = {
    "train": "example: jaxvae train --data ../shared/data/brats2018_flair --modality flair "
             "--folds 2 --fold 0 --latent-dim 64 --epochs 100 --out runs/l64-f0",
    "score": "example: jaxvae score --run runs/l64-f0 --input case_flair.nii.gz "
             "--predictors rec_grad,kl_grad --out maps/ --png",
    "evaluate": "example: jaxvae evaluate --run runs/l64-f0 --out results/l64-f0 (the run's "
                "own test cases), or --data ../shared/data/brats2021_t2 (every case of another "
                "dataset); thresholds and the ensemble come from the run's validation cases",
    "demo": "example: jaxvae demo --out demo_out --quick",
    "bench": "example: jaxvae bench --batch-size 64 256 --out bench.json",
}


def _positive(kind):
    def parse(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        return v
    return parse


def _non_negative(s):
    v = float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _eval_args(p):
    p.add_argument("--predictors", default=None,
                   help="comma-separated subset of rec_error,rec_grad,kl_grad,elbo_grad,combi,"
                        "proj_rec_error (default: these, the paper's) and the one-signed "
                        "rec_pos,rec_grad_pos (hyperintense lesions: FLAIR, T2)")
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--smooth-sigma", type=_non_negative, default=3.0,
                   help="Gaussian sigma (pixels) of the gradient maps; 0 disables")
    p.add_argument("--combi-group", type=int, default=64,
                   help="slices per min-max group of combi's |kl_grad| (64: the reference "
                        "code's loader batches); 0 = each whole batch")
    p.add_argument("--proj-steps", type=int, default=100, help="Adam steps of Proj-Rec-Error")
    p.add_argument("--proj-lam", type=_non_negative, default=1.0, help="L1 weight of projection")
    p.add_argument("--n-samples", type=int, default=0, help="Monte-Carlo z samples (0: z = mu)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _settings(args, **extra):
    from jaxvae.evaluate import ALL_PREDICTORS, KNOWN_PREDICTORS, EvalSettings
    from jaxvae.predictors import check_predictors

    preds = check_predictors(args.predictors, KNOWN_PREDICTORS, ALL_PREDICTORS)
    if args.proj_steps < 0 or args.n_samples < 0 or args.combi_group < 0:
        raise ConfigError("--proj-steps, --n-samples and --combi-group must be >= 0")
    return EvalSettings(predictors=preds, batch_size=args.batch_size,
                        smooth_sigma=args.smooth_sigma, combi_group=args.combi_group,
                        proj_steps=args.proj_steps,
                        proj_lam=args.proj_lam, n_samples=args.n_samples, **extra)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jaxvae", description=__doc__.splitlines()[0])
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="verb", required=True)

    def verb(name, help_):
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOG[name])
        # SUPPRESS: the sub-parser's default must not reset `jaxvae --debug <verb>` to False
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks")
        return p

    p = verb("train", "train a VAE / beta-VAE on healthy slices")
    p.add_argument("--data", required=True,
                   help="BraTS-layout folder (lesion-free slices of the training cases), folder "
                        "of healthy volumes, or 'phantom'")
    p.add_argument("--out", required=True, type=Path, help="run directory")
    p.add_argument("--modality", default="t2")
    p.add_argument("--latent-dim", type=_positive(int), default=256)
    p.add_argument("--beta", type=_non_negative, default=1.0)
    p.add_argument("--epochs", type=_positive(int), default=500)
    p.add_argument("--batch-size", type=_positive(int), default=64)
    p.add_argument("--lr", type=_positive(float), default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", type=_positive(int), default=1,
                   help="K-fold cross-validation by case (1: healthy cases train, or, without "
                        "any, the lesion-free slices of every case)")
    p.add_argument("--fold", type=int, default=0, help="which fold is held out for testing")
    p.add_argument("--split", type=Path, default=None,
                   help='split.json {"train": [...], "val": [...], "test": [...]} of case IDs '
                        "(instead of --folds)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training cases held out for validation (at least one)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after this many epochs without a better validation loss (0: off)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many optimiser steps (0: no cap)")
    p.add_argument("--max-slices", type=_positive(int), default=None,
                   help="cap the training set (a seeded random subset)")
    p.add_argument("--checkpoint-every", type=_positive(int), default=10, help="in epochs")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--crop-to-brain", action="store_true",
                   help="resize the brain's bounding box, not the whole slice (Zimmerer et "
                        "al.'s code); the run remembers it for evaluate and score")
    p.add_argument("--coordinator", default=None, help="multi-process: host:port of process 0")
    p.add_argument("--num-processes", type=_positive(int), default=1)
    p.add_argument("--process-id", type=int, default=0)

    p = verb("score", "write anomaly maps of NIfTI volumes on their own grid")
    p.add_argument("--run", required=True, type=Path, help="run directory from `jaxvae train`")
    p.add_argument("--input", required=True, type=Path, help="a .nii/.nii.gz volume or a folder")
    p.add_argument("--mask", type=Path, default=None, help="brain mask of a single input")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--png", action="store_true", help="also write an overview figure")
    p.add_argument("--strict", action="store_true", help="stop at the first bad volume")
    p.add_argument("--volume-index", type=int, default=None, help="volume of a 4D input")
    p.add_argument("--modality", default=None,
                   help="score an input whose name says another sequence than the run's")
    _eval_args(p)

    p = verb("evaluate", "score a test set: results.json and results.md")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default=None,
                   help="default: the run's own data (its test cases); another dataset: every "
                        "case of it is scored")
    p.add_argument("--modality", default=None, help="default: the run's modality")
    p.add_argument("--val-quantile", type=float, default=0.99,
                   help="with healthy validation cases: the threshold is this quantile of "
                        "their brain pixels' scores")
    p.add_argument("--n-boot", type=int, default=1000,
                   help="bootstrap resamples of the test cases for 95%% intervals (0: none)")
    p.add_argument("--postprocess", action="store_true",
                   help="add rows with brain-mask erosion + median filter (Baur et al. 2021)")
    _eval_args(p)

    p = verb("demo", "the whole pipeline on the embedded phantom data")
    p.add_argument("--out", type=Path, default=Path("demo_out"))
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (about a minute)")
    p.add_argument("--overwrite", action="store_true")

    p = verb("bench", "throughput of predictors, projection and training (JSON)")
    p.add_argument("--batch-size", type=_positive(int), nargs="+", default=[64, 256])
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--repeats", type=_positive(int), default=5)
    p.add_argument("--no-torch", action="store_true", help="JAX only")
    return ap


def cmd_train(args):
    import dataclasses

    from jaxvae.checkpoint import check_run_dir
    from jaxvae.config import AugmentConfig, TrainConfig
    from jaxvae.data import datasets, splits
    from jaxvae.data.preprocess import PreprocessParams
    from jaxvae.train import train

    _check_outputs(args.out, [], args.overwrite)  # a file in the way: refuse before loading
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # and a used run dir
    if args.split and (args.folds > 1 or args.fold):
        raise ConfigError("give either --split or --folds/--fold, not both")
    if args.coordinator:
        from jaxvae.parallel import initialize_distributed
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    preprocess = PreprocessParams(crop=args.crop_to_brain)
    slices, desc = datasets.load_dataset(args.data, args.modality, params=preprocess,
                                         progress=True)
    if preprocess != PreprocessParams():  # recorded when not the default (older runs resume)
        desc = {**desc, "preprocess": dataclasses.asdict(preprocess)}
    if args.split:
        split = splits.read_split(args.split, slices.cases)
    else:
        split = splits.make_split(slices, folds=args.folds, fold=args.fold, seed=args.seed,
                                  val_fraction=args.val_fraction)
    train_set, val_set, _ = split.slices(slices)
    if not len(train_set):
        raise ConfigError(f"{args.data}: the training cases have no lesion-free slice")
    if args.max_slices and len(train_set) > args.max_slices:
        import numpy as np
        keep = np.sort(np.random.default_rng(args.seed).choice(len(train_set), args.max_slices,
                                                                replace=False))
        train_set = train_set.subset(keep)
    data = splits.split_description(desc, folds=args.folds, fold=args.fold, seed=args.seed,
                                      split=split, n_train_slices=len(train_set))
    cfg = TrainConfig(latent_dim=args.latent_dim, beta=args.beta, lr=args.lr,
                      batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, augment=not args.no_augment,
                      augmentation=AugmentConfig(), patience=args.patience,
                      max_steps=args.max_steps, data=data)
    t0 = time.time()
    try:
        _, history = train(cfg, train_set.images, args.out, resume=args.resume,
                           overwrite=args.overwrite, val_images=val_set.lesion_free().images)
    finally:
        if (args.out / "config.json").is_file():  # the run exists: its split beside it
            splits.write_split(split, args.out / "split.json", overwrite=True)
    sick = set(slices.case_ids[slices.lesion.any(axis=(1, 2))].tolist())
    what = ("the lesion-free slices of " if sick & set(split.train) else "") + \
        f"{len(train_set)} slices of {len(split.train)} cases"
    print(f"trained on {what}; {_progress_line(history)} in {time.time() - t0:.0f} s; "
          f"{len(split.val)} validation, {len(split.test)} test cases; run directory: "
          f"{args.out} (split.json, metrics.jsonl, loss.png)")


def _progress_line(history) -> str:
    """'N optimiser steps (E epochs, stopped by ...), best val loss X at step S'."""
    from jaxvae.train import summarize

    if not history:
        return "no epoch trained"
    s = summarize(history)
    line = f"{s['steps']} optimiser steps ({s['epoch']} epochs, stopped by {s['stop']})"
    line += f", final loss {history[-1]['loss']:.1f}"
    if s.get("best_val_loss") is not None:
        line += f", best val loss {s['best_val_loss']:.1f} at step {s['best_step']}"
    return line


def _same_data(a, b) -> bool:
    if "phantom" in (str(a), str(b)):
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()


def _run_and_data(args):
    """The run, its test slices and its validation slices (see `cmd_evaluate`)."""
    from jaxvae.checkpoint import load_run
    from jaxvae.config import preprocess_of
    from jaxvae.data import datasets, splits

    model, params, cfg, info = load_run(args.run, with_info=True)  # the best-val checkpoint
    d = cfg.data or {}
    preprocess = preprocess_of(cfg)
    own = "phantom" if d.get("source") == "phantom" else d.get("path")
    modality = args.modality or d.get("modality") or "t2"
    split = splits.run_split(d)
    if own is None and args.data is None:
        raise ConfigError(f"{args.run}: the run records no data path; give --data")
    val = slices = None
    if own is not None and split is not None and split.val:
        if own != "phantom" and not Path(own).exists():
            raise ConfigError(f"{args.run}: its validation cases are in {own}, which is gone; "
                              "thresholds and the ensemble are fitted on them")
        slices, _ = datasets.load_dataset(own, modality, params=preprocess, progress=True)
        val = slices.for_cases(split.val)
    if args.data is None or (own is not None and _same_data(args.data, own)):
        if split is None or not split.test:
            raise ConfigError(f"{args.run}: the run holds out no test case of {own} (it trained "
                              "on every case); evaluate it on another dataset with --data")
        if slices is None:
            slices, _ = datasets.load_dataset(own, modality, params=preprocess, progress=True)
        test = slices.for_cases(split.test)
    else:  # another dataset: every case of it
        for case in datasets.find_cases(args.data, modality)[0]:  # names of plain volumes
            datasets.check_modality(case.image_path, d.get("modality"), args.modality)
        test, _ = datasets.load_dataset(args.data, modality, params=preprocess, progress=True)
    return model, params, cfg, test, val, info


def cmd_evaluate(args):
    from jaxvae.evaluate import score_dataset
    from jaxvae.results import write_results

    _check_outputs(args.out, ["results.json", "results.md", "per_case.csv"], args.overwrite)
    if not 0 < args.val_quantile < 1 or args.n_boot < 0:
        raise ConfigError("--val-quantile must be in (0, 1) and --n-boot >= 0")
    settings = _settings(args, postprocess=args.postprocess, val_quantile=args.val_quantile,
                         n_boot=args.n_boot)  # bad flags before slow loading
    model, params, cfg, test, val, info = _run_and_data(args)
    results, _ = score_dataset(model, params, test, val=val, beta=cfg.beta, settings=settings,
                               progress=True, keep=())  # no maps kept: memory of a batch
    results["run"] = {"path": str(args.run), "checkpoint": info}
    md = write_results(results, args.out, overwrite=args.overwrite,
                       title=f"jaxvae evaluate {args.run}")
    print(md)
    print(f"wrote {args.out / 'results.json'}, results.md and per_case.csv")


def cmd_score(args):
    from jaxvae import score
    from jaxvae.checkpoint import load_run
    from jaxvae.config import preprocess_of
    from jaxvae.data import datasets

    settings = _settings(args)  # bad flags before slow loading
    _check_outputs(args.out, [], args.overwrite)
    model, params, cfg = load_run(args.run)
    trained = (cfg.data or {}).get("modality")
    if args.input.is_dir():
        inputs = sorted(p for p in args.input.iterdir()
                        if p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith("."))
        if not inputs:
            raise ConfigError(f"{args.input}: no .nii/.nii.gz volumes in this folder")
        if args.mask:
            raise ConfigError("--mask applies to a single --input volume, not a folder")
    elif args.input.exists():
        inputs = [args.input]
    else:
        raise ConfigError(f"{args.input}: no such file or folder")
    for path in inputs:
        datasets.check_modality(path, trained, args.modality)
    from tqdm.auto import tqdm

    written, failed = [], []
    for path in tqdm(inputs, desc="volumes", unit="vol", disable=len(inputs) == 1):
        try:
            written += score.score_volume(model, params, path, args.out, beta=cfg.beta,
                                             mask=args.mask, settings=settings,
                                             overwrite=args.overwrite, png=args.png,
                                             volume_index=args.volume_index,
                                             preprocess=preprocess_of(cfg))
        except JaxvaeError as e:
            if args.strict or len(inputs) == 1:
                raise
            failed.append(path)
            # tqdm.write: on its own line, not glued to the progress bar
            tqdm.write(f"jaxvae score: skipped: {_one_line(e)}", file=sys.stderr)
    print(f"wrote {len(written)} files for {len(inputs) - len(failed)} volume(s) to {args.out}"
          + (f"; {len(failed)} skipped" if failed else ""))
    if failed:
        return 1
    return 0


def _check_outputs(out_dir, names, overwrite):
    """Refuse up front (before minutes of work) when outputs exist and --overwrite is off,
    or when the output folder cannot be created (a file is in the way)."""
    from jaxvae.io import check_out_dir

    check_out_dir(out_dir)
    for n in names:
        if (Path(out_dir) / n).exists() and not overwrite:
            raise OutputError(f"{Path(out_dir) / n}: already exists (use --overwrite)")


def cmd_demo(args):
    from jaxvae.demo import run_demo

    run_demo(args.out, quick=args.quick, overwrite=args.overwrite)


def cmd_bench(args):
    from jaxvae.bench.harness import run

    frameworks = ("jax",) if args.no_torch else ("jax", "torch")
    result = run(batch_sizes=tuple(args.batch_size), frameworks=frameworks,
                 repeats=args.repeats, out=args.out)
    if args.out is None:
        print(json.dumps(result, indent=1))


def _one_line(e: BaseException) -> str:
    """The first line of an error message (some carry an affine matrix below it)."""
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


COMMANDS = {"train": cmd_train, "score": cmd_score, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "bench": cmd_bench}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.verb](args) or 0
    except (JaxvaeError, OSError) as e:
        if args.debug:
            raise
        print(f"jaxvae {args.verb}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxvae {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
