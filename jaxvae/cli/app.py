"""Command line: `jaxvae train|score|evaluate|demo|bench`, flags or a config file.

Parsing is jsonargparse (anomalib's choice): an argparse-compatible parser whose every flag
is also a key of a YAML/JSON `--config FILE` (the flag's name with underscores:
`latent_dim: 32`; groups nested: `augmentation: {rotation: 0.2}`), flags given after it
override the file, and `--print-config` shows the resolved configuration. We chose it over
tyro because it keeps the argparse flags (and their error messages) that scripts and tests
already use, and reads config files with nested groups without new dataclasses. A run's
saved config.json is also a valid `--config` of `train`: its data description becomes the
`data`, `modality`, `split` and `preprocess` keys (`run_config_keys`).

The settings flags are generated from their dataclasses (jaxvae.cli.flags): TrainConfig,
AugmentConfig and PreprocessParams for `train`, EvalSettings for `score` and `evaluate`; the
dataclasses are built right after parsing, so an out-of-range value is refused before any
work. Every expected failure is a JaxvaeError (or an OSError) printed as one line on stderr
with exit code 2 (naming the config file and key, or the flag, of a bad value); malformed
flags (an unknown flag, a value of the wrong type) exit 2 with the usage line, as argparse
does; `--debug` shows the traceback.
"""

import argparse
import dataclasses
import difflib
import json
import re
import sys
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from jsonargparse.typing import PositiveInt

from jaxvae.base.errors import ConfigError, JaxvaeError
from jaxvae.cli.commands import COMMANDS, one_line
from jaxvae.cli.flags import add_flags, settings_of
from jaxvae.core.augment import AugmentConfig
from jaxvae.data.preprocess import PreprocessParams
from jaxvae.inference.settings import EvalSettings
from jaxvae.training.config import CLI_SCHEDULE, TrainConfig

EPILOG = {
    "train": "example: jaxvae train --data data/brats2018_flair --modality flair "
             "--folds 2 --fold 0 --latent-dim 64 --out runs/l64-f0 (trains until the "
             "validation loss plateaus); or "
             "jaxvae train --config train.yaml --out runs/x (keys: the flags' names)",
    "score": "example: jaxvae score --run runs/l64-f0 --input case_flair.nii.gz "
             "--predictors rec_grad,kl_grad --out maps/ --png",
    "evaluate": "example: jaxvae evaluate --run runs/l64-f0 --out results/l64-f0 (the run's "
                "own test cases), or --data data/brats2021_t2 (every case of another "
                "dataset); thresholds and the ensemble come from the run's validation cases",
    "demo": "example: jaxvae demo --out demo_out --quick",
    "bench": "example: jaxvae bench --batch-size 64 256 --out bench.json",
}
CONFIG_VERBS = ("train", "score", "evaluate")


TRAIN_HELP = {
    "latent_dim": "latent size l (the paper: 32, 64, 256)",
    "beta": "KL weight of the beta-VAE loss",
    "epochs": "cap on epochs (0: none; the plateau rule or --max-steps ends the run)",
    "batch_size": "global batch size (a multiple of the device count)",
    "lr": "Adam learning rate",
    "seed": "seeds initialisation, data order, augmentation, z samples and the split",
    "image_size": "slices are resized to this size (64 or 128); the run remembers it",
    "channels": "encoder channels of the ConvVAE",
    "patience": "the plateau rule: stop once this many optimiser steps have passed since the "
                "best validation loss (0: off)",
    "max_steps": "step budget: stop after this many optimiser steps (0: no cap, then give "
                 "--epochs)",
    "checkpoint_every": "in epochs",
    "keep_checkpoints": "most recent checkpoints kept (the best-validation one besides)",
    "augment": "on-the-fly augmentation",
}
TRAIN_FLAGS = ("latent_dim", "beta", "epochs", "batch_size", "lr", "seed", "image_size",
               "channels", "patience", "max_steps", "checkpoint_every", "keep_checkpoints",
               "augment")
