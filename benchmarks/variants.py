"""Formulations of the ConvVAE and its maps, prototyped and measured against jaxvae.

The winners are in the library: the s2d convolutions (jaxvae.model, conv_impl "auto" on
CPU), chunks of unrolled Adam steps for the projection (jaxvae.projection) and 64-image
chunks for the maps (jaxvae.predictors). The "xla" variants here are the textbook forms the
library used before; "library" rows time jaxvae itself.

Every variant is a pure function of the *Flax* params (no new parameters, no retraining) and
must reproduce the library's maps to 1e-5 of their scale before it is timed.

The finding that motivates them: on XLA:CPU a convolution with lhs dilation (a transposed
convolution: the decoder's forward pass, and the *input gradient* of every strided encoder
convolution) takes a slow generic path, ~3x the time of the strided convolution of the same
useful work. Two exact re-writings avoid it:

* encoder, "space-to-depth" (s2d): pad 1, fold each 2x2 pixel block into channels, then a
  2x2 stride-1 convolution (or 4 shifted slices + one matmul). Its gradient is a stride-1
  convolution / matmuls + pads: no dilation anywhere.
* decoder, "sub-pixel": ConvTranspose(k4, s2) = four 2x2 stride-1 convolutions (one per
  output phase) on the 1-padded input, interleaved by depth-to-space; as one 3x3 conv with
  4*out channels (2.25x zero taps) or as a 3x3 im2col + one matmul.

    python -m benchmarks.variants --batch 64 --repeats 7
    python -m benchmarks.variants --parts chunks maps projection --projection-batch 64
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxvae
from jaxvae import losses
from jaxvae.io import write_text
from jaxvae.model import (
    _leaky,
    conv_down,
    conv_up,
    phases_to_image,
    s2d_kernel,
    s2d_transpose_kernel,
    space_to_depth,
)
from jaxvae.predictors import GRADIENT_MAPS, smooth

NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "HWIO", "NCHW")


# ---- encoder convolution k4 s2 p1 -----------------------------------------------------------

def conv_xla(x, k):
    """The textbook form (flax nn.Conv; the library's conv_impl "lax"): one strided lax
    convolution, NHWC."""
    return conv_down(x, k, "lax")


def conv_xla_nchw(x, k):
    """The same on NCHW activations (x is NCHW here)."""
    return lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NCHW)


def conv_s2d(x, k):
    """Space-to-depth + 2x2 stride-1 VALID convolution (exact): the library's CPU form."""
    return conv_down(x, k, "s2d")


def conv_s2d_dot(x, k):
    """Space-to-depth + 4 shifted slices + one matmul (exact)."""
    s = space_to_depth(x)
    ho, wo = s.shape[1] - 1, s.shape[2] - 1
    cols = jnp.concatenate([s[:, p:p + ho, q:q + wo] for p in (0, 1) for q in (0, 1)], -1)
    return cols @ s2d_kernel(k).reshape(-1, k.shape[-1])


def conv_patches_dot(x, k):
    """lax.conv_general_dilated_patches (im2col) + matmul; its input VJP is a dilated conv."""
    p = lax.conv_general_dilated_patches(x, (4, 4), (2, 2), ((1, 1), (1, 1)),
                                         dimension_numbers=NHWC)
    # patch features are ordered (c, kh, kw)
    return p @ k.transpose(2, 0, 1, 3).reshape(-1, k.shape[-1])


# ---- decoder transposed convolution k4 s2 (torch p1) ----------------------------------------

def tconv_xla(h, k):
    """The textbook form (flax nn.ConvTranspose, padding 2; conv_impl "lax"): lhs-dilated."""
    return conv_up(h, k, "lax")


def tconv_xla_nchw(h, k):
    return lax.conv_transpose(h, k, (2, 2), ((2, 2), (2, 2)), dimension_numbers=NCHW)


# out[2i + r] = sum_t hp[i + t] * K[TAPS[r][t]] over the 1-padded input hp (None = no tap)
_TAPS = ((0, 2, None), (None, 1, 3))


def _subpixel_kernel(k):
    """(4, 4, C, O) -> (3, 3, C, 4 O) with output channels ordered (ry, rx, o)."""
    c, o = k.shape[2:]
    zero = jnp.zeros((c, o), k.dtype)
    rows = []
    for ty in range(3):
        cols = []
        for tx in range(3):
            cols.append(jnp.concatenate([
                zero if _TAPS[ry][ty] is None or _TAPS[rx][tx] is None
                else k[_TAPS[ry][ty], _TAPS[rx][tx]] for ry in (0, 1) for rx in (0, 1)], -1))
        rows.append(jnp.stack(cols))
    return jnp.stack(rows)


def _d2s(y, o):
    n, h, w, _ = y.shape
    return y.reshape(n, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, o)


def tconv_subpixel(h, k):
    """Sub-pixel: one 3x3 stride-1 conv to 4*O channels on the 1-padded input + depth-to-space."""
    hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = lax.conv_general_dilated(hp, _subpixel_kernel(k), (1, 1), "VALID",
                                 dimension_numbers=NHWC)
    return _d2s(y, k.shape[-1])


def tconv_subpixel_dot(h, k):
    """Sub-pixel as 3x3 im2col (9 shifted slices) + one matmul + depth-to-space."""
    n, hh, ww, c = h.shape
    hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([hp[:, a:a + hh, b:b + ww] for a in range(3) for b in range(3)], -1)
    y = cols @ _subpixel_kernel(k).reshape(9 * c, -1)
    return _d2s(y, k.shape[-1])


def tconv_phases(h, k):
    """Sub-pixel without zero taps: four 2x2 stride-1 convs (one per output phase)."""
    n, hh, ww, c = h.shape
    hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ys = [lax.conv_general_dilated(hp[:, ry:ry + hh + 1, rx:rx + ww + 1], k[ry::2, rx::2],
                                   (1, 1), "VALID", dimension_numbers=NHWC)
          for ry in (0, 1) for rx in (0, 1)]
    return _d2s(jnp.concatenate(ys, -1), k.shape[-1])


def tconv_s2d(h, k):
    """Transpose of the s2d form: one dense 2x2 stride-1 conv to 4*O phase channels on the
    1-padded input, phases shifted into place (no zero taps, no dilation): the library's."""
    return conv_up(h, k, "s2d")


def tconv_s2d_dot(h, k):
    """tconv_s2d as 4 shifted slices + one matmul."""
    n, hh, ww, c = h.shape
    hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([hp[:, p:p + hh + 1, q:q + ww + 1] for p in (0, 1) for q in (0, 1)],
                           -1)
    y = cols @ s2d_transpose_kernel(k).reshape(4 * c, -1)
    return phases_to_image(y, hh, ww, k.shape[-1])


CONVS = {"xla": conv_xla, "s2d": conv_s2d, "s2d_dot": conv_s2d_dot,
         "patches_dot": conv_patches_dot}
TCONVS = {"xla": tconv_xla, "subpixel": tconv_subpixel, "subpixel_dot": tconv_subpixel_dot,
          "phases": tconv_phases, "s2d_t": tconv_s2d, "s2d_t_dot": tconv_s2d_dot}


# ---- the model on Flax params ---------------------------------------------------------------

def make_model(model, conv="xla", tconv="xla", layout="NHWC"):
    """(encode(params, x), decode(params, z)) with the chosen conv forms; NHWC in and out."""
    ch = list(model.channels)
    b = model.image_size // 2 ** len(ch)
    nchw = layout == "NCHW"
    cf = conv_xla_nchw if nchw else CONVS[conv]
    tf = tconv_xla_nchw if nchw else TCONVS[tconv]

    def encode(params, x):
        h = x.transpose(0, 3, 1, 2) if nchw else x
        for i in range(len(ch)):
            h = _leaky(cf(h, params[f"enc_convs_{i}"]["kernel"]))
        if nchw:
            h = h.transpose(0, 2, 3, 1)
        h = h.reshape(h.shape[0], -1) @ params["enc_head"]["kernel"]
        return tuple(jnp.split(h, 2, axis=-1))

    def decode(params, z):
        h = _leaky(z @ params["dec_head"]["kernel"]).reshape(z.shape[0], b, b, ch[-1])
        if nchw:
            h = h.transpose(0, 3, 1, 2)
        for i in range(len(ch)):
            h = tf(h, params[f"dec_convs_{i}"]["kernel"])
            if i < len(ch) - 1:
                h = _leaky(h)
        return h.transpose(0, 2, 3, 1) if nchw else h

    return encode, decode


def fused_grad_maps(encode, decode, *, beta=1.0, sigma=3.0, enc_vjp="vmap"):
    """rec/kl/elbo gradient maps from one forward pass (the library's algorithm).

    enc_vjp: "vmap" stacks the two encoder cotangents (the library), "separate" calls the
    encoder VJP twice, "concat" runs the encoder forward on [x, x] and one VJP (more forward
    work, one big backward).
    """
    def fn(params, x):
        n = x.shape[0]
        xx = jnp.concatenate([x, x]) if enc_vjp == "concat" else x
        (mu, ls), vjp = jax.vjp(lambda x: encode(params, x), xx)
        mu1 = mu[:n]

        def rec_loss(mu, x):
            return jnp.sum(losses.rec_nll(x, decode(params, mu)))

        g_mu, g_direct = jax.grad(rec_loss, argnums=(0, 1))(mu1, x)
        kl_mu, kl_ls = mu, jnp.exp(2 * ls) - 1  # d KL / d (mu, log_sigma)
        if enc_vjp == "vmap":
            g = jax.vmap(lambda cm, cs: vjp((cm, cs))[0])(
                jnp.stack([g_mu, kl_mu]), jnp.stack([jnp.zeros_like(g_mu), kl_ls]))
            g_rec, g_kl = g[0] + g_direct, g[1]
        elif enc_vjp == "separate":
            g_rec = vjp((g_mu, jnp.zeros_like(g_mu)))[0] + g_direct
            g_kl = vjp((kl_mu, kl_ls))[0]
        else:
            g = vjp((jnp.concatenate([g_mu, kl_mu[n:]]),
                     jnp.concatenate([jnp.zeros_like(g_mu), kl_ls[n:]])))[0]
            g_rec, g_kl = g[:n] + g_direct, g[n:]
        g_elbo = g_rec + beta * g_kl
        return {k: smooth(jnp.abs(v)[..., 0], sigma)
                for k, v in zip(GRADIENT_MAPS, (g_rec, g_kl, g_elbo), strict=True)}

    return fn


def projection_fn(encode, decode, *, steps=100, lam=1.0, lr=0.03, loop="fori"):
    """Proj-Rec-Error map with the Adam loop as fori_loop, scan, or scan(unroll=2)."""
    opt = optax.adam(lr)

    def energy(params, x, x0):
        x_hat = decode(params, encode(params, x)[0])
        d = x - x0
        return jnp.sum(losses.rec_nll(x, x_hat)) + lam * jnp.sum(jnp.where(d == 0, 0., jnp.abs(d)))

    def step(params, x0, carry):
        x, state = carry
        updates, state = opt.update(jax.grad(energy, argnums=1)(params, x, x0), state, x)
        return optax.apply_updates(x, updates), state

    def fn(params, x0):
        carry = (x0, opt.init(x0))
        if loop == "fori":
            carry = lax.fori_loop(0, steps, lambda _, c: step(params, x0, c), carry)
        else:
            carry, _ = lax.scan(lambda c, _: (step(params, x0, c), None), carry, None,
                                length=steps, unroll=2 if loop == "scan_unroll2" else 1)
        return jnp.square(x0 - decode(params, encode(params, carry[0])[0]))[..., 0]

    return fn, step, opt, energy


def chunked_projection(encode, decode, *, steps=100, lam=1.0, lr=0.03, chunk=10):
    """Projection as a Python loop over a jitted chunk of `chunk` unrolled Adam steps.

    On XLA:CPU the body of a while loop (lax.fori_loop / lax.scan) runs several times slower
    than the same ops at the top level of a program; unrolled steps avoid the loop op, and
    chunking keeps the compile time of the unrolled program small.
    """
    _, step, opt, _ = projection_fn(encode, decode, steps=steps, lam=lam, lr=lr)

    def many(k):
        def f(params, x0, carry):
            for _ in range(k):
                carry = step(params, x0, carry)
            return carry
        return jax.jit(f)

    full, rest = many(chunk), many(steps % chunk) if steps % chunk else None
    to_map = jax.jit(lambda p, x0, xt: jnp.square(x0 - decode(p, encode(p, xt)[0]))[..., 0])

    def run(params, x0):
        carry = (x0, opt.init(x0))
        for _ in range(steps // chunk):
            carry = full(params, x0, carry)
        if rest is not None:
            carry = rest(params, x0, carry)
        return jax.block_until_ready(to_map(params, x0, carry[0]))

    return run


# ---- measurement ----------------------------------------------------------------------------

def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def time_interleaved(fns: dict, repeats: int, min_sample_s=0.1) -> dict:
    """Median seconds per call of zero-argument blocking callables, timed interleaved."""
    number = {}
    for k, f in fns.items():
        f()
        t = time.perf_counter()
        f()
        number[k] = max(1, int(np.ceil(min_sample_s / (time.perf_counter() - t))))
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(number[k]):
                f()
            samples[k].append((time.perf_counter() - t) / number[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def _report(times: dict, batch: int, errs, err_key, log) -> dict:
    """images/s and ms per case, with the ratio to "library" and an error where given."""
    res = {}
    for k, v in times.items():
        res[k] = {"images_per_s": batch / v, "ms": 1e3 * v}
        line = f"  {k:28s} {batch / v:8.1f} img/s"
        if "library" in times:
            res[k]["vs_library"] = times["library"] / v
            line += f"  {res[k]['vs_library']:5.2f}x"
        if err_key:
            res[k][err_key] = errs.get(k, 0.0)
            line += f"  {err_key} {res[k][err_key]:.1e}"
        log(line)
    return res


def _setup(batch, latent_dim=256, seed=0):
    model = jaxvae.ConvVAE(latent_dim=latent_dim)
    params = jaxvae.init_params(model, jax.random.key(seed))
    x = jnp.clip(jax.random.normal(jax.random.key(seed + 1), (batch, 64, 64, 1)) * 0.7, -1.5, 1.5)
    return model, params, x


def _blocking(f, *args):
    c = jax.jit(f).lower(*args).compile()
    return lambda: jax.block_until_ready(c(*args)), c


def compare_layers(batch, repeats, log=print) -> dict:
    """Encoder/decoder forward and VJP per conv form vs the library's (ms)."""
    model, params, x = _setup(batch)
    ref_enc, ref_dec = make_model(model)
    mu = ref_enc(params, x)[0]
    out, fns = {}, {}
    for name, kw in [("xla", {}), ("nchw", {"layout": "NCHW"}), ("s2d", {"conv": "s2d"}),
                     ("s2d_dot", {"conv": "s2d_dot"}), ("patches_dot", {"conv": "patches_dot"}),
                     ("subpixel", {"tconv": "subpixel"}),
                     ("subpixel_dot", {"tconv": "subpixel_dot"}),
                     ("phases", {"tconv": "phases"}), ("s2d_t", {"tconv": "s2d_t"}),
                     ("s2d_t_dot", {"tconv": "s2d_t_dot"})]:
        enc, dec = make_model(model, **kw)
        if name in ("xla", "nchw") or "conv" in kw:
            e = _rel(jaxvae.encode(model, params, x)[0], enc(params, x)[0])
            out[f"enc[{name}].err"] = e
            fns[f"enc_fwd[{name}]"] = _blocking(lambda p, x, enc=enc: enc(p, x), params, x)[0]
            fns[f"enc_vjp[{name}]"] = _blocking(
                lambda p, x, c, enc=enc: jax.vjp(lambda x: enc(p, x)[0], x)[1](c)[0],
                params, x, mu)[0]
        if name in ("xla", "nchw") or "tconv" in kw:
            out[f"dec[{name}].err"] = _rel(jaxvae.decode(model, params, mu), dec(params, mu))
            fns[f"dec_fwd[{name}]"] = _blocking(lambda p, z, dec=dec: dec(p, z), params, mu)[0]
            fns[f"dec_vjp[{name}]"] = _blocking(
                lambda p, z, c, dec=dec: jax.vjp(lambda z: dec(p, z), z)[1](c)[0],
                params, mu, x)[0]
    t = time_interleaved(fns, repeats)
    out.update({k: 1e3 * v for k, v in t.items()})
    for k, v in out.items():
        log(f"  {k:28s} {v:10.3g}")
    return out


def compare_maps(batch, repeats, log=print) -> dict:
    """Fused gradient maps: library vs conv forms x encoder-VJP modes (img/s, errors)."""
    model, params, x = _setup(batch)
    ref = jaxvae.anomaly_maps(model, params, x, predictors=GRADIENT_MAPS)
    fns, errs = {}, {}
    fns["library"] = _blocking(lambda p, x: jaxvae.anomaly_maps(
        model, p, x, predictors=GRADIENT_MAPS), params, x)[0]
    configs = {"xla+vmap": ({}, "vmap"), "xla+separate": ({}, "separate"),
               "xla+concat": ({}, "concat"), "nchw+vmap": ({"layout": "NCHW"}, "vmap"),
               "s2d+xla+vmap": ({"conv": "s2d"}, "vmap"),
               "s2d+xla+separate": ({"conv": "s2d"}, "separate"),
               "xla+s2d_t+vmap": ({"tconv": "s2d_t"}, "vmap"),
               "s2d+s2d_t+vmap": ({"conv": "s2d", "tconv": "s2d_t"}, "vmap"),
               "s2d+s2d_t+separate": ({"conv": "s2d", "tconv": "s2d_t"}, "separate"),
               "s2d_dot+s2d_t_dot+vmap": ({"conv": "s2d_dot", "tconv": "s2d_t_dot"}, "vmap"),
               "s2d+subpixel+vmap": ({"conv": "s2d", "tconv": "subpixel"}, "vmap"),
               "s2d+phases+vmap": ({"conv": "s2d", "tconv": "phases"}, "vmap")}
    for name, (kw, mode) in configs.items():
        f = fused_grad_maps(*make_model(model, **kw), enc_vjp=mode)
        call, c = _blocking(f, params, x)
        got = c(params, x)
        errs[name] = max(_rel(ref[k], got[k]) for k in GRADIENT_MAPS)
        fns[name] = call
    return _report(time_interleaved(fns, repeats), batch, errs, "max_rel_err", log)


def compare_projection(batch, repeats, steps=100, log=print) -> dict:
    """Projection: library fori_loop vs scan / Python loop of a jitted step / faster convs."""
    model, params, x = _setup(batch)
    ref = jaxvae.project(model, params, x, steps=steps)[1]
    fns, errs = {}, {}
    fns["library"] = _blocking(lambda p, x: jaxvae.project(model, p, x, steps=steps)[1],
                               params, x)[0]
    for name, kw, loop in [("xla+scan", {}, "scan"),
                           ("s2d+s2d_t+fori", {"conv": "s2d", "tconv": "s2d_t"}, "fori")]:
        f = projection_fn(*make_model(model, **kw), steps=steps, loop=loop)[0]
        call, c = _blocking(f, params, x)
        errs[name] = _rel(ref, c(params, x))
        fns[name] = call
    for name, kw in [("xla", {}), ("s2d+s2d_t", {"conv": "s2d", "tconv": "s2d_t"})]:
        for chunk in (1, 10):
            run = chunked_projection(*make_model(model, **kw), steps=steps, chunk=chunk)
            label = f"{name}+python_loop" + (f"_chunk{chunk}" if chunk > 1 else "")
            f = functools.partial(run, params, x)
            errs[label] = _rel(ref, f())
            fns[label] = f
    return _report(time_interleaved(fns, repeats, min_sample_s=0.0), batch, errs,
                   "max_rel_err", log)


def train_step_fn(encode, decode, *, beta=1.0, lr=1e-4):
    """An optax Adam step of the batch-mean beta-ELBO on the variant model (as the harness's)."""
    opt = optax.adam(lr)

    def loss_fn(params, x, key):
        mu, ls = encode(params, x)
        z = mu + jnp.exp(ls) * jax.random.normal(key, mu.shape)
        return jnp.mean(losses.beta_elbo(x, decode(params, z), mu, ls, beta)[0])

    def step(params, opt_state, x, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return opt, step, loss_fn


def compare_train(batch, repeats, log=print) -> dict:
    """Train step: flax model.apply (the harness's) vs the same on faster conv forms."""
    from benchmarks.harness import make_jax_train_step
    model, params, x = _setup(batch)
    key = jax.random.key(5)
    init, lib_step = make_jax_train_step(model)
    state = init(params)
    i0 = jnp.zeros((), jnp.int32)
    lib = jax.jit(lib_step).lower(params, state, x, key, i0).compile()
    fns = {"library": lambda: jax.block_until_ready(lib(params, state, x, key, i0))}
    ref_loss = train_step_fn(*make_model(model))[2]
    g_ref = jax.jit(jax.grad(ref_loss))(params, x, key)
    errs = {}
    for name, kw in [("xla", {}), ("s2d+s2d_t", {"conv": "s2d", "tconv": "s2d_t"}),
                     ("s2d+xla", {"conv": "s2d"}), ("xla+s2d_t", {"tconv": "s2d_t"}),
                     ("xla+s2d_t_dot", {"tconv": "s2d_t_dot"}),
                     ("s2d_dot+s2d_t", {"conv": "s2d_dot", "tconv": "s2d_t"})]:
        opt, step, loss_fn = train_step_fn(*make_model(model, **kw))
        g = jax.jit(jax.grad(loss_fn))(params, x, key)
        errs[name] = max(_rel(a, b) for a, b in zip(jax.tree_util.tree_leaves(g_ref),
                                                    jax.tree_util.tree_leaves(g), strict=True))
        c = jax.jit(step).lower(params, opt.init(params), x, key).compile()
        st = opt.init(params)
        fns[name] = functools.partial(lambda c, st: jax.block_until_ready(c(params, st, x, key)),
                                      c, st)
    return _report(time_interleaved(fns, repeats), batch, errs, "max_rel_err_grads", log)


def compare_chunks(batch, repeats, log=print) -> dict:
    """Images per compiled call at one batch size: the maps' chunk_size and the train step's
    micro_batch (0 = the whole batch in one piece)."""
    from jaxvae.train import make_train_step
    model, params, x = _setup(batch)
    opt_state, key = optax.adam(1e-4).init(params), jax.random.key(5)
    fns = {}
    for c in (0, 32, 64, 128):
        if c < batch:
            fns[f"maps[chunk={c}]"] = functools.partial(lambda c: jax.block_until_ready(
                jaxvae.anomaly_maps(model, params, x, predictors=GRADIENT_MAPS, chunk_size=c)), c)
    for m in (0, 16, 32, 64):
        if m < batch:
            step = make_train_step(model, lr=1e-4, beta=1.0, micro_batch=m)
            fns[f"train[micro={m}]"] = functools.partial(
                lambda s: jax.block_until_ready(s(params, opt_state, x, key)), step)
    return _report(time_interleaved(fns, repeats), batch, None, None, log)


FLAG_SETS = ("", "--xla_cpu_use_onednn=true", "--xla_cpu_use_xnnpack=true",
             "--xla_cpu_enable_fast_math=true", "--xla_cpu_use_thunk_runtime=false",
             "--xla_cpu_multi_thread_eigen=false")


def compare_flags(batch, repeats, log=print) -> dict:
    """Library fused maps under XLA_FLAGS sets, each in a fresh process (flags are read once)."""
    res = {}
    for flags in FLAG_SETS:
        env = dict(os.environ, XLA_FLAGS=flags)
        p = subprocess.run([sys.executable, "-m", "benchmarks.variants", "--_flags-child",
                            "--batch", str(batch), "--repeats", str(repeats)],
                           env=env, capture_output=True, text=True, check=False)
        try:
            res[flags or "(none)"] = json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            res[flags or "(none)"] = {"error": (p.stderr or p.stdout)[-300:]}
        log(f"  {flags or '(none)':40s} {res[flags or '(none)']}")
    return res


def _flags_child(batch, repeats):
    model, params, x = _setup(batch)
    ref = jaxvae.anomaly_maps(model, params, x, predictors=GRADIENT_MAPS)
    fns = {"library": _blocking(lambda p, x: jaxvae.anomaly_maps(
        model, p, x, predictors=GRADIENT_MAPS), params, x)[0]}
    f = fused_grad_maps(*make_model(model, conv="s2d", tconv="s2d_t"))
    call, c = _blocking(f, params, x)
    got = c(params, x)
    fns["s2d+s2d_t"] = call
    t = time_interleaved(fns, repeats)
    print(json.dumps({k: batch / v for k, v in t.items()} | {
        "err": max(_rel(ref[k], got[k]) for k in GRADIENT_MAPS)}))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.variants")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--parts", nargs="+",
                   default=["layers", "maps", "projection", "train", "chunks", "flags"])
    p.add_argument("--chunks-batch", type=int, default=256)
    p.add_argument("--projection-batch", type=int, default=16)
    p.add_argument("--projection-steps", type=int, default=20,
                   help="Adam steps (per-step cost is what differs between loop forms)")
    p.add_argument("--out")
    p.add_argument("--_flags-child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._flags_child:
        return _flags_child(a.batch, a.repeats)
    res = {"loadavg_start": os.getloadavg(), "batch": a.batch}
    parts = {"layers": functools.partial(compare_layers, a.batch, a.repeats),
             "maps": functools.partial(compare_maps, a.batch, a.repeats),
             "projection": functools.partial(compare_projection, a.projection_batch,
                                             max(3, a.repeats // 2), a.projection_steps),
             "train": functools.partial(compare_train, a.batch, a.repeats),
             "chunks": functools.partial(compare_chunks, a.chunks_batch, a.repeats),
             "flags": functools.partial(compare_flags, a.batch, a.repeats)}
    for part in a.parts:
        print(f"{part}:")
        res[part] = parts[part]()
    res["loadavg_end"] = os.getloadavg()
    if a.out:
        write_text(a.out, json.dumps(res, indent=1) + "\n", overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
