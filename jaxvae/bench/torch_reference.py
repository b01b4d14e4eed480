"""PyTorch reference of the ConvVAE, its anomaly maps, projection and train step.

Written the way a PyTorch user would (nn.Module, autograd, torch.optim.Adam) and loaded
with the *same* weights as the Flax model (`from_flax`), so the benchmark harness can
check that both frameworks compute the same maps before it times them. torch is imported
by the caller: `import jaxvae.bench.torch_reference` fails with ImportError where torch is
absent, and the harness then runs JAX-only.

Layouts: torch images are NCHW; Flax images are NHWC. Conversions (tested in
tests/bench/test_harness.py):
  Conv          Flax (kh, kw, in, out) -> torch (out, in, kh, kw)
  ConvTranspose Flax (kh, kw, in, out) -> torch (in, out, kh, kw), spatially flipped
                (Flax correlates the dilated input with the kernel, torch with its flip)
  enc Dense     Flax (h*w*c, 2l) rows in (h, w, c) order -> torch Linear (2l, c*h*w)
  dec Dense     Flax (l, h*w*c) cols in (h, w, c) order -> torch Linear (c*h*w, l)

Images of C channels and 128x128 images follow jaxvae.core.model.ConvVAE (one more stage of
channels[0] features in front at 128) and the maps reduce the channels as
jaxvae.core.predictors does: reconstruction terms and |grad| summed over channels.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
COMBI_GROUP = 64  # as jaxvae.core.predictors.COMBI_GROUP: the reference code's loader batch
GRAD_MAP_VARIANTS = ("naive", "retain_graph", "fwd1_bwd2", "batched_vjp")


def stage_channels(channels=(16, 32, 64, 256), image_size=64) -> tuple[int, ...]:
    """Encoder stage widths of jaxvae.core.model.ConvVAE (its `stage_channels`)."""
    return (channels[0],) * {64: 0, 128: 1}[image_size] + tuple(channels)


class TorchConvVAE(nn.Module):
    """The ConvVAE of jaxvae.core.model in PyTorch (NCHW, no biases, LeakyReLU 0.01)."""

    def __init__(self, latent_dim=256, channels=(16, 32, 64, 256), image_size=64,
                 in_channels=1):
        super().__init__()
        self.latent_dim = latent_dim
        self.channels = stage_channels(channels, image_size)
        self.bottom = image_size // 2 ** len(self.channels)
        cin = [in_channels, *self.channels[:-1]]
        self.enc_convs = nn.ModuleList(
            nn.Conv2d(i, o, 4, stride=2, padding=1, bias=False)
            for i, o in zip(cin, self.channels, strict=True))
        flat = self.bottom**2 * self.channels[-1]
        self.enc_head = nn.Linear(flat, 2 * latent_dim, bias=False)
        self.dec_head = nn.Linear(latent_dim, flat, bias=False)
        dec = [*self.channels[-2::-1], in_channels]
        self.dec_convs = nn.ModuleList(
            nn.ConvTranspose2d(i, o, 4, stride=2, padding=1, bias=False)
            for i, o in zip([self.channels[-1], *dec[:-1]], dec, strict=True))

    def encode(self, x):
        """(N, C, S, S) -> (mu, log_sigma), each (N, latent_dim)."""
        h = x
        for conv in self.enc_convs:
            h = F.leaky_relu(conv(h), 0.01)
        mu, log_sigma = self.enc_head(h.flatten(1)).chunk(2, dim=1)
        return mu, log_sigma

    def decode(self, z):
        """(N, latent_dim) -> (N, C, S, S)."""
        h = F.leaky_relu(self.dec_head(z), 0.01)
        h = h.view(z.shape[0], self.channels[-1], self.bottom, self.bottom)
        for i, conv in enumerate(self.dec_convs):
            h = conv(h)
            if i < len(self.dec_convs) - 1:
                h = F.leaky_relu(h, 0.01)
        return h

    def forward(self, x, eps=None):
        mu, log_sigma = self.encode(x)
        z = mu if eps is None else mu + torch.exp(log_sigma) * eps
        return self.decode(z), mu, log_sigma


def convert_params(params, channels=(16, 32, 64, 256), image_size=64) -> dict:
    """Flax ConvVAE params (pytree of arrays) -> a TorchConvVAE state_dict (float32 tensors).

    channels: the model's four `channels` (the 64 model's); image_size: 64 or 128."""
    channels = stage_channels(channels, image_size)
    b = image_size // 2 ** len(channels)
    c = channels[-1]
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy
    sd = {}
    for i in range(len(channels)):
        sd[f"enc_convs.{i}.weight"] = t(np.transpose(params[f"enc_convs_{i}"]["kernel"],
                                                     (3, 2, 0, 1)))
        k = np.asarray(params[f"dec_convs_{i}"]["kernel"])
        sd[f"dec_convs.{i}.weight"] = t(np.transpose(k[::-1, ::-1], (2, 3, 0, 1)))
    k = np.asarray(params["enc_head"]["kernel"])  # (b*b*c, 2l), rows (h, w, c)
    sd["enc_head.weight"] = t(k.reshape(b, b, c, -1).transpose(3, 2, 0, 1).reshape(k.shape[1], -1))
    k = np.asarray(params["dec_head"]["kernel"])  # (l, b*b*c), cols (h, w, c)
    sd["dec_head.weight"] = t(k.reshape(-1, b, b, c).transpose(3, 1, 2, 0).reshape(-1, k.shape[0]))
    return sd


def from_flax(model, params, device="cpu") -> TorchConvVAE:
    """A TorchConvVAE with the hyper-parameters and weights of a Flax ConvVAE + params."""
    tm = TorchConvVAE(model.latent_dim, tuple(model.channels), model.image_size,
                      model.in_channels)
    tm.load_state_dict(convert_params(params, tuple(model.channels), model.image_size))
    return tm.to(device)


def to_torch(x, device="cpu"):
    """(N, H, W, C) array (numpy / jax) -> (N, C, H, W) float32 torch tensor."""
    return torch.from_numpy(np.array(np.asarray(x, np.float32).transpose(0, 3, 1, 2))).to(device)


# ---- losses (same definitions as jaxvae.core.losses) --------------------------------------------

def rec_nll(x, x_hat):
    return 0.5 * (x - x_hat) ** 2 + HALF_LOG_2PI


def kl_divergence(mu, log_sigma):
    """Per-image KL(N(mu, exp(log_sigma)**2) || N(0, I)), the correct closed form."""
    return 0.5 * (mu**2 + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(1)


# ---- maps ------------------------------------------------------------------------------------

def _gaussian_1d(sigma, device):
    radius = max(1, math.ceil(sigma))
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, device=device) / sigma) ** 2)
    return k / k.sum(), radius


def smooth(maps, sigma=3.0):
    """Zero-padded separable Gaussian blur of (N, 1, H, W) maps (as
    jaxvae.core.predictors.smooth)."""
    if sigma <= 0:
        return maps
    k, r = _gaussian_1d(sigma, maps.device)
    maps = F.conv2d(maps, k.view(1, 1, -1, 1), padding=(r, 0))
    return F.conv2d(maps, k.view(1, 1, 1, -1), padding=(0, r))


def _abs_sum(g):
    """(N, C, H, W) gradient -> (N, 1, H, W) sum over channels of |g| (jaxvae.core.predictors)."""
    return g.abs().sum(1, keepdim=True)


def _rec_sum(model, x, mu):
    return rec_nll(x, model.decode(mu)).sum()


def _grad(loss, x, retain=False):
    return torch.autograd.grad(loss, x, retain_graph=retain)[0]


def grad_maps(model, x, beta=1.0, sigma=3.0, variant="fwd1_bwd2") -> dict:
    """rec_grad, kl_grad, elbo_grad maps of (N, C, H, W) images, (N, H, W) each.

    Variants (all compute the same maps):
      naive         three independent forward + backward passes
      retain_graph  one forward, three backward passes (rec, kl, elbo) on the retained graph
      fwd1_bwd2     one forward, two backward passes; elbo = g_rec + beta * g_kl
      batched_vjp   one forward; decoder VJP once, encoder VJP with both cotangents at once
                    (autograd.grad(is_grads_batched=True), torch's vmap over the backward)
    """
    x = x.detach().requires_grad_(True)
    if variant == "naive":
        g_rec = _grad(_rec_sum(model, x, model.encode(x)[0]), x)
        g_kl = _grad(kl_divergence(*model.encode(x)).sum(), x)
        mu, ls = model.encode(x)
        g_elbo = _grad(_rec_sum(model, x, mu) + beta * kl_divergence(mu, ls).sum(), x)
    elif variant in ("retain_graph", "fwd1_bwd2"):
        mu, ls = model.encode(x)
        rec, kl = _rec_sum(model, x, mu), kl_divergence(mu, ls).sum()
        g_rec = _grad(rec, x, retain=True)
        if variant == "retain_graph":
            g_kl = _grad(kl, x, retain=True)
            g_elbo = _grad(rec + beta * kl, x)
        else:
            g_kl = _grad(kl, x)
            g_elbo = g_rec + beta * g_kl
    elif variant == "batched_vjp":
        mu, ls = model.encode(x)
        mu_d = mu.detach().requires_grad_(True)
        g_mu, g_direct = torch.autograd.grad(_rec_sum(model, x, mu_d), (mu_d, x))
        # closed-form KL gradient; the rec loss does not depend on log_sigma
        kl_mu, kl_ls = mu.detach(), torch.exp(2 * ls.detach()) - 1
        g = torch.autograd.grad((mu, ls), x, grad_outputs=(
            torch.stack([g_mu, kl_mu]), torch.stack([torch.zeros_like(kl_ls), kl_ls])),
            is_grads_batched=True)[0]
        g_rec, g_kl = g[0] + g_direct, g[1]
        g_elbo = g_rec + beta * g_kl
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {GRAD_MAP_VARIANTS}")
    return {k: smooth(_abs_sum(v), sigma)[:, 0] for k, v in
            (("rec_grad", g_rec), ("kl_grad", g_kl), ("elbo_grad", g_elbo))}


def minmax_groups(a, group=COMBI_GROUP):
    """Min-max normalise (N, ...) maps over consecutive groups of `group` images (the last
    may be shorter); group <= 0 normalises over the whole batch (jaxvae's _minmax_groups)."""
    if group <= 0 or group >= a.shape[0]:
        group = a.shape[0]
    out = []
    for g in a.split(group):
        lo, hi = g.min(), g.max()
        out.append((g - lo) / (hi - lo).clamp_min(torch.finfo(a.dtype).tiny))
    return torch.cat(out)


def predictor(model, x, name, beta=1.0, sigma=3.0, combi_group=COMBI_GROUP):
    """One anomaly map alone, the way jaxvae.anomaly_maps(predictors=[name]) computes it.

    combi_group: combi min-max normalises |kl_grad| over consecutive groups of this many
    images (0 = the whole batch), as anomaly_maps(combi_group=...).
    """
    if name == "rec_error":
        with torch.no_grad():
            return ((x - model.decode(model.encode(x)[0])) ** 2).sum(1)
    x = x.detach().requires_grad_(True)
    mu, ls = model.encode(x)
    if name == "rec_grad":
        g = _grad(_rec_sum(model, x, mu), x)
    elif name == "kl_grad":
        g = _grad(kl_divergence(mu, ls).sum(), x)
    elif name == "elbo_grad":
        g = _grad(_rec_sum(model, x, mu) + beta * kl_divergence(mu, ls).sum(), x)
    elif name == "combi":
        g_kl = _abs_sum(_grad(kl_divergence(mu, ls).sum(), x))
        with torch.no_grad():
            nll = rec_nll(x, model.decode(mu)).sum(1, keepdim=True)
            return (smooth(minmax_groups(g_kl, combi_group), sigma) * nll)[:, 0]
    else:
        raise ValueError(f"unknown predictor {name!r}")
    return smooth(_abs_sum(g), sigma)[:, 0]


def project(model, x0, lam=1.0, steps=100, lr=0.03):
    """Proj-Rec-Error with torch.optim.Adam on the pixels of x; returns (x_T, map (N, H, W))."""
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        x_hat = model.decode(model.encode(x)[0])
        # d|x - x0|/dx at 0 is 0 in torch, as the subgradient jaxvae.core.projection uses
        energy = rec_nll(x, x_hat).sum() + lam * (x - x0).abs().sum()
        energy.backward()
        opt.step()
    with torch.no_grad():
        return x.detach(), ((x0 - model.decode(model.encode(x)[0])) ** 2).sum(1)


def elbo_loss(model, x, eps, beta=1.0):
    """Batch mean of the per-image negative beta-ELBO with z = mu + sigma * eps."""
    x_hat, mu, ls = model(x, eps)
    return (rec_nll(x, x_hat).sum((1, 2, 3)) + beta * kl_divergence(mu, ls)).mean()


def train_step(model, opt, x, beta=1.0):
    """One Adam step of the beta-ELBO (reparameterised sample); returns the loss tensor."""
    opt.zero_grad(set_to_none=True)
    loss = elbo_loss(model, x, torch.randn(x.shape[0], model.latent_dim, device=x.device), beta)
    loss.backward()
    opt.step()
    return loss.detach()
