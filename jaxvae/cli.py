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
    "evaluate": "example: jaxvae evaluate --run runs/l64-f0 --out results/l64-f0 "
                "(data, modality and split default to those of the run)",
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
                        "proj_rec_error (default: all)")
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
    from jaxvae.evaluate import ALL_PREDICTORS, EvalSettings
    from jaxvae.predictors import check_predictors

    preds = check_predictors(args.predictors, ALL_PREDICTORS)
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
                   help="K-fold cross-validation by case (1: healthy cases train)")
    p.add_argument("--fold", type=int, default=0, help="which fold is held out for testing")
    p.add_argument("--max-slices", type=_positive(int), default=None,
                   help="cap the training set (a seeded random subset)")
    p.add_argument("--checkpoint-every", type=_positive(int), default=10, help="in epochs")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.add_argument("--no-augment", action="store_true")
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
    _eval_args(p)

    p = verb("evaluate", "score a test set: results.json and results.md")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--data", default=None, help="default: the run's training data")
    p.add_argument("--modality", default=None)
    p.add_argument("--folds", type=_positive(int), default=None)
    p.add_argument("--fold", type=int, default=None)
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
    from jaxvae.checkpoint import check_run_dir
    from jaxvae.config import AugmentConfig, TrainConfig
    from jaxvae.data import datasets, splits
    from jaxvae.train import train

    _check_outputs(args.out, [], args.overwrite)  # a file in the way: refuse before loading
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # and a used run dir
    if args.coordinator:
        from jaxvae.parallel import initialize_distributed
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    slices, desc = datasets.load_dataset(args.data, args.modality, progress=True)
    train_set, test_set = splits.split(slices, folds=args.folds, fold=args.fold, seed=args.seed)
    if args.max_slices and len(train_set) > args.max_slices:
        import numpy as np
        keep = np.sort(np.random.default_rng(args.seed).choice(len(train_set), args.max_slices,
                                                                replace=False))
        train_set = train_set.subset(keep)
    data = splits.split_description(desc, folds=args.folds, fold=args.fold, seed=args.seed,
                                      train=train_set, test=test_set)
    cfg = TrainConfig(latent_dim=args.latent_dim, beta=args.beta, lr=args.lr,
                      batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                      checkpoint_every=args.checkpoint_every, augment=not args.no_augment,
                      augmentation=AugmentConfig(), data=data)
    t0 = time.time()
    _, history = train(cfg, train_set.images, args.out, resume=args.resume,
                       overwrite=args.overwrite)
    last = history[-1] if history else {}
    print(f"trained {len(train_set)} slices of {len(train_set.cases)} cases, "
          f"{len(history)} epochs in {time.time() - t0:.0f} s, final loss "
          f"{last.get('loss', float('nan')):.1f}; run directory: {args.out}")


def _run_and_data(args):
    """The run and the test slices it should be evaluated on (defaults from its config)."""
    from jaxvae.checkpoint import load_run
    from jaxvae.data import datasets, splits

    model, params, cfg = load_run(args.run)
    d = cfg.data or {}
    data = args.data or d.get("path")
    if data is None:
        raise ConfigError(f"{args.run}: the run records no data path; give --data")
    if d.get("source") == "phantom" and args.data is None:
        data = "phantom"
    modality = args.modality or d.get("modality") or "t2"
    folds = args.folds or d.get("folds", 1)
    fold = d.get("fold", 0) if args.fold is None else args.fold
    slices, _ = datasets.load_dataset(data, modality, progress=True)
    _, test = splits.split(slices, folds=folds, fold=fold, seed=d.get("split_seed", cfg.seed))
    if not len(test):
        raise ConfigError(f"{data}: no test slices for folds={folds} fold={fold}")
    return model, params, cfg, test


def cmd_evaluate(args):
    from jaxvae.evaluate import score_dataset, write_results

    _check_outputs(args.out, ["results.json", "results.md"], args.overwrite)
    settings = _settings(args, postprocess=args.postprocess)  # bad flags before slow loading
    model, params, cfg, test = _run_and_data(args)
    results, _ = score_dataset(model, params, test, beta=cfg.beta, settings=settings,
                               progress=True, keep=())  # no maps kept: memory of a batch
    results["run"] = str(args.run)
    md = write_results(results, args.out, overwrite=args.overwrite,
                       title=f"jaxvae evaluate {args.run}")
    print(md)
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")


def cmd_score(args):
    from jaxvae import score
    from jaxvae.checkpoint import load_run

    settings = _settings(args)  # bad flags before slow loading
    _check_outputs(args.out, [], args.overwrite)
    model, params, cfg = load_run(args.run)
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
    from tqdm.auto import tqdm

    written, failed = [], []
    for path in tqdm(inputs, desc="volumes", unit="vol", disable=len(inputs) == 1):
        try:
            written += score.score_volume(model, params, path, args.out, beta=cfg.beta,
                                             mask=args.mask, settings=settings,
                                             overwrite=args.overwrite, png=args.png,
                                             volume_index=args.volume_index)
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
