"""Throughput harness: jaxvae's anomaly maps, projection and train step, JAX vs PyTorch.

For every (op, batch size) each framework is warmed up, then timed `repeats` times with the
frameworks interleaved (so a load change on a shared machine hits both alike); the median
is reported, and JAX compile time separately (ahead-of-time `lower().compile()` for the
naive maps and the train step; for the library's entry points `anomaly_maps` and `project`,
which are called as users call them, the first call minus the median call). Before any
timing the PyTorch reference, loaded with the same weights, must reproduce the JAX maps to
1e-4 of the map scale, so both sides provably do the same work; that check runs on
pre-processed brain slices with an exact-zero background (phantom slices, plus real BraTS
slices where ../shared/data exists), not on the random images that are timed.

    python -m jaxvae.bench.harness --out bench.json --md bench.md

FLOPs are counted analytically from the architecture (useful multiply-adds only: no work
on the zeros of a dilated input), so GFLOP/s of both frameworks and of fused vs naive are
comparable; XLA's own count (`cost_analysis`) of the compiled JAX program is reported next to
it where the program is compiled ahead of time. "% peak" is relative to a large float32
`jnp.dot` measured in the same run.
"""

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import optax

from jaxvae.base.errors import ConfigError
from jaxvae.base.io import write_text
from jaxvae.bench.agreement import agreement_inputs, check_agreement
from jaxvae.bench.report import markdown, ratios
from jaxvae.bench.timing import (
    Case,
    aot,
    block,
    machine_info,
    measure,
    model_macs,
    op_flops,
    peak_matmul_gflops,
)
from jaxvae.core import losses
from jaxvae.core.convs import CONV_IMPLS
from jaxvae.core.model import IMAGE_SIZES, ConvVAE, decode, encode, init_params
from jaxvae.core.predictors import GRADIENT_MAPS, PREDICTORS, smooth
from jaxvae.runtime import batching, execution
from jaxvae.training.trainer import make_train_step

OPS = ("grad_maps_fused", "grad_maps_naive", "rec_error", "rec_grad", "kl_grad", "elbo_grad",
       "combi", "projection", "train_step")
PREDICTOR_OPS = PREDICTORS
FUSED_TORCH_VARIANTS = ("retain_graph", "fwd1_bwd2", "batched_vjp")
ROW_KEYS = ("framework", "op", "batch_size", "images_per_s", "ms_per_batch", "compile_s",
            "gflops", "pct_peak")


# ---- the JAX side ---------------------------------------------------------------------------

def _naive_grad_fns(model, beta, sigma):
    """Three separately jitted jax.grad maps, each with its own forward pass."""
    def rec(params, x):
        mu, _ = encode(model, params, x)
        return jnp.sum(losses.rec_nll(x, decode(model, params, mu)))

    def kl(params, x):
        return jnp.sum(losses.kl_divergence(*encode(model, params, x)))

    def elbo(params, x):
        return rec(params, x) + beta * kl(params, x)

    def as_map(loss):
        # the sum over channels of |grad|, as jaxvae.core.predictors
        return lambda p, x: smooth(jnp.sum(jnp.abs(jax.grad(loss, argnums=1)(p, x)), -1),
                                   sigma)

    return {"rec_grad": as_map(rec), "kl_grad": as_map(kl), "elbo_grad": as_map(elbo)}


def _library_train_step(model, beta, policy):
    """jaxvae.training.trainer.make_train_step(model, lr=1e-4, beta) as the trainer runs it under
    `policy` (its convolution form and micro-batches), without augmentation."""
    return make_train_step(policy.training_model(model), lr=1e-4, beta=float(beta),
                           augment=None, micro_batch=policy.micro_batch)


def make_jax_train_step(model, beta=1.0, lr=1e-4):
    """(init(params) -> opt_state, step(params, opt_state, x, key, i) -> (params, state, loss)).

    The plain optax beta-ELBO Adam step (batch mean, reparameterised z with key
    fold_in(key, i)).
    """
    opt = optax.adam(lr)

    def step(params, opt_state, x, key, i):
        def loss_fn(p):
            recon, aux = model.apply({"params": p}, x, key=jax.random.fold_in(key, i))
            loss, _, _ = losses.beta_elbo(x, recon, aux["mu"], aux["log_sigma"], beta)
            return jnp.mean(loss)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt.init, step


