"""The paper's protocol on a real healthy cohort: train on IXI T1, localise tumours in BraTS T1.

For each seed: `jaxvae train` on ../shared/data/ixi_t1 (T1, the CLI's plateau rule and step
budget, or the budget given), then `jaxvae evaluate` of the trained network and of the same
seed's untrained network (`--untrained`, the control) on
- the T1 of the ten BraTS2018 cases, with calibration cases of that dataset rotating
  (`--calibration N`: every case tested once, never in its own fold's calibration);
- the T1 of BraTS2021_00006, calibrated on the ten BraTS2018 cases' T1
  (`--calibration-data`).
Every evaluation carries the fair nulls chosen on the calibration cases (the intensity in
both polarities and at sigma 0-3, the intensity-only regression) and the smoothed Rec-Error,
every map restricted to the brain alike. The pre-declared primary comparison is best_map
(the model row of best calibration AUPRC) against best_null (the null of best calibration
AUPRC), paired over the bootstrap resamples of the test cases.

    python experiments/healthy_cohort.py --seeds 0 1 2 --latent-dim 64
    python experiments/healthy_cohort.py --seeds 0 --latent-dim 32      # a sweep point

Writes a page per setting, committed: docs/results/healthy_cohort.md (l = 64, beta = 1) or
docs/results/healthy_cohort_l{L}[_b{beta}].md; and results/healthy_cohort/ (the runs'
evaluations, not committed). A run that has already finished (its metrics.jsonl ends with a
"stop") is evaluated as it is; one that has not is trained (or resumed) first.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jaxvae.base.table import cell

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path("../shared/data")  # as the commands are run: from the repository root
MAPS = ("rec_error", "rec_error_smooth", "rec_error_tuned", "rec_neg", "rec_neg_tuned",
        "rec_grad", "rec_grad_tuned", "rec_grad_neg", "rec_grad_neg_tuned", "kl_grad",
        "kl_grad_tuned", "elbo_grad", "elbo_grad_tuned", "combi", "proj_rec_error",
        "ensemble", "ensemble+intensity", "ensemble+null", "ensemble_dark+null")
ROWS = (*MAPS, "intensity", "null_intensity", "null_lr", "best_null", "best_map")
TESTS = {"brats2018_t1": ["--data", str(SHARED / "brats2018_flair")],
         "brats2021_t1": ["--data", str(SHARED / "brats2021_t2"), "--calibration-data",
                          str(SHARED / "brats2018_flair")]}


def _run(cmd: list[str]) -> float:
    t0 = time.time()
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    return time.time() - t0


def _diff(r, key, metric):
    vs = r.get(key, {}).get(metric)
    if not vs or any(np.isnan(c) for c in vs["ci"]):
        return "n/a (one case)" if vs else "n/a"
    return f"[{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}] ({100 * vs['frac_above']:.0f} %)"


def _case_diff(pairs, metric="auprc", n_boot=1000, seed=0):
    """Mean over cases of a per-case `metric` difference, each case's difference averaged
    over the pairs (e.g. seeds), and its case-bootstrap 95 % interval.

    Args:
      pairs: [(per_case rows A, per_case rows B)]: results.json "per_case" entries of two
        rows scored on the same cases (A minus B).
    """
    if not pairs or not all(a and b for a, b in pairs):
        return None
    cases = sorted(set.intersection(*[set(a) & set(b) for a, b in pairs]))
    d = np.array([np.mean([a[c][metric] - b[c][metric] for a, b in pairs]) for c in cases])
    d = d[np.isfinite(d)]
    if d.size < 2:
        return None
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, (n_boot, d.size))].mean(1)
    return float(d.mean()), [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]


def _cell(d):
    return "n/a" if d is None else f"{d[0]:+.3f} [{d[1][0]:+.3f}, {d[1][1]:+.3f}]"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--latent-dim", type=int, default=64)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=None, help="default: the CLI's budget")
    ap.add_argument("--calibration", type=int, default=3, help="calibration cases per fold")
    ap.add_argument("--predictors", default="rec_error,rec_grad,kl_grad,elbo_grad,combi,"
                    "proj_rec_error,rec_neg,rec_grad_neg")  # T1 tumours are dark: the _neg maps
    ap.add_argument("--runs", type=Path, default=ROOT / "runs")
    ap.add_argument("--results", type=Path, default=ROOT / "results/healthy_cohort")
    ap.add_argument("--page", type=Path, default=None)
    args = ap.parse_args(argv)
    setting = f"l{args.latent_dim}" + (f"-b{args.beta:g}" if args.beta != 1 else "")
    if args.page is None:
        args.page = ROOT / "docs/results" / ("healthy_cohort.md" if setting == "l64" else
                                             f"healthy_cohort_{setting.replace('-', '_')}.md")
    jaxvae = [sys.executable, "-m", "jaxvae.cli"]
    t_start = time.time()
    out, walls = {}, {}
    for seed in args.seeds:
        run = args.runs / f"ixi-{setting}-s{seed}"
        train = [*jaxvae, "train", "--data", str(SHARED / "ixi_t1"), "--modality", "t1",
                 "--latent-dim", str(args.latent_dim), "--beta", str(args.beta),
                 "--seed", str(seed), "--out", str(run)]
        if args.max_steps:
            train += ["--max-steps", str(args.max_steps)]
        metrics = run / "metrics.jsonl"
        done = metrics.is_file() and '"stop"' in (metrics.read_text().splitlines() or [""])[-1]
        if not done:  # a finished run is used as it is (its table row says how it ended)
            walls[f"train s{seed}"] = _run(train + (["--resume"] if run.exists() else []))
        for test, flags in TESTS.items():
            for control in (False, True):
                name = f"{test}-s{seed}" + ("-untrained" if control else "")
                dest = args.results / (f"{test}-{run.name}" + ("-untrained" if control else ""))
                if not (dest / "results.json").is_file():
                    walls[name] = _run([*jaxvae, "evaluate", "--run", str(run), *flags,
                                        "--modality", "t1", "--calibration",
                                        str(args.calibration), "--predictors",
                                        args.predictors, "--out", str(dest), "--overwrite",
                                        *(["--untrained"] if control else [])])
                out[name] = json.loads((dest / "results.json").read_text())
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        out[f"train-s{seed}"] = {"steps": lines[-1]["step"], "stop": lines[-1].get("stop"),
                                 "best": min((h["val_loss"], h["step"]) for h in lines),
                                 "seconds": sum(h["seconds"] for h in lines)}
    write_page(args, out, walls, time.time() - t_start)


def write_page(args, out, walls, wall):
    seeds = args.seeds
    md = [f"# Healthy cohort: IXI T1 -> BraTS T1 (l = {args.latent_dim}, beta = {args.beta:g})",
          "", f"Written by `python experiments/healthy_cohort.py --seeds "
          f"{' '.join(map(str, seeds))}" + (f" --max-steps {args.max_steps}" if args.max_steps
                                            else "")
          + f" --latent-dim {args.latent_dim}" + (f" --beta {args.beta:g}" if args.beta != 1
                                                 else "")
          + f"` on {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()} CPU ({platform.node()}), {wall / 60:.0f} min in all.", "",
          "Train: 148 healthy IXI subjects (T1; 17 more validate), 64x64 slices. Test: the T1 "
          "of the ten BraTS2018 cases, thresholds / ensembles / nulls fitted on "
          f"{args.calibration} calibration cases of them per fold (folds rotate: every case "
          "tested once, never in its own fold's calibration), and BraTS2021_00006's T1 "
          "calibrated on the ten BraTS2018 cases. Intervals: 95 % case bootstrap (1000 "
          "resamples); every map restricted to the brain.", "", "## Training", "",
          "| seed | steps | stopped by | best val loss (step) | train s |", "|---|---|---|---|---|"]
    for s in seeds:
        t = out[f"train-s{s}"]
        md.append(f"| {s} | {t['steps']} | {t['stop']} | {t['best'][0]:.2f} ({t['best'][1]}) | "
                  f"{t['seconds']:.0f} |")
    for test in TESTS:
        md += ["", f"## {test}", "", "AUPRC [95 % interval] per seed, trained (T) and untrained "
               "control (U); mean over seeds:", "",
               "| map | " + " | ".join(f"T s{s} | U s{s}" for s in seeds) + " | T mean | U mean |",
               "|---" * (2 * len(seeds) + 3) + "|"]
        for row in ROWS:
            cells, tm, um = [], [], []
            for s in seeds:
                for ctl, acc in (("", tm), ("-untrained", um)):
                    r = out[f"{test}-s{s}{ctl}"]["predictors"].get(row, {})
                    cells.append(cell(r.get("auprc"), r.get("ci", {}).get("auprc")))
                    acc.append(r.get("auprc", np.nan))
            md.append(f"| {row} | " + " | ".join(cells)
                      + f" | {np.nanmean(tm):.3f} | {np.nanmean(um):.3f} |")
        md += ["", "Primary comparison: best_map minus best_null (paired bootstrap over the "
               "test cases; share of resamples above zero), and the rows chosen per fold:", "",
               "| seed | net | AUPRC diff | AUPRC 95 % | Dice (cal. thr.) diff | Dice 95 % | "
               "chosen (best_map / best_null) |", "|---|---|---|---|---|---|---|"]
        for s in seeds:
            for ctl in ("", "-untrained"):
                res = out[f"{test}-s{s}{ctl}"]
                bm, bn = res["predictors"]["best_map"], res["predictors"]["best_null"]
                chosen = "; ".join(f"{c['best_map']} / {c['best_null']}"
                                   for c in res["calibration"]["folds"])
                md.append(f"| {s} | {'untrained' if ctl else 'trained'} | "
                          f"{bm['auprc'] - bn['auprc']:+.3f} | {_diff(bm, 'vs_null', 'auprc')} | "
                          f"{bm['dice_val'] - bn['dice_val']:+.3f} | "
                          f"{_diff(bm, 'vs_null', 'dice_val')} | {chosen} |")
        md += ["", "Over the seeds: per-case best_map minus best_null, each case's difference "
               "averaged over the seeds, mean over cases [case-bootstrap 95 %]:", "",
               "| net | AUPRC | Dice (cal. thr.) |", "|---|---|---|"]
        for ctl in ("", "-untrained"):
            pairs = [(out[f"{test}-s{s}{ctl}"]["per_case"]["best_map"],
                      out[f"{test}-s{s}{ctl}"]["per_case"]["best_null"]) for s in seeds]
            md.append(f"| {'untrained' if ctl else 'trained'} | {_cell(_case_diff(pairs))} | "
                      f"{_cell(_case_diff(pairs, 'dice_val'))} |")
        md += ["", "Trained minus untrained, per map: mean over cases of the per-case AUPRC "
               "difference [case-bootstrap 95 %], per seed:", "",
               "| map | " + " | ".join(f"s{s}" for s in seeds) + " |", "|---" * (len(seeds) + 1)
               + "|"]
        for row in MAPS:
            cells = [_cell(_case_diff([(out[f"{test}-s{s}"]["per_case"].get(row),
                                        out[f"{test}-s{s}-untrained"]["per_case"].get(row))]))
                     for s in seeds]
            md.append(f"| {row} | " + " | ".join(cells) + " |")
    md += ["", "Wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()), ""]
    args.page.parent.mkdir(parents=True, exist_ok=True)
    args.page.write_text("\n".join(md))
    print(args.page)


if __name__ == "__main__":
    main()
