"""The DAE's U-Net in PyTorch, loaded with a JAX U-Net's weights: the reference to check and
time jaxvae.core.unet against (as jaxvae.bench.torch_reference is the ConvVAE's).

Built the way the reference code builds it (Kascenas et al.: NCHW, reflection padding,
weight-standardised 3x3 convolutions with bias, swish, GroupNorm, 2x2 average pooling, 2x2
stride-2 ConvTranspose2d, the skip concatenated after the upsampled map, a 1x1 convolution
out). Importing this module needs torch (the `bench` extra).
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxvae.core.unet import GN_EPS, WS_EPS, UNet, groups_for


class _StandardisedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.reshape(w.shape[0], -1).std(dim=1).reshape(-1, 1, 1, 1) + WS_EPS)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w, self.bias)


class _Block(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(_StandardisedConv(cin, cout, 3), nn.SiLU(),
                         nn.GroupNorm(groups_for(cout), cout, eps=GN_EPS),
                         _StandardisedConv(cout, cout, 3), nn.SiLU(),
                         nn.GroupNorm(groups_for(cout), cout, eps=GN_EPS))


class TorchUNet(nn.Module):
    """(N, C, S, S) -> (N, C, S, S), the same network as `jaxvae.core.unet.UNet`."""

    def __init__(self, depth=4, width=64, in_channels=1):
        super().__init__()
        widths = [width * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList(_Block(c_in, c) for c_in, c in
                                  zip([in_channels, *widths[:-1]], widths, strict=True))
        self.ups = nn.ModuleList(nn.ConvTranspose2d(2 * c, c, 2, stride=2)
                                 for c in reversed(widths[:-1]))
        self.up_blocks = nn.ModuleList(_Block(2 * c, c) for c in reversed(widths[:-1]))
        self.last = nn.Conv2d(width, in_channels, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = F.avg_pool2d(x, 2)
        for up, block, skip in zip(self.ups, self.up_blocks, reversed(skips), strict=True):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.last(x)


def _conv(module, p, *, transpose=False):
    k = np.asarray(p["kernel"], np.float32)  # (kh, kw, in, out)
    # flax's ConvTranspose does not flip its kernel, torch's is the true transpose
    w = k[::-1, ::-1].transpose(2, 3, 0, 1) if transpose else k.transpose(3, 2, 0, 1)
    module.weight.data = torch.from_numpy(np.ascontiguousarray(w))
    module.bias.data = torch.from_numpy(np.asarray(p["bias"], np.float32).copy())


def _norm(module, p):
    module.weight.data = torch.from_numpy(np.asarray(p["scale"], np.float32).copy())
    module.bias.data = torch.from_numpy(np.asarray(p["bias"], np.float32).copy())


def from_jax(model: UNet, params) -> TorchUNet:
    """A TorchUNet with the weights of a JAX `UNet` and its parameters (eval mode)."""
    net = TorchUNet(model.depth, model.width, model.in_channels)
    blocks = [*net.down, *net.up_blocks]  # the flax ConvBlock_i in creation order
    for i, block in enumerate(blocks):
        p = params[f"ConvBlock_{i}"]
        _conv(block[0], p["StandardisedConv_0"])
        _norm(block[2], p["GroupNorm_0"])
        _conv(block[3], p["StandardisedConv_1"])
        _norm(block[5], p["GroupNorm_1"])
    for i, up in enumerate(net.ups):
        _conv(up, params[f"ConvTranspose_{i}"], transpose=True)
    _conv(net.last, params["Conv_0"])
    return net.eval()
