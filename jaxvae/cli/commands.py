"""What each `jaxvae` verb does, given its parsed arguments (see jaxvae.cli).

Thin: each command checks what can be checked before slow work, calls the library and
prints a summary. Expected failures are JaxvaeErrors (printed by jaxvae.cli as one line).
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxvae.base.errors import ConfigError, JaxvaeError
from jaxvae.base.io import check_out_dir, refuse_existing
from jaxvae.bench import harness
from jaxvae.cli.demo import run_demo
from jaxvae.cli.flags import settings_of
from jaxvae.core.augment import AugmentConfig
from jaxvae.data import datasets, splits
from jaxvae.data.preprocess import PreprocessParams
from jaxvae.data.sequences import check_sequences, parse_modalities
from jaxvae.inference import segment, volumes
from jaxvae.inference.evaluate import score_calibrated, score_dataset
from jaxvae.inference.settings import EvalSettings
from jaxvae.report import outputs, scans
from jaxvae.runtime.parallel import initialize_distributed
from jaxvae.training.checkpoint import check_run_dir, load_run
from jaxvae.training.config import TrainConfig, preprocess_of
from jaxvae.training.on_split import train_on_split
from jaxvae.training.trainer import init_state
from jaxvae.training.validation import convergence, summarize


def cmd_train(args):
    _check_outputs(args.out, [], args.overwrite)  # a file in the way: refuse before loading
    check_run_dir(args.out, resume=args.resume, overwrite=args.overwrite)  # and a used run dir
    if args.split and (args.folds > 1 or args.fold):
        raise ConfigError("give either --split or --folds/--fold, not both")
    # the settings before the data: a bad value is refused before minutes of loading
    preprocess = settings_of(PreprocessParams, args, "preprocess", size=args.image_size)
    augmentation = settings_of(AugmentConfig, args, "augmentation")
    modality = args.modality or "t2"
    n_seq = len(parse_modalities(modality))  # several sequences: the model's channels
    cfg = settings_of(TrainConfig, args, augmentation=augmentation, in_channels=n_seq, data={})
    if args.coordinator:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    slices, desc = datasets.load_dataset(args.data, modality, params=preprocess, progress=True)
    if preprocess != PreprocessParams():  # recorded when not the default (older runs resume)
        desc = {**desc, "preprocess": dataclasses.asdict(preprocess)}
    if isinstance(args.split, dict):  # a config file's split object (a run's config.json)
        split = splits.split_from_dict(args.split, slices.cases, where="--config split")
    elif args.split:
        split = splits.read_split(args.split, slices.cases)
    else:
        split = splits.make_split(slices, folds=args.folds, fold=args.fold, seed=args.seed,
                                  val_fraction=args.val_fraction)
    train_set, val_set, _ = split.slices(slices)
    if not len(train_set):
        raise ConfigError(f"{args.data}: the training cases have no lesion-free slice")
    if args.max_slices and len(train_set) > args.max_slices:
        keep = np.sort(np.random.default_rng(args.seed).choice(len(train_set), args.max_slices,
                                                                replace=False))
        train_set = train_set.subset(keep)
    data = splits.split_description(desc, folds=args.folds, fold=args.fold, seed=args.seed,
                                      split=split, n_train_slices=len(train_set))
    cfg = dataclasses.replace(cfg, data=data)
    t0 = time.time()
    _, history = train_on_split(cfg, train_set, val_set, split, args.out, resume=args.resume,
                                overwrite=args.overwrite)
    sick = set(slices.case_ids[slices.lesion.any(axis=(1, 2))].tolist())
    what = ("the lesion-free slices of " if sick & set(split.train) else "") + \
        f"{len(train_set)} slices of {len(split.train)} cases"
    seg = _fit_segmenter(args.out, val_set) if sick & set(split.val) else ""
    print(f"trained on {what}; {_progress_line(history, cfg)} in {time.time() - t0:.0f} s; "
          f"{len(split.val)} validation, {len(split.test)} test cases; run directory: "
          f"{args.out} (split.json, metrics.jsonl, loss.png{seg})")


def _fit_segmenter(run_dir, val) -> str:
    """Fit the ensemble + threshold on the validation cases with lesions and store it in
    the run (segmenter.json), for `jaxvae score` to write probability maps and masks."""
    if jax.process_index() != 0:
        return ""
    model, params, cfg = load_run(run_dir)  # the best-validation checkpoint, as score uses
    seg = segment.fit(model, params, val, beta=cfg.beta, settings=EvalSettings())
    segment.save(run_dir, seg, overwrite=True)  # the run's own: refitted on resume
    return f", segmenter.json: {seg['name']} at the validation threshold"


def _progress_line(history, cfg) -> str:
    """'N optimiser steps (E epochs, stopped by ...), ..., best val loss X at step S;
    converged: ...' (`validation.convergence`)."""
    if not history:
        return "no epoch trained"
    s = summarize(history)
    line = f"{s['steps']} optimiser steps ({s['epoch']} epochs, stopped by {s['stop']})"
    line += f", final loss {history[-1]['loss']:.1f}"
    if s.get("best_val_loss") is not None:
        line += f", best val loss {s['best_val_loss']:.1f} at step {s['best_step']}"
    return f"{line}; {convergence(history, cfg)}"