def jax_case(op, model, params, x, *, beta, sigma, steps, lam, lr, policy=None) -> Case:
    """One JAX op on a batch x as its Case, run under the execution `policy` (default:
    execution.current())."""
    policy = execution.current() if policy is None else policy
    if op == "grad_maps_naive":
        stages = [aot(f, params, x) for f in _naive_grad_fns(model, beta, sigma).values()]
        return Case(lambda: block([c(params, x) for c, _, _ in stages]),
                    sum(s[1] for s in stages), sum(s[2] or 0.0 for s in stages) or None)
    if op == "train_step":
        key = jax.random.key(42)
        lib = _library_train_step(model, beta, policy)  # jaxvae.training.trainer's own jitted step
        state = {"p": params, "o": optax.adam(1e-4).init(params)}
        c, dt, fl = aot(lib, state["p"], state["o"], x, key)

        def call():
            state["p"], state["o"], metrics = c(state["p"], state["o"], x, key)
            block(metrics)

        return Case(call, dt, fl)
    # the batcher, called as the scorer calls it: under the policy it may cut large batches
    # into chunks and loop over compiled programs of Adam steps, so it is not wrapped in
    # another jit; its compile_s is filled in from the first call (see run)
    kw = dict(policy=policy, mesh=None)
    if op == "grad_maps_fused":
        fn = lambda: batching.maps(model, params, x, beta=beta, predictors=GRADIENT_MAPS,
                                smooth_sigma=sigma, **kw)
    elif op in PREDICTOR_OPS:
        fn = lambda: batching.maps(model, params, x, beta=beta, predictors=[op],
                                smooth_sigma=sigma, **kw)[op]
    elif op == "projection":
        fn = lambda: batching.project(model, params, x, lam=lam, steps=steps, lr=lr, **kw)[1]
    else:
        raise ConfigError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return Case(lambda: block(fn()))


# ---- the PyTorch side -----------------------------------------------------------------------

def _torch():
    try:
        import torch  # optional: the bench extra; JAX-only runs never import it

        from jaxvae.bench import torch_reference
    except ImportError as e:
        return None, None, str(e)
    return torch, torch_reference, None


def torch_case(op, tr, tmodel, xt, *, beta, sigma, steps, lam, lr, variant=None,
               train_model=None) -> Case:
    import torch  # optional: the bench extra; JAX-only runs never import it
    sync = torch.cuda.synchronize if xt.is_cuda else (lambda: None)

    def run(f):
        def call():
            f()
            sync()
        return Case(call)

    if op in ("grad_maps_fused", "grad_maps_naive"):
        v = "naive" if op == "grad_maps_naive" else variant
        return run(lambda: tr.grad_maps(tmodel, xt, beta, sigma, variant=v))
    if op in PREDICTOR_OPS:
        return run(lambda: tr.predictor(tmodel, xt, op, beta, sigma))
    if op == "projection":
        return run(lambda: tr.project(tmodel, xt, lam, steps, lr))
    if op == "train_step":
        opt = torch.optim.Adam(train_model.parameters(), lr=1e-4)
        return run(lambda: tr.train_step(train_model, opt, xt, beta))
    raise ConfigError(f"unknown op {op!r}")


# ---- the run --------------------------------------------------------------------------------