EVAL_HELP = {
    "predictors": "comma-separated subset of rec_error,rec_grad,kl_grad,elbo_grad,combi,"
                  "proj_rec_error (the paper's, the default) and the one-signed "
                  "rec_pos,rec_grad_pos (hyperintense lesions: FLAIR, T2) and "
                  "rec_neg,rec_grad_neg (hypointense: tumours in T1)",
    "batch_size": "slices per compiled call",
    "smooth_sigma": "Gaussian sigma (pixels) of the gradient maps; 0 disables",
    "combi_group": "slices per min-max group of combi's |kl_grad| (64: the reference code's "
                   "loader batches); 0 = each whole batch",
    "proj_steps": "Adam steps of Proj-Rec-Error",
    "proj_lam": "L1 weight of the projection",
    "proj_lr": "Adam learning rate of the projection",
    "n_samples": "Monte-Carlo z samples (0: z = mu)",
    "seed": "key of the Monte-Carlo z samples",
    "val_quantile": "with healthy validation cases: the threshold is this quantile of their "
                    "brain pixels' scores",
    "n_boot": "bootstrap resamples of the test cases for 95 %% intervals (0: none)",
    "postprocess": "add rows with brain-mask erosion + median filter (Baur et al. 2021)",
    "ensemble": "fit the ensembles on the validation cases",
    "tune_sigma": "with lesion calibration cases: also each map smoothed at the sigma (0-3) of "
                  "best calibration AUPRC, as the nulls choose theirs (rows <map>_tuned)",
    "ensemble_intensity": "also the ensembles with the image intensity as a feature",
}
MAP_FLAGS = ("predictors", "batch_size", "smooth_sigma", "combi_group", "proj_steps",
             "proj_lam", "proj_lr", "n_samples", "seed")
SCORING_FLAGS = ("val_quantile", "n_boot", "postprocess", "ensemble", "tune_sigma",
                 "ensemble_intensity")
# the command line reads the predictors as one string; its default: the dataclass's
_PREDICTORS = {"types": {"predictors": str},
               "defaults": {"predictors": ",".join(EvalSettings().predictors)}}


def _eval_args(p):
    add_flags(p, EvalSettings, MAP_FLAGS, help=EVAL_HELP, **_PREDICTORS)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _train_args(p):
    p.add_argument("--data", type=str | dict | None, default=None,
                   help="BraTS-layout folder (lesion-free slices of the training cases), folder "
                        "of healthy volumes, or 'phantom' (required)")
    p.add_argument("--out", type=Path, default=None, help="run directory (required)")
    p.add_argument("--modality", default=None, help="default: t2")
    add_flags(p, TrainConfig, TRAIN_FLAGS, help=TRAIN_HELP, defaults=CLI_SCHEDULE)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--folds", type=PositiveInt, default=1,
                   help="K-fold cross-validation by case (1: healthy cases train, or, without "
                        "any, the lesion-free slices of every case)")
    p.add_argument("--fold", type=int, default=0, help="which fold is held out for testing")
    p.add_argument("--split", type=str | dict | None, default=None,
                   help='split.json {"train": [...], "val": [...], "test": [...]} of case IDs '
                        "(instead of --folds); in a config file also the object itself")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the training cases held out for validation (at least one)")
    p.add_argument("--max-slices", type=PositiveInt | None, default=None,
                   help="cap the training set (a seeded random subset)")
    add_flags(p, AugmentConfig, [f.name for f in dataclasses.fields(AugmentConfig)], help={},
              group="augmentation")
    add_flags(p, PreprocessParams, [f.name for f in dataclasses.fields(PreprocessParams)
                                    if f.name != "size"], help={}, group="preprocess")
    p.add_argument("--crop-to-brain", dest="preprocess.crop", action="store_true",
                   help="resize the brain's bounding box, not the whole slice (Zimmerer et "
                        "al.'s code); the run remembers it for evaluate and score")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run")
    p.add_argument("--coordinator", default=None, help="multi-process: host:port of process 0")
    p.add_argument("--num-processes", type=PositiveInt, default=1)
    p.add_argument("--process-id", type=int, default=0)


def _score_args(p):
    p.add_argument("--run", type=Path, default=None, help="run directory (required)")
    p.add_argument("--input", type=Path, default=None,
                   help="a .nii/.nii.gz volume or a folder (required)")
    p.add_argument("--mask", type=Path, default=None, help="brain mask of a single input")
    p.add_argument("--out", type=Path, default=None, help="output folder (required)")
    p.add_argument("--png", action="store_true", help="also write an overview figure")
    p.add_argument("--strict", action="store_true", help="stop at the first bad volume")
    p.add_argument("--volume-index", type=int | None, default=None, help="volume of a 4D input")
    p.add_argument("--modality", default=None,
                   help="score an input whose name says another sequence than the run's")
    p.add_argument("--segment", type=bool, default=True,
                   help="with the run's segmenter.json: also <stem>_prob and <stem>_mask")
    _eval_args(p)


