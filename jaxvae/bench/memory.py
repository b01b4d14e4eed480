"""Peak memory of `jaxvae evaluate` on phantom test sets of two sizes: does it grow with cases?

Usage (from the repository root):
  python -m jaxvae.bench.memory [--sizes 20 200] [--work DIR] [--out memory.json]

Writes phantom datasets (jaxvae.data.phantom, BraTS layout, t2 only) of each size with
`--healthy` healthy cases (the rest have lesions: the test set, with one fold), trains one
tiny run once on the healthy slices of the smallest, primes the slice cache of every size,
then runs `jaxvae evaluate --run R --data D` with the same settings for each size in a fresh
child process and reads its peak resident set size (ru_maxrss of the finished child, via a
small wrapper process per size, so no other child is counted). The same is measured for a
child that only loads and splits the data (the SliceSet, which every caller holds anyway),
so the scorer's own share can be told apart. The JSON (peaks in MB, the ratio of the largest
size's peak to the smallest's, settings, wall times) is written with `jaxvae.base.io.write_text`
and printed. `--src DIR` evaluates with the `jaxvae` package found in DIR (e.g. an export of
an older commit) for a before/after comparison.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from jaxvae.base.io import write_text
from jaxvae.data import datasets, splits
from jaxvae.training.config import TrainConfig
from jaxvae.training.trainer import train

# Runs the command given as its arguments and prints its peak RSS (KiB on Linux) and seconds.
_WRAPPER = ("import json, resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
            "print(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t,\n"
            "                  'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN)"
            ".ru_maxrss}))\n")
_LOAD_ONLY = ("import sys\n"
              "from jaxvae.data import datasets, splits\n"
              "s, _ = datasets.load_dataset(sys.argv[1], 't2')\n"
              "splits.make_split(s).slices(s)\n")


def measure(cmd, env, cwd) -> dict:
    """Peak RSS (MB) and wall seconds of `cmd`, run in a fresh child of a fresh wrapper."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], env=env, cwd=cwd, check=True,
                          capture_output=True, text=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["rc"] != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed with exit status {out['rc']}; "
                           "run it by hand to see why")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_mb": round(out["maxrss_kib"] * scale / 2**20, 1),
            "seconds": round(out["seconds"], 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 200], help="cases per dataset")
    ap.add_argument("--healthy", type=int, default=4, help="healthy cases in each dataset")
    ap.add_argument("--work", type=Path, default=Path("bench-memory"),
                    help="folder for the datasets, the run, the slice cache and the results")
    ap.add_argument("--out", type=Path, default=None, help="default: WORK/memory.json")
    ap.add_argument("--predictors", default="rec_error,kl_grad,rec_grad,combi,proj_rec_error")
    ap.add_argument("--proj-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--postprocess", action="store_true", help="also score the +pp rows")
    ap.add_argument("--src", type=Path, default=None,
                    help="evaluate with the jaxvae package in this folder (e.g. an older export)")
    args = ap.parse_args(argv)
    sizes = sorted(set(args.sizes))
    if sizes[0] <= args.healthy:
        ap.error(f"--sizes must exceed --healthy ({args.healthy}): the rest are the test set")
    work = args.work.resolve()
    out = args.out or work / "memory.json"
    env = {**os.environ, "JAXVAE_CACHE": str(work / "cache")}
    # `python -m` / `-c` put the working folder first on sys.path: the children run in the
    # folder holding the jaxvae package to measure
    src = (args.src or Path(__file__).resolve().parents[2]).resolve()
    if not (src / "jaxvae" / "cli.py").is_file():
        ap.error(f"--src {src}: no jaxvae/cli.py there")
    env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    os.environ["JAXVAE_CACHE"] = env["JAXVAE_CACHE"]  # the slice cache the children will read

    data, generate = {}, {}
    for n in sizes:
        t0 = time.perf_counter()
        data[n] = datasets.phantom_dataset(work / f"phantom-{n}", n_healthy=args.healthy,
                                           n_lesion=n - args.healthy)
        slices, _ = datasets.load_dataset(data[n], "t2")  # writes the slice cache
        split = splits.make_split(slices)
        _, _, test = split.slices(slices)
        generate[n] = {"generate_load_seconds": round(time.perf_counter() - t0, 1),
                       "test_cases": len(test.cases), "test_slices": len(test)}
        if n == sizes[0]:
            train_set, first_split = split.slices(slices)[0], split
        del slices, test

    run = work / "run"
    cfg = TrainConfig(latent_dim=16, batch_size=32, epochs=1, checkpoint_every=1,
                      data={"source": "brats", "path": str(data[sizes[0]]), "modality": "t2",
                            "folds": 1, "fold": 0, "split_seed": 0,
                            "split": first_split.to_dict()})
    t0 = time.perf_counter()
    reused = (run / "config.json").exists()  # a previous invocation's run, same settings
    if not reused:
        train(cfg, train_set.images, run, progress=False)
    train_seconds = time.perf_counter() - t0

    flags = ["--predictors", args.predictors, "--proj-steps", str(args.proj_steps),
             "--batch-size", str(args.batch_size), *(["--postprocess"] * args.postprocess)]
    rows = {}
    for n in sizes:
        cmd = [sys.executable, "-m", "jaxvae.cli", "evaluate", "--run", str(run),
               "--data", str(data[n]), "--out", str(work / f"eval-{n}"), "--overwrite", *flags]
        rows[n] = {**generate[n], "evaluate": measure(cmd, env, src),
                   "load_only": measure([sys.executable, "-c", _LOAD_ONLY, str(data[n])], env,
                                        src)}
        print(f"{n} cases: {rows[n]}", file=sys.stderr)
    small, large = rows[sizes[0]], rows[sizes[-1]]
    result = {
        "bench": "jaxvae.bench.memory",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "src": str(src),
        "command": "python -m jaxvae.bench.memory " + " ".join(argv or sys.argv[1:]),
        "evaluate_flags": flags, "healthy_cases": args.healthy,
        "train": {"latent_dim": cfg.latent_dim, "epochs": cfg.epochs,
                  "slices": int(len(train_set)), "seconds": round(train_seconds, 1),
                  "reused": reused},
        "sizes": {str(n): r for n, r in rows.items()},
        "peak_mb": {str(n): r["evaluate"]["peak_mb"] for n, r in rows.items()},
        "ratio": round(large["evaluate"]["peak_mb"] / small["evaluate"]["peak_mb"], 3),
        "ratio_minus_data": round(
            (large["evaluate"]["peak_mb"] - large["load_only"]["peak_mb"])
            / (small["evaluate"]["peak_mb"] - small["load_only"]["peak_mb"]), 3),
        "note": "ratio: peak RSS of evaluate, largest / smallest size; ratio_minus_data: the "
                "same after subtracting the peak of only loading and splitting the data",
    }
    text = json.dumps(result, indent=1)
    write_text(out, text + "\n", overwrite=True)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
