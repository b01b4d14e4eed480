"""Measuring: useful FLOPs of the architecture, interleaved timing with medians, peak
memory, the matmul peak, and the machine a report was measured on."""

import datetime
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass, field

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from jaxvae.runtime import execution

# ---- FLOP count -----------------------------------------------------------------------------

def model_macs(model) -> dict:
    """Useful multiply-adds per image of the encoder (E), decoder (D), first conv (E1)."""
    s, ch, lat = model.image_size, list(model.stage_channels), model.latent_dim
    enc, dec, cin = 0, 0, model.in_channels
    for c in ch:  # k4 s2 conv: 16 taps per output pixel
        s //= 2
        enc += s * s * c * 16 * cin
        cin = c
    first = (model.image_size // 2) ** 2 * ch[0] * 16 * model.in_channels
    flat = s * s * ch[-1]
    enc += flat * 2 * lat
    dec += lat * flat
    for c in [*ch[-2::-1], model.in_channels]:  # k4 s2 transposed conv: 4 useful taps
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
    import torch  # optional: the bench extra; JAX-only runs never import it
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
            import torch  # optional: the bench extra; JAX-only runs never import it
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


def block(x):
    return jax.block_until_ready(x)


def aot(fn, *args):
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
    f, _, _ = aot(jnp.dot, a, b)
    block(f(a, b))
    ts = []
    for _ in range(repeats):
        ts.append(_time_once(lambda: block(f(a, b))))
    return 2 * n**3 / statistics.median(ts) / 1e9


def machine_info(torch) -> dict:
    """CPU, versions, devices, flags, date and load of the machine a report comes from."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
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