def _same_data(a, b) -> bool:
    if "phantom" in (str(a), str(b)):
        return str(a) == str(b)
    return Path(a).resolve() == Path(b).resolve()


def _run_and_data(args, with_val=True):
    """The run, its test slices and its validation slices (see `cmd_evaluate`; with_val
    False: no validation slices are loaded)."""
    model, params, cfg, info = load_run(args.run, with_info=True)  # the best-val checkpoint
    d = cfg.data_info
    preprocess = preprocess_of(cfg)
    own = d.location
    modality = args.modality or d.modality or "t2"
    split = d.split
    check_sequences(d.modality, args.modality)  # a multi-sequence run: same channels
    if own is None and args.data is None:
        raise ConfigError(f"{args.run}: the run records no data path; give --data")
    val = slices = None
    if with_val and own is not None and split is not None and split.val:
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
            datasets.check_modality(case.image_path, d.modality, args.modality)
        test, _ = datasets.load_dataset(args.data, modality, params=preprocess, progress=True)
    return model, params, cfg, test, val, info


def _calibration(args, test, modality, preprocess):
    """(folds, calibration SliceSet or None) of the --calibration* flags; None: none given."""
    ids = [c.strip() for c in (args.calibration_ids or "").split(",") if c.strip()]
    if args.calibration < 0:
        raise ConfigError("--calibration must be >= 0")
    if not (args.calibration or ids or args.calibration_data):
        return None, None
    if args.calibration_data is None or _same_data(args.calibration_data, args.data or ""):
        return splits.calibration_folds(test.cases, n=args.calibration, ids=ids,
                                        seed=args.calibration_seed), None
    other, _ = datasets.load_dataset(args.calibration_data, modality, params=preprocess,
                                     progress=True)
    if args.calibration or ids:  # some of its cases: the first fold's calibration
        other = other.for_cases(splits.calibration_folds(
            other.cases, n=args.calibration, ids=ids, seed=args.calibration_seed)[0][1])
    return [(test.cases, other.cases)], other


