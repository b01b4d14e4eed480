"""Training throughput of jaxvae: images/s of the jitted train step at batch 64 and 256.

For each batch size: compile time (lower + compile, measured on its own), then after warm-up
the median over repeats of a block of steps, timed up to `block_until_ready`. Two figures:
  step:   batches already on the device (the compiled step alone);
  loop:   what `train` does per step besides the step: gather the rows on the host, build
          the sharded batch, replicate the step key.

    python -m jaxvae.bench.train --out bench_train.json
    python -m jaxvae.bench.train --batch-sizes 64 --steps 5 --repeats 3 --no-augment

Writes JSON (--out) and prints a markdown table.
"""

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from jaxvae.base.io import write_text
from jaxvae.base.table import Table, cell
from jaxvae.runtime import execution, parallel
from jaxvae.training.config import TrainConfig
from jaxvae.training.trainer import init_state, step_keys, train_step_for


def bench_batch(batch_size: int, *, steps: int, repeats: int, warmup: int, augment: bool,
                latent_dim: int, mesh, image_size: int = 64, in_channels: int = 1) -> dict:
    """Time the train step at one batch size.

    Returns:
      dict with batch_size, compile_s, step_ms (median), images_per_s (step alone) and
      images_per_s_loop (with host-side batch assembly, as in `train`).
    """
    cfg = TrainConfig(batch_size=batch_size, latent_dim=latent_dim, augment=augment,
                      image_size=image_size, in_channels=in_channels)
    parallel.check_batch_size(batch_size, mesh)
    step = train_step_for(cfg, mesh)
    params, opt_state = parallel.replicate(init_state(cfg), mesh)
    keys = step_keys(jax.random.key(0), 0, steps)
    rng = np.random.default_rng(0)
    shape = (image_size, image_size) + ((in_channels,) if in_channels > 1 else ())
    images = rng.normal(size=(4 * batch_size, *shape)).astype(np.float32)
    batches = [parallel.shard_batch(images[i * batch_size:(i + 1) * batch_size], mesh)
               for i in range(4)]
    key_arrays = [parallel.replicate(k, mesh) for k in keys]

    t0 = time.perf_counter()
    step.lower(params, opt_state, batches[0], key_arrays[0]).compile()
    compile_s = time.perf_counter() - t0

    def run_step_only(params, opt_state):
        for s in range(steps):
            params, opt_state, _ = step(params, opt_state, batches[s % 4], key_arrays[s])
        return params, opt_state

    def run_loop(params, opt_state):
        # the host work of one training step in `train`, without the checkpoints
        for s in range(steps):
            idx = rng.permutation(images.shape[0])[:batch_size]
            batch = parallel.shard_batch(images[idx], mesh, batch_size)
            params, opt_state, _ = step(params, opt_state, batch, parallel.replicate(keys[s], mesh))
        return params, opt_state

    out = {"batch_size": batch_size, "compile_s": round(compile_s, 3)}
    for name, fn in (("step", run_step_only), ("loop", run_loop)):
        for _ in range(warmup):
            params, opt_state = fn(params, opt_state)
        jax.block_until_ready(params)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            params, opt_state = fn(params, opt_state)
            jax.block_until_ready((params, opt_state))
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        out[f"{name}_ms"] = round(1e3 * med / steps, 2)
        out[f"images_per_s_{name}"] = round(steps * batch_size / med, 1)
        out[f"{name}_block_s"] = [round(t, 4) for t in times]
    return out


def markdown(results: list[dict]) -> str:
    rows = [[r["batch_size"], cell(r["compile_s"], spec=".1f"), cell(r["step_ms"], spec=".1f"),
             cell(r["images_per_s_step"], spec=".0f"), cell(r["images_per_s_loop"], spec=".0f")]
            for r in results]
    return Table(["batch", "compile s", "step ms", "images/s (step)", "images/s (loop)"],
                 rows).markdown(align="rrrrr").rstrip("\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=5, help="timed blocks (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed blocks after compiling")
    ap.add_argument("--latent-dim", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=64, choices=(64, 128))
    ap.add_argument("--in-channels", type=int, default=1)
    ap.add_argument("--no-augment", dest="augment", action="store_false")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    mesh = parallel.make_mesh()
    results = [bench_batch(b, steps=args.steps, repeats=args.repeats, warmup=args.warmup,
                           augment=args.augment, latent_dim=args.latent_dim, mesh=mesh,
                           image_size=args.image_size, in_channels=args.in_channels)
               for b in args.batch_sizes]
    report = {
        "benchmark": "train_step",
        "env": {"jax": jax.__version__, "backend": execution.backend(),
                "devices": [str(d) for d in jax.devices()],
                "device_kind": jax.devices()[0].device_kind,
                "cpu_count": os.cpu_count(), "python": platform.python_version(),
                "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "config": {"latent_dim": args.latent_dim, "image_size": args.image_size,
                   "in_channels": args.in_channels, "augment": args.augment, "steps": args.steps,
                   "repeats": args.repeats, "warmup": args.warmup, "model": "ConvVAE 16-32-64-256"},
        "results": results,
    }
    if args.out:
        write_text(args.out, json.dumps(report, indent=2) + "\n", overwrite=True)
    print(markdown(results))
    return report


if __name__ == "__main__":
    main()