def run(batch_sizes=(64, 256), ops=OPS, frameworks=("jax", "torch"), repeats=5, out=None, *,
        md=None, latent_dim=256, image_size=64, in_channels=1, conv_impl="auto", beta=1.0,
        sigma=3.0, projection_steps=100,
        lam=1.0, lr=0.03,
        min_sample_s=0.05, budget_s=30.0, check=True, seed=0, peak_n=None, torch_threads=None,
        log=print) -> dict:
    """Benchmark `ops` at every batch size in JAX (and PyTorch where installed).

    Args:
      batch_sizes: images per call.
      ops: names among OPS.
      frameworks: subset of ("jax", "torch"); torch is skipped with a note when absent.
      repeats: timed samples per (framework, op, batch); the median is reported.
      out: path of the JSON report (written atomically; markdown next to it if md is None
        and out is given, as OUT with suffix .md); None writes nothing.
      md: path of the markdown table (optional).
      latent_dim, beta, sigma: model size, KL weight, map smoothing.
      image_size, in_channels: the ConvVAE's image size (64 or 128) and channels; timed
        and agreement images are (batch, image_size, image_size, in_channels).
      conv_impl: "auto" = the execution policy's convolution forms (execution.current());
        "lax", "s2d" or "cpu_inference" = that form for training and scoring alike.
      projection_steps, lam, lr: the projection's Adam steps, L1 weight, learning rate.
      check: verify torch maps == JAX maps (1e-4 of the scale) before timing.
      peak_n: size of the square matmul measuring peak GFLOP/s (None: 2048 CPU, 8192 GPU).
      torch_threads: torch CPU threads; None picks the faster of 1 and torch's default on
        the fused maps at the first batch size (on a busy small CPU, torch's OpenMP team
        loses more to oversubscription than XLA's pool, and 1 thread can be ~2x faster).
    Returns:
      the report dict (keys machine, peak_gflops, rows, ratios, ...) with "markdown".
    """
    unknown = set(ops) - set(OPS)
    if unknown:
        raise ConfigError(f"unknown op(s) {sorted(unknown)}; choose from {', '.join(OPS)}")
    torch, tr, why = _torch() if "torch" in frameworks else (None, None, "not requested")
    notes = []
    if "torch" in frameworks and torch is None:
        notes.append(f"PyTorch not installed ({why}): JAX only. "
                     "Install with `pip install torch==2.13.0` (the `bench` extra).")
        log("note: " + notes[-1])
    fws = [f for f in frameworks if f == "jax" or (f == "torch" and torch is not None)]
    report = {"machine": machine_info(torch), "settings": dict(
        batch_sizes=list(batch_sizes), ops=list(ops), frameworks=fws, repeats=repeats,
        latent_dim=latent_dim, image_size=image_size, in_channels=in_channels,
        conv_impl=conv_impl, beta=beta, sigma=sigma,
        projection_steps=projection_steps,
        lam=lam, lr=lr, train_step="jaxvae.training.trainer.make_train_step (adam 1e-4, no "
        "augmentation)",
        flops="analytic useful FLOPs (jaxvae.bench.timing.op_flops); xla_mflop_per_image is "
              "XLA cost_analysis of the compiled JAX program",
        precision="framework defaults for timing; agreement checked at full float32")}
    policy = execution.current()
    if conv_impl != "auto":
        policy = dataclasses.replace(policy, train_conv=conv_impl, inference_conv=conv_impl)
    # the plain form; the policy picks its own
    model = ConvVAE(latent_dim=latent_dim, image_size=image_size,
                           in_channels=in_channels)
    policy = policy.for_model(model)  # chunks and micro-batches of the model's image size
    report["settings"]["policy"] = dataclasses.asdict(policy)
    # one compiled init: eager Flax init compiles each initializer separately (~10 s)
    params = jax.jit(init_params, static_argnums=0)(model, jax.random.key(seed))
    macs = model_macs(model)
    report["mflop_per_image_forward"] = 2 * (macs["E"] + macs["D"]) / 1e6
    report["peak_gflops"] = peak_matmul_gflops(peak_n)
    log(f"peak float32 matmul: {report['peak_gflops']:.1f} GFLOP/s")
    kw = dict(beta=beta, sigma=sigma, steps=projection_steps, lam=lam, lr=lr)
    tdev = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    if torch is not None:
        tmodel = tr.from_flax(model, params, tdev).eval().requires_grad_(False)
        if check:
            inputs = agreement_inputs(min(8, min(batch_sizes)), seed, log=log,
                                      image_size=image_size, in_channels=in_channels)
            report["agreement_inputs"] = {k: v[1] for k, v in inputs.items()}
            report["agreement"] = check_agreement(model, params, tr, tmodel,
                                                  {k: v[0] for k, v in inputs.items()},
                                                  ops=ops, **kw)
            log(f"torch == jax on {', '.join(inputs)} slices: max relative error "
                f"{max(report['agreement'].values()):.2e}")
    if torch is not None and tdev == "cpu":
        _pick_torch_threads(report, tr, tmodel, tr.to_torch(_images(batch_sizes[0], seed,
                                                                    model)),
                            kw, torch_threads, log)
    rows, variants = [], []
    for bs in batch_sizes:
        x = _images(bs, seed, model)
        xt = tr.to_torch(x, tdev) if torch is not None else None
        for op in ops:
            cases = {}
            if "jax" in fws:
                cases["jax"] = jax_case(op, model, params, x, policy=policy, **kw)
            if torch is not None:
                variant = None
                if op == "grad_maps_fused":
                    variant, vt = _fastest_torch_variant(tr, tmodel, xt, kw, repeats)
                    variants += [{"batch_size": bs, "variant": v, "images_per_s": bs / t}
                                 for v, t in vt.items()]
                train_model = (tr.from_flax(model, params, tdev).train()
                               if op == "train_step" else None)
                cases["torch"] = torch_case(op, tr, tmodel, xt, variant=variant,
                                            train_model=train_model, **kw)
                cases["torch"].extra["variant"] = variant
            info = measure(cases, repeats, min_sample_s, budget_s)
            flops = op_flops(op, macs, projection_steps) * bs
            for fw, case in cases.items():
                i = info[fw]
                row = {"framework": fw, "op": op, "batch_size": bs,
                       "images_per_s": bs / i["median_s"], "ms_per_batch": 1e3 * i["median_s"],
                       "min_ms_per_batch": 1e3 * i["min_s"],
                       "compile_s": case.compile_s if case.compile_s is not None or fw != "jax"
                       else max(i["first_call_s"] - i["median_s"], 0.0),
                       "gflops": flops / i["median_s"] / 1e9,
                       "pct_peak": 100 * flops / i["median_s"] / 1e9 / report["peak_gflops"],
                       "first_call_s": i["first_call_s"], "repeats": i["repeats"],
                       "number": i["number"], "samples_ms": [1e3 * s for s in i["samples"]],
                       "peak_rss_mb": i["peak_rss_mb"], "device_peak_mb": i["device_peak_mb"],
                       "xla_mflop_per_image": case.xla_flops / bs / 1e6 if case.xla_flops
                       else None, **{k: v for k, v in case.extra.items() if v is not None}}
                rows.append(row)
                log(f"{fw:5s} {op:16s} b{bs:<5d} {row['images_per_s']:9.1f} img/s "
                    f"{row['ms_per_batch']:9.2f} ms {row['gflops']:7.1f} GFLOP/s")
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["rows"] = rows
    report["torch_grad_map_variants"] = variants
    report["ratios"] = ratios(rows)
    report["notes"] = notes
    report["markdown"] = markdown(report, OPS)
    if out is not None:
        write_text(out, json.dumps(report, indent=1) + "\n", overwrite=True)
        md = md if md is not None else os.path.splitext(str(out))[0] + ".md"
    if md is not None:
        write_text(md, report["markdown"], overwrite=True)
    return report