def cmd_evaluate(args):
    _check_outputs(args.out, outputs.OUTPUT_NAMES, args.overwrite)
    settings = settings_of(EvalSettings, args)  # bad flags before slow loading
    calibrating = bool(args.calibration or args.calibration_ids or args.calibration_data)
    model, params, cfg, test, val, info = _run_and_data(args, with_val=not calibrating)
    if args.untrained:  # the control: the same seed's initial network, scored alike
        params = jax.device_get(init_state(cfg)[0])
        info = {"untrained": True, "seed": cfg.seed}
    modality = args.modality or cfg.data_info.modality or "t2"
    folds, cal_slices = _calibration(args, test, modality, preprocess_of(cfg))
    shown = outputs.overlay_slices(test)
    outputs.check_outputs(args.out, test, shown, overwrite=args.overwrite)
    keep = [i for i, _ in shown]  # maps of the overlays only
    if folds is None:
        results, kept = score_dataset(model, params, test, val=val, beta=cfg.beta,
                                      settings=settings, progress=True, keep=keep)
    else:
        results, kept = score_calibrated(model, params, test, folds, cal_slices=cal_slices,
                                         beta=cfg.beta, settings=settings, progress=True,
                                         keep=keep)
    results["run"] = {"path": str(args.run), "checkpoint": info}
    seg = segment.from_calibration(results["calibration"], settings)
    if seg is not None and folds is None and not args.untrained \
            and segment.load(args.run) is None:  # fitted on the run's val cases
        segment.save(args.run, seg)  # a run trained before segmenters: score can now segment
        print(f"stored {args.run / segment.SEGMENTER_FILE} ({seg['name']})")
    md = outputs.write_evaluation(args.out, results, test, kept, shown, run_dir=args.run,
                                  title=f"jaxvae evaluate {args.run}"
                                  + (" (untrained control)" if args.untrained else ""),
                                  overwrite=args.overwrite)
    print(md)
    print(f"wrote {args.out / 'report.html'}, results.json, results.md, per_case.csv, "
          f"curves.png and {len(shown)} overlays")


def cmd_score(args):
    settings = settings_of(EvalSettings, args)  # bad flags before slow loading
    _check_outputs(args.out, [], args.overwrite)
    model, params, cfg = load_run(args.run)
    trained = cfg.data_info.modality
    inputs = volumes.find_inputs(args.input, modality=args.modality, trained=trained)
    if args.mask and len(inputs) > 1:
        raise ConfigError("--mask applies to a single --input volume, not a folder")
    seg = segment.load(args.run) if args.segment else None
    if seg is not None:
        seg.check_settings(settings)  # maps as the segmenter was fitted on, before any work

    written, failed = [], []
    for path in tqdm(inputs, desc="volumes", unit="vol", disable=len(inputs) == 1):
        try:
            written += scans.score_volume(model, params, path, args.out, beta=cfg.beta,
                                          mask=args.mask, settings=settings,
                                          overwrite=args.overwrite, png=args.png,
                                          volume_index=args.volume_index,
                                          preprocess=preprocess_of(cfg), segmenter=seg,
                                          modality=args.modality or trained)
        except JaxvaeError as e:
            if args.strict or len(inputs) == 1:
                raise
            failed.append(path)
            # tqdm.write: on its own line, not glued to the progress bar
            tqdm.write(f"jaxvae score: skipped: {one_line(e)}", file=sys.stderr)
    print(f"wrote {len(written)} file(s) for {len(inputs) - len(failed)} volume(s) to {args.out}"
          + (f" (with {seg.name}'s probability map and mask at the validation threshold "
             f"{seg.threshold:.3g})" if seg else "") + (f"; {len(failed)} skipped" if failed
                                                         else ""))
    if failed:
        return 1
    return 0


def _check_outputs(out_dir, names, overwrite):
    """Refuse up front (before minutes of work) when outputs exist and --overwrite is off,
    or when the output folder cannot be created (a file is in the way)."""
    check_out_dir(out_dir)
    refuse_existing([Path(out_dir) / n for n in names], overwrite=overwrite)


def cmd_demo(args):
    run_demo(args.out, quick=args.quick, overwrite=args.overwrite)


def cmd_bench(args):
    frameworks = ("jax",) if args.no_torch else ("jax", "torch")
    result = harness.run(batch_sizes=tuple(args.batch_size), frameworks=frameworks,
                         repeats=args.repeats, out=args.out, image_size=args.image_size,
                         in_channels=args.in_channels)
    if args.out is None:
        print(json.dumps(result, indent=1))


def one_line(e: BaseException) -> str:
    """The first line of an error message (some carry an affine matrix below it)."""
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


COMMANDS = {"train": cmd_train, "score": cmd_score, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "bench": cmd_bench}