def _evaluate_args(p):
    p.add_argument("--run", type=Path, default=None, help="run directory (required)")
    p.add_argument("--out", type=Path, default=None, help="output folder (required)")
    p.add_argument("--data", default=None,
                   help="default: the run's own data (its test cases); another dataset: every "
                        "case of it is scored")
    p.add_argument("--modality", default=None, help="default: the run's modality")
    add_flags(p, EvalSettings, SCORING_FLAGS, help=EVAL_HELP)
    p.add_argument("--calibration", type=int, default=0,
                   help="N lesion cases of the evaluated data per fold set aside to fit the "
                        "thresholds, ensembles and nulls (a healthy-cohort run has no lesion "
                        "to calibrate on); folds rotate so every case is tested once, never "
                        "in its own fold's calibration; results pooled over folds (0: the "
                        "run's validation cases)")
    p.add_argument("--calibration-ids", default=None,
                   help="comma-separated calibration case IDs instead of --calibration N")
    p.add_argument("--calibration-data", default=None,
                   help="take the calibration cases from this dataset instead (all of its "
                        "cases, or --calibration N / --calibration-ids of them)")
    p.add_argument("--calibration-seed", type=int, default=0,
                   help="seed of the calibration folds")
    p.add_argument("--untrained", action="store_true",
                   help="score the run's initial network (its seed, no training): the "
                        "untrained control")
    _eval_args(p)


# flags a verb cannot run without; not argparse-required, so that a config file may hold them
REQUIRED = {"train": ("data", "out"), "score": ("run", "input", "out"),
            "evaluate": ("run", "out")}


def parser() -> ArgumentParser:
    ap = ArgumentParser(prog="jaxvae", description=__doc__.splitlines()[0],
                        exit_on_error=False, env_prefix=False)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subcommands(dest="verb", required=True)
    build = {"train": (_train_args, "train a VAE / beta-VAE on healthy slices"),
             "score": (_score_args, "write anomaly maps of NIfTI volumes on their own grid"),
             "evaluate": (_evaluate_args, "score a test set: results, curves, overlays, "
                                          "report.html"),
             "demo": (None, "the whole pipeline on the embedded phantom data"),
             "bench": (None, "throughput of predictors, projection and training (JSON)")}
    for name, (add, help_) in build.items():
        p = ArgumentParser(description=help_, epilog=EPILOG[name], exit_on_error=False,
                           env_prefix=False, print_config="--print-config")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        if name in CONFIG_VERBS:
            p.add_argument("--config", action="config",
                           help="YAML or JSON file of these options (keys: the flags' names "
                                "with underscores); later flags override it")
            add(p)
        elif name == "demo":
            p.add_argument("--out", type=Path, default=Path("demo_out"))
            p.add_argument("--quick", action="store_true",
                           help="a smaller, faster run (about a minute)")
            p.add_argument("--overwrite", action="store_true")
        else:
            p.add_argument("--batch-size", type=PositiveInt, nargs="+", default=[64, 256])
            p.add_argument("--out", type=Path, default=None)
            p.add_argument("--repeats", type=PositiveInt, default=5)
            p.add_argument("--no-torch", action="store_true", help="JAX only")
            p.add_argument("--image-size", type=int, default=64, help="64 or 128")
            p.add_argument("--in-channels", type=PositiveInt, default=1,
                           help="image channels (sequences)")
        sub.add_subcommand(name, p, help=help_)
    return ap


def _keys(p: ArgumentParser) -> set[str]:
    """Every key a config file of parser `p` may hold (groups as 'group.field')."""
    return {a.dest for a in p._actions if a.dest not in ("help", "config", "print_config")}


def run_config_keys(d: dict) -> dict:
    """A run's config.json as `train` keys: its data description -> data, modality, split,
    preprocess (the descriptive rest, e.g. n_train_slices, is dropped)."""
    data = d.get("data")
    if not isinstance(data, dict):
        return d
    out = {k: v for k, v in d.items() if k not in ("data", "in_channels")}
    out["data"] = "phantom" if data.get("source") == "phantom" else data.get("path")
    for key in ("modality", "split", "preprocess"):
        if data.get(key) is not None:
            out[key] = data[key]
    out.get("preprocess", {}).pop("size", None)
    return out