def _images(n, seed, model):
    """n timed images in the pre-processed range (z-scored, clipped to +-1.5).

    Random, so the timing does not depend on data files; the agreement check uses real
    pre-processed slices instead (`agreement_inputs`).
    """
    shape = (n, model.image_size, model.image_size, model.in_channels)
    x = jax.random.normal(jax.random.key(seed + 1), shape) * 0.7
    return jnp.clip(x, -1.5, 1.5)


def _pick_torch_threads(report, tr, tmodel, xt, kw, threads, log):
    import torch  # optional: the bench extra; JAX-only runs never import it
    default = torch.get_num_threads()
    if threads is None and default > 1:
        times = {}
        for n in (default, 1):
            torch.set_num_threads(n)
            case = torch_case("grad_maps_fused", tr, tmodel, xt, variant="fwd1_bwd2", **kw)
            times[n] = measure({"torch": case}, 3, budget_s=10.0)["torch"]["median_s"]
        threads = min(times, key=times.get)
        report["machine"]["torch_threads_trial_ms"] = {str(k): 1e3 * v for k, v in times.items()}
    torch.set_num_threads(threads or default)
    report["machine"]["torch_threads"] = torch.get_num_threads()
    log(f"torch threads: {torch.get_num_threads()}")


def _fastest_torch_variant(tr, tmodel, xt, kw, repeats):
    """Time the one-forward torch grad-map variants; return the fastest and all times (s)."""
    cases = {v: torch_case("grad_maps_fused", tr, tmodel, xt, variant=v, **kw)
             for v in FUSED_TORCH_VARIANTS}
    info = measure(cases, max(3, repeats // 2), budget_s=10.0)
    times = {v: i["median_s"] for v, i in info.items()}
    return min(times, key=times.get), times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxvae.bench.harness", description=__doc__
                                .split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--frameworks", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--projection-steps", type=int, default=100)
    p.add_argument("--latent-dim", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64, choices=IMAGE_SIZES,
                   help="slice size of the model and the timed images (default 64)")
    p.add_argument("--in-channels", type=int, default=1,
                   help="image channels (co-registered sequences; default 1)")
    p.add_argument("--conv-impl", default="auto", choices=("auto", *CONV_IMPLS),
                   help="JAX convolution form (default: auto, the execution policy's forms)")
    p.add_argument("--budget-s", type=float, default=30.0,
                   help="max seconds of timed samples per framework, op and batch (>= 3 kept)")
    p.add_argument("--torch-threads", type=int,
                   help="torch CPU threads (default: the faster of 1 and torch's default)")
    p.add_argument("--no-check", action="store_true", help="skip the torch == jax map check")
    p.add_argument("--out", help="JSON report path (markdown written next to it as .md)")
    p.add_argument("--md", help="markdown table path (default: --out with suffix .md)")
    a = p.parse_args(argv)
    report = run(a.batch_sizes, tuple(a.ops), tuple(a.frameworks), a.repeats, a.out, md=a.md,
                 latent_dim=a.latent_dim, image_size=a.image_size,
                 in_channels=a.in_channels, conv_impl=a.conv_impl,
                 projection_steps=a.projection_steps, budget_s=a.budget_s,
                 check=not a.no_check, torch_threads=a.torch_threads)
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
