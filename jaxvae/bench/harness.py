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
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxvae
from jaxvae import execution, losses, score
from jaxvae.convs import CONV_IMPLS
from jaxvae.errors import DataError
from jaxvae.io import write_text
from jaxvae.predictors import GRADIENT_MAPS, smooth

OPS = ("grad_maps_fused", "grad_maps_naive", "rec_error", "rec_grad", "kl_grad", "elbo_grad",
       "combi", "projection", "train_step")
PREDICTOR_OPS = ("rec_error", "rec_grad", "kl_grad", "elbo_grad", "combi")
FUSED_TORCH_VARIANTS = ("retain_graph", "fwd1_bwd2", "batched_vjp")
ROW_KEYS = ("framework", "op", "batch_size", "images_per_s", "ms_per_batch", "compile_s",
            "gflops", "pct_peak")
# real scans beside the repository (../shared/data/README.md); absent on most machines
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_AGREEMENT_DATA = ("brats2018_flair", "flair")  # (folder, modality): its first case


class AgreementError(RuntimeError):
    """The PyTorch reference and JAX disagree: the two would not be timing the same work."""


# ---- FLOP count -----------------------------------------------------------------------------

def model_macs(model) -> dict:
    """Useful multiply-adds per image of the encoder (E), decoder (D), first conv (E1)."""
    s, ch, lat = model.image_size, list(model.channels), model.latent_dim
    enc, dec, cin = 0, 0, 1
    for c in ch:  # k4 s2 conv: 16 taps per output pixel
        s //= 2
        enc += s * s * c * 16 * cin
        cin = c
    first = (model.image_size // 2) ** 2 * ch[0] * 16
    flat = s * s * ch[-1]
    enc += flat * 2 * lat
    dec += lat * flat
    for c in [*ch[-2::-1], 1]:  # k4 s2 transposed conv: 4 useful taps per output pixel
        s *= 2
        dec += s * s * c * 4 * cin
        cin = c
    return {"E": enc, "D": dec, "E1": first}


def op_flops(op: str, macs: dict, steps: int = 100) -> float:
    """Useful FLOPs per image of an op (2 per multiply-add; backward to the input ~= forward)."""
    e, d, e1 = macs["E"], macs["D"], macs["E1"]
    fwd_bwd = 2 * e + 2 * d  # forward + input gradient through encoder and decoder
    mac = {
        "grad_maps_fused": 3 * e + 2 * d,  # fwd, decoder VJP, encoder VJP x2 (rec, kl)
        "grad_maps_naive": 3 * fwd_bwd - 2 * d,  # rec + kl (encoder only) + elbo
        "rec_error": e + d, "rec_grad": fwd_bwd, "elbo_grad": fwd_bwd,
        "kl_grad": 2 * e, "combi": 2 * e + d,
        "projection": steps * fwd_bwd + e + d,
        "train_step": 3 * (e + d) - e1,  # fwd + input grads (not of x) + weight grads
    }[op]
    return 2.0 * mac


# ---- timing ---------------------------------------------------------------------------------

@dataclass
class Case:
    """One framework's runnable op: call() runs it once and blocks until done."""

    call: object
    compile_s: float | None = None
    xla_flops: float | None = None
    extra: dict = field(default_factory=dict)


def _reset_peak_rss() -> bool:
    try:  # Linux: "5" resets the VmHWM high-water mark of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_peak_mb(framework: str):
    if framework == "jax":
        stats = jax.devices()[0].memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak / 2**20
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _time_once(call) -> float:
    t = time.perf_counter()
    call()
    return time.perf_counter() - t


def measure(cases: dict, repeats: int, min_sample_s: float = 0.05,
            budget_s: float = 30.0, pause_s: float = 0.05) -> dict:
    """Warm up every case, then time them interleaved; return per-framework sample stats.

    Each sample runs the op `number` times (so a sample lasts >= min_sample_s) and divides;
    repeats shrink to fit budget_s per framework (>= 3, or 1 when one sample exceeds it).
    Between cases it sleeps pause_s: on a small CPU the worker threads of the runtime that
    ran last (torch's OpenMP team, XLA's pool) spin for a while and would slow the next one.
    """
    info = {}
    for fw, case in cases.items():
        rss_ok = _reset_peak_rss()
        if fw == "torch":
            import torch
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        first = _time_once(case.call)
        warm = first if first > 1.0 else _time_once(case.call)  # slow ops: one warm-up
        number = max(1, int(np.ceil(min_sample_s / max(warm, 1e-9))))
        info[fw] = {"first_call_s": first, "number": number, "samples": [],
                    "peak_rss_mb": _peak_rss_mb(), "rss_reset": rss_ok,
                    "device_peak_mb": _device_peak_mb(fw), "warm": warm}
    slowest = max(i["warm"] * i["number"] for i in info.values())
    fit = int(budget_s / max(slowest, 1e-9))
    # >= 3 samples unless one sample alone exceeds the budget (projection at large batches)
    repeats = min(repeats, max(fit, 1 if slowest > budget_s else 3))
    for _ in range(repeats):
        for fw, case in cases.items():
            n = info[fw]["number"]
            if len(cases) > 1:
                time.sleep(pause_s)
            t = time.perf_counter()
            for _ in range(n):
                case.call()
            info[fw]["samples"].append((time.perf_counter() - t) / n)
    for i in info.values():
        i["median_s"] = statistics.median(i["samples"])
        i["min_s"] = min(i["samples"])
        i["repeats"] = repeats
    return info


def _block(x):
    return jax.block_until_ready(x)


def _aot(fn, *args):
    """jit + lower + compile ahead of time: (compiled, compile seconds, XLA flop count)."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    dt = time.perf_counter() - t
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list | tuple) else ca
        flops = float(ca.get("flops")) if ca and ca.get("flops") is not None else None
    except Exception:  # noqa: BLE001 - cost analysis is optional information
        flops = None
    return compiled, dt, flops


def peak_matmul_gflops(n: int | None = None, repeats: int = 5) -> float:
    """float32 GFLOP/s of a large jnp.dot on the default device (median of repeats)."""
    n = n or (8192 if execution.backend() == "gpu" else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f, _, _ = _aot(jnp.dot, a, b)
    _block(f(a, b))
    ts = []
    for _ in range(repeats):
        ts.append(_time_once(lambda: _block(f(a, b))))
    return 2 * n**3 / statistics.median(ts) / 1e9


# ---- the JAX side ---------------------------------------------------------------------------

def _naive_grad_fns(model, beta, sigma):
    """Three separately jitted jax.grad maps, each with its own forward pass."""
    def rec(params, x):
        mu, _ = jaxvae.encode(model, params, x)
        return jnp.sum(losses.rec_nll(x, jaxvae.decode(model, params, mu)))

    def kl(params, x):
        return jnp.sum(losses.kl_divergence(*jaxvae.encode(model, params, x)))

    def elbo(params, x):
        return rec(params, x) + beta * kl(params, x)

    def as_map(loss):
        return lambda p, x: smooth(jnp.abs(jax.grad(loss, argnums=1)(p, x))[..., 0], sigma)

    return {"rec_grad": as_map(rec), "kl_grad": as_map(kl), "elbo_grad": as_map(elbo)}


def _library_train_step(model, beta, policy):
    """jaxvae.train.make_train_step(model, lr=1e-4, beta) as the trainer runs it under
    `policy` (its convolution form and micro-batches), without augmentation."""
    from jaxvae.train import make_train_step

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
        stages = [_aot(f, params, x) for f in _naive_grad_fns(model, beta, sigma).values()]
        return Case(lambda: _block([c(params, x) for c, _, _ in stages]),
                    sum(s[1] for s in stages), sum(s[2] or 0.0 for s in stages) or None)
    if op == "train_step":
        key = jax.random.key(42)
        lib = _library_train_step(model, beta, policy)  # jaxvae.train's own jitted step
        state = {"p": params, "o": optax.adam(1e-4).init(params)}
        c, dt, fl = _aot(lib, state["p"], state["o"], x, key)

        def call():
            state["p"], state["o"], metrics = c(state["p"], state["o"], x, key)
            _block(metrics)

        return Case(call, dt, fl)
    # the batcher, called as the scorer calls it: under the policy it may cut large batches
    # into chunks and loop over compiled programs of Adam steps, so it is not wrapped in
    # another jit; its compile_s is filled in from the first call (see run)
    kw = dict(policy=policy, mesh=None)
    if op == "grad_maps_fused":
        fn = lambda: score.maps(model, params, x, beta=beta, predictors=GRADIENT_MAPS,
                                smooth_sigma=sigma, **kw)
    elif op in PREDICTOR_OPS:
        fn = lambda: score.maps(model, params, x, beta=beta, predictors=[op],
                                smooth_sigma=sigma, **kw)[op]
    elif op == "projection":
        fn = lambda: score.project(model, params, x, lam=lam, steps=steps, lr=lr, **kw)[1]
    else:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(OPS)}")
    return Case(lambda: _block(fn()))


# ---- the PyTorch side -----------------------------------------------------------------------

def _torch():
    try:
        import torch

        from jaxvae.bench import torch_reference
    except ImportError as e:
        return None, None, str(e)
    return torch, torch_reference, None


def torch_case(op, tr, tmodel, xt, *, beta, sigma, steps, lam, lr, variant=None,
               train_model=None) -> Case:
    import torch
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
    raise ValueError(f"unknown op {op!r}")


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def _spread(n_total: int, n: int) -> np.ndarray:
    """n indices spread evenly over range(n_total), the centres of n equal parts (no ends)."""
    return np.unique(np.minimum(((np.arange(n) + 0.5) * n_total / n).astype(int), n_total - 1))


@functools.lru_cache(maxsize=2)
def _phantom_slices(seed: int) -> np.ndarray:
    """All pre-processed (S, 64, 64) slices of phantom case `seed` (a tumour case, T2).

    The volume is reoriented to RAS as `jaxvae.data.nifti.load_volume` does with the file
    the phantom writer would save (BraTS affine), then goes through `preprocess_volume` with
    the default `PreprocessParams`, as `jaxvae.score.score_volume` and `load_slices` do.
    """
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        io_orientation,
        ornt_transform,
    )

    from jaxvae.data import phantom
    from jaxvae.data.preprocess import PreprocessParams, preprocess_volume

    case = phantom.make_case(seed, lesion_kinds=("tumour",))
    ras = apply_orientation(case.image, ornt_transform(io_orientation(case.affine),
                                                       axcodes2ornt("RAS")))
    images, _, _, _ = preprocess_volume(np.ascontiguousarray(ras), PreprocessParams(),
                                        name=f"phantom case {seed}")
    images.setflags(write=False)
    return images


def _real_slices(root: Path):
    """(all pre-processed slices, case id) of the first case of REAL_AGREEMENT_DATA."""
    from jaxvae.data.datasets import find_brats_cases, load_slices

    folder, modality = REAL_AGREEMENT_DATA
    case = find_brats_cases(root / folder, modality)[0]
    return load_slices([case]).images, f"{folder}/{case.case_id} ({modality})"


def agreement_inputs(n: int = 8, seed: int = 0, shared_data=SHARED_DATA, log=print) -> dict:
    """Realistic batches for `check_agreement`: name -> ((n, 64, 64, 1) float32, description).

    "phantom": n slices spread over the brain of phantom case `seed` (always present).
    "real": n slices spread over the first case of ../shared/data/brats2018_flair (FLAIR),
    pre-processed by `jaxvae.data.datasets.load_slices`; left out, with a log line, where that
    folder is absent or unreadable. Both are what scoring feeds the model: z-scored brain,
    clipped to +-1.5, background exactly 0 (every slice keeps background and brain).
    """
    out = {}
    images = _phantom_slices(seed)
    idx = _spread(len(images), n)
    out["phantom"] = (jnp.asarray(images[idx][..., None]),
                      f"phantom case {seed} (tumour, T2), slices {idx.tolist()} of {len(images)}")
    root = Path(shared_data) if shared_data is not None else None
    if root is None or not (root / REAL_AGREEMENT_DATA[0]).is_dir():
        log(f"agreement: no real slices ({root} has no {REAL_AGREEMENT_DATA[0]}/); "
            "phantom slices only")
        return out
    try:
        images, what = _real_slices(root)
    except DataError as e:
        log(f"agreement: real slices skipped ({e})")
        return out
    idx = _spread(len(images), n)
    out["real"] = (jnp.asarray(images[idx][..., None]),
                   f"{what}, slices {idx.tolist()} of {len(images)}")
    return out


def check_agreement(model, params, tr, tmodel, x=None, *, ops, beta, sigma, steps, lam, lr,
                    tol=1e-4) -> dict:
    """Max |jax - torch| / max |jax| for every map the timed ops produce; raises on > tol.

    x: one (N, 64, 64, 1) batch (keys are the map names), a dict name -> batch (keys
    "name/map"), or None for `agreement_inputs(8)`: phantom slices and, where
    ../shared/data exists, real ones. Realistic inputs matter (issue #16): pre-processed
    slices have an exact-zero background and the convolutions have no bias, so every
    all-background patch has a pre-activation of exactly 0, on the LeakyReLU's kink, and the
    derivative there (the slope 0.01 in PyTorch) decides the gradient maps over the whole
    background. Random-normal images never reach the kink; a flax `leaky_relu` (derivative 1
    at 0) passed a check on them while its kl_grad differed by 100% of the map scale on
    brain slices. Exact zeros are computed exactly by both frameworks; a pre-activation that
    is merely within rounding of 0 can still take the other branch in the other framework,
    which changes a map locally, but none does on these inputs.

    Runs at full float32 precision on both sides (no TF32 on GPUs), the precision of the
    maps themselves; timings later use each framework's defaults.
    """
    if x is None:
        x = {k: v[0] for k, v in agreement_inputs(log=lambda *_: None).items()}
    batches = x if isinstance(x, dict) else {"": x}
    errs = {}
    for name, xb in batches.items():
        errs.update({(f"{name}/{k}" if name else k): v for k, v in _agreement_errors(
            model, params, tr, tmodel, jnp.asarray(xb), ops=ops, beta=beta, sigma=sigma,
            steps=steps, lam=lam, lr=lr).items()})
    bad = {k: v for k, v in errs.items() if not v <= tol}
    if bad:
        raise AgreementError(
            f"PyTorch reference disagrees with JAX beyond {tol:g} of the map scale: {bad}. The "
            "two frameworks would not time the same work; check jaxvae/bench/torch_reference.py "
            "(weight conversion, loss definitions, activation derivative at 0).")
    return errs


def _agreement_errors(model, params, tr, tmodel, x, *, ops, beta, sigma, steps, lam,
                      lr) -> dict:
    import torch
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    errs = {}
    dev = next(tmodel.parameters()).device
    xt = tr.to_torch(x, dev)
    try:
        with jax.default_matmul_precision("highest"):
            if {"grad_maps_fused", "grad_maps_naive"} & set(ops):
                ref = jaxvae.anomaly_maps(model, params, x, beta=beta, predictors=GRADIENT_MAPS,
                                          smooth_sigma=sigma)
                for v in tr.GRAD_MAP_VARIANTS:
                    got = tr.grad_maps(tmodel, xt, beta, sigma, variant=v)
                    for k in GRADIENT_MAPS:
                        errs[f"grad_maps[{v}].{k}"] = _rel_err(ref[k], got[k].cpu().numpy())
            for op in set(ops) & set(PREDICTOR_OPS):
                ref = jaxvae.anomaly_maps(model, params, x, beta=beta, predictors=[op],
                                          smooth_sigma=sigma)[op]
                errs[op] = _rel_err(ref, tr.predictor(tmodel, xt, op, beta, sigma).cpu().numpy())
            if "projection" in ops:
                ref = jaxvae.project(model, params, x, lam=lam, steps=steps, lr=lr)[1]
                errs["projection"] = _rel_err(ref, tr.project(tmodel, xt, lam, steps, lr)[1]
                                              .cpu().numpy())
            if "train_step" in ops:
                eps = jax.random.normal(jax.random.key(3), (x.shape[0], model.latent_dim))

                def loss_fn(p):
                    mu, ls = jaxvae.encode(model, p, x)
                    x_hat = jaxvae.decode(model, p, mu + jnp.exp(ls) * eps)
                    return jnp.mean(losses.beta_elbo(x, x_hat, mu, ls, beta)[0])

                loss, g = jax.value_and_grad(loss_fn)(params)
                tm = tr.from_flax(model, params, dev)
                tloss = tr.elbo_loss(tm, xt, torch.from_numpy(np.array(eps)).to(dev), beta)
                tloss.backward()
                errs["train_step.loss"] = _rel_err(loss, tloss.item())
                gconv = tr.convert_params(g, tuple(model.channels), model.image_size)
                for name, tp in tm.named_parameters():
                    errs[f"train_step.grad.{name}"] = _rel_err(gconv[name].numpy(),
                                                               tp.grad.cpu().numpy())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    return errs


# ---- the run --------------------------------------------------------------------------------

def _machine(torch) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import flax
    import jaxlib
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "jax_backend": execution.backend(),
            "jax_devices": [str(d) for d in jax.devices()],
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "loadavg_start": os.getloadavg()}
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available()
                    else None)
    return info


def run(batch_sizes=(64, 256), ops=OPS, frameworks=("jax", "torch"), repeats=5, out=None, *,
        md=None, latent_dim=256, conv_impl="auto", beta=1.0, sigma=3.0, projection_steps=100,
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
        raise ValueError(f"unknown op(s) {sorted(unknown)}; choose from {', '.join(OPS)}")
    torch, tr, why = _torch() if "torch" in frameworks else (None, None, "not requested")
    notes = []
    if "torch" in frameworks and torch is None:
        notes.append(f"PyTorch not installed ({why}): JAX only. "
                     "Install with `pip install torch==2.13.0` (the `bench` extra).")
        log("note: " + notes[-1])
    fws = [f for f in frameworks if f == "jax" or (f == "torch" and torch is not None)]
    report = {"machine": _machine(torch), "settings": dict(
        batch_sizes=list(batch_sizes), ops=list(ops), frameworks=fws, repeats=repeats,
        latent_dim=latent_dim, conv_impl=conv_impl, beta=beta, sigma=sigma,
        projection_steps=projection_steps,
        lam=lam, lr=lr, train_step="jaxvae.train.make_train_step (adam 1e-4, no augmentation)",
        flops="analytic useful FLOPs (jaxvae.bench.harness.op_flops); xla_mflop_per_image is "
              "XLA cost_analysis of the compiled JAX program",
        precision="framework defaults for timing; agreement checked at full float32")}
    policy = execution.current()
    if conv_impl != "auto":
        policy = dataclasses.replace(policy, train_conv=conv_impl, inference_conv=conv_impl)
    report["settings"]["policy"] = dataclasses.asdict(policy)
    model = jaxvae.ConvVAE(latent_dim=latent_dim)  # the plain form; the policy picks its own
    # one compiled init: eager Flax init compiles each initializer separately (~10 s)
    params = jax.jit(jaxvae.init_params, static_argnums=0)(model, jax.random.key(seed))
    macs = model_macs(model)
    report["mflop_per_image_forward"] = 2 * (macs["E"] + macs["D"]) / 1e6
    report["peak_gflops"] = peak_matmul_gflops(peak_n)
    log(f"peak float32 matmul: {report['peak_gflops']:.1f} GFLOP/s")
    kw = dict(beta=beta, sigma=sigma, steps=projection_steps, lam=lam, lr=lr)
    tdev = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    if torch is not None:
        tmodel = tr.from_flax(model, params, tdev).eval().requires_grad_(False)
        if check:
            inputs = agreement_inputs(min(8, min(batch_sizes)), seed, log=log)
            report["agreement_inputs"] = {k: v[1] for k, v in inputs.items()}
            report["agreement"] = check_agreement(model, params, tr, tmodel,
                                                  {k: v[0] for k, v in inputs.items()},
                                                  ops=ops, **kw)
            log(f"torch == jax on {', '.join(inputs)} slices: max relative error "
                f"{max(report['agreement'].values()):.2e}")
    if torch is not None and tdev == "cpu":
        _pick_torch_threads(report, tr, tmodel, tr.to_torch(_images(batch_sizes[0], seed)),
                            kw, torch_threads, log)
    rows, variants = [], []
    for bs in batch_sizes:
        x = _images(bs, seed)
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
    report["ratios"] = _ratios(rows)
    report["notes"] = notes
    report["markdown"] = markdown(report)
    if out is not None:
        write_text(out, json.dumps(report, indent=1) + "\n", overwrite=True)
        md = md if md is not None else os.path.splitext(str(out))[0] + ".md"
    if md is not None:
        write_text(md, report["markdown"], overwrite=True)
    return report


def _images(n, seed):
    """n timed images in the pre-processed range (z-scored, clipped to +-1.5).

    Random, so the timing does not depend on data files; the agreement check uses real
    pre-processed slices instead (`agreement_inputs`).
    """
    x = jax.random.normal(jax.random.key(seed + 1), (n, 64, 64, 1)) * 0.7
    return jnp.clip(x, -1.5, 1.5)


def _pick_torch_threads(report, tr, tmodel, xt, kw, threads, log):
    import torch
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


def _ratios(rows) -> list:
    by = {(r["framework"], r["op"], r["batch_size"]): r for r in rows}
    out = []
    for (fw, op, bs), r in sorted(by.items()):
        if fw == "jax" and ("torch", op, bs) in by:
            out.append({"kind": "jax/torch", "op": op, "batch_size": bs,
                        "ratio": r["images_per_s"] / by["torch", op, bs]["images_per_s"]})
        if op == "grad_maps_fused" and (fw, "grad_maps_naive", bs) in by:
            out.append({"kind": "fused/naive", "framework": fw, "batch_size": bs,
                        "ratio": r["images_per_s"] / by[fw, "grad_maps_naive", bs]["images_per_s"]})
    return out


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(report) -> str:
    """The report as a markdown table (one line per op and batch size)."""
    rows = {(r["framework"], r["op"], r["batch_size"]): r for r in report["rows"]}
    keys = sorted({(op, bs) for _, op, bs in rows}, key=lambda k: (k[1], OPS.index(k[0])))
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, jax {m['jax']} ({m['jax_backend']})"
             + (f", torch {m['torch']} ({m.get('torch_threads')} threads)" if "torch" in m
                else "")
             + f"; load avg {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f}; "
             f"peak f32 matmul {report['peak_gflops']:.1f} GFLOP/s.", "",
             "| op | batch | JAX img/s | torch img/s | JAX/torch | JAX ms | torch ms "
             "| JAX GFLOP/s | JAX % peak | JAX compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for op, bs in keys:
        j, t = rows.get(("jax", op, bs)), rows.get(("torch", op, bs))
        g = lambda r, k, s: _fmt(r[k] if r else None, s)
        ratio = j["images_per_s"] / t["images_per_s"] if j and t else None
        name = op + (f" (torch: {t['variant']})" if t and t.get("variant") else "")
        lines.append(f"| {name} | {bs} | {g(j, 'images_per_s', '.1f')} | "
                     f"{g(t, 'images_per_s', '.1f')} | {_fmt(ratio, '.2f')} | "
                     f"{g(j, 'ms_per_batch', '.1f')} | {g(t, 'ms_per_batch', '.1f')} | "
                     f"{g(j, 'gflops', '.1f')} | {g(j, 'pct_peak', '.1f')} | "
                     f"{g(j, 'compile_s', '.2f')} |")
    fn = [r for r in report["ratios"] if r["kind"] == "fused/naive"]
    if fn:
        lines += ["", "fused/naive (three gradient maps): " + ", ".join(
            f"{r['framework']} b{r['batch_size']} {r['ratio']:.2f}x" for r in fn)]
    lines += [f"Note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxvae.bench.harness", description=__doc__
                                .split("\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--frameworks", nargs="+", default=["jax", "torch"], choices=["jax", "torch"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--projection-steps", type=int, default=100)
    p.add_argument("--latent-dim", type=int, default=256)
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
                 latent_dim=a.latent_dim, conv_impl=a.conv_impl,
                 projection_steps=a.projection_steps, budget_s=a.budget_s,
                 check=not a.no_check, torch_threads=a.torch_threads)
    print(report["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