def _read_config(path: str, keys: set[str]) -> dict:
    """A config file as a flat-checked dict; ConfigError naming the file and the key."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        d = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} "
                          f"({one_line(e)})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: a config file holds a mapping of option names to values, "
                          f"got {type(d).__name__}")
    d = run_config_keys(d)
    for k, v in d.items():
        for name in [k] if k in keys or not isinstance(v, dict) else [f"{k}.{s}" for s in v]:
            if name not in keys:
                close = difflib.get_close_matches(name, sorted(keys), n=1)
                raise ConfigError(f"{p}: unknown key {name!r}"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))
    return d


def _with_configs(ap: ArgumentParser, argv: list[str]) -> tuple[list[str], dict]:
    """argv with each `--config FILE` checked and replaced by its (translated) content."""
    verb = next((a for a in argv if a in COMMANDS), None)
    if verb not in CONFIG_VERBS:
        return argv, {}
    keys = _keys(ap._subcommands_action._name_parser_map[verb])
    out, files = [], {}
    it = iter(argv)
    for a in it:
        if a == "--config" or a.startswith("--config="):
            path = a.partition("=")[2] or next(it, None)
            if path is None:
                raise ConfigError("--config needs a file")
            d = _read_config(path, keys)
            files[path] = d
            out += ["--config", yaml.safe_dump(d, sort_keys=False)]
        else:
            out.append(a)
    return out, files


def _parse_error(ap, argv, files, e):
    """An argparse error: in a config file's key -> ConfigError naming both; else usage."""
    msg = " ".join(str(e).split())  # jsonargparse's messages span lines
    for path, d in files.items():
        for key in d:
            if f'"{key}' in msg or f"'{key}" in msg:
                raise ConfigError(f"{path}: key {key!r}: {msg}") from None
    verb = next((a for a in argv if a in COMMANDS), None)
    p = ap._subcommands_action._name_parser_map[verb] if verb else ap
    p.print_usage(sys.stderr)
    print(f"{p.prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse(argv=None) -> tuple[str, argparse.Namespace, bool]:
    """(verb, its arguments, debug) of a command line; SystemExit(2) on malformed flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    argv, files = _with_configs(ap, argv)
    try:
        ns = ap.parse_args(argv)
    except argparse.ArgumentError as e:
        _parse_error(ap, argv, files, e)
    verb = ns.verb
    args = ns[verb]
    missing = [k for k in REQUIRED.get(verb, ()) if args.get(k) is None]
    if missing:
        raise ConfigError(f"missing --{missing[0].replace('_', '-')} (a flag or a "
                          f"config-file key {missing[0]!r})")
    _check_settings(verb, args, files, ap._subcommands_action._name_parser_map[verb])
    return verb, args, bool(ns.debug or args.get("debug"))


def _check_settings(verb, args, files, verb_parser):
    """Every settings dataclass of the verb built once from its flags, so that a bad value
    is refused before any work, naming the config file and key that gave it, or the flag."""
    group = None
    try:
        if verb == "train":
            group = "augmentation"
            aug = settings_of(AugmentConfig, args, group)
            group = "preprocess"
            settings_of(PreprocessParams, args, group, size=args.image_size)
            group = None
            settings_of(TrainConfig, args, augmentation=aug, data={})
        elif verb in ("score", "evaluate"):
            settings_of(EvalSettings, args)
    except ConfigError as e:
        msg = str(e)
        for path, d in files.items():
            keys = [*d, *(f"{k}.{s}" for k, v in d.items() if isinstance(v, dict) for s in v)]
            for key in sorted(keys, key=len, reverse=True):
                if re.search(rf"\b{re.escape(key.rpartition('.')[2])}\b", msg):
                    raise ConfigError(f"{path}: key {key!r}: {msg}") from None
        named = sorted({a.option_strings[0] for a in verb_parser._actions
                        if a.option_strings and a.dest.rpartition(".")[0] == (group or "")
                        and re.search(rf"\b{re.escape(a.dest.rpartition('.')[2])}\b", msg)})
        if named and not any(n in msg for n in named):
            raise ConfigError(f"{msg} ({', '.join(named)})") from None
        raise


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if a in COMMANDS), "")
    debug = "--debug" in argv
    try:
        verb, args, debug = parse(argv)
        return COMMANDS[verb](args) or 0
    except (JaxvaeError, OSError) as e:
        if debug:
            raise
        print(f"jaxvae {verb}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jaxvae {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
