"""Score networks: an MLP and a small U-Net, noise-free ``s(x)`` or noise-conditional ``s(x, sigma)``.

Noise-conditional nets return ``s(x) / sigma`` (Song & Ermon 2020, technique 3): the norm of the
noised data's score grows as ``1 / sigma``, so the network itself only learns an ``O(1)`` field.
Inputs and outputs are flat ``(B, D)``, the calling convention of :mod:`ppgen.score.objectives`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ppgen.nets import mlp

__all__ = ["ScoreNet", "UNetScore"]


class ScoreNet(nn.Module):
    """MLP score network ``(B, D) -> (B, D)``, built with :func:`ppgen.nets.mlp`.

    With ``conditional=True`` it takes ``(x, sigma)``: ``log sigma`` is appended to the input and
    the output is divided by ``sigma``, so ``||s|| ~ 1 / sigma`` as the noised score is
    (Song & Ermon 2020, technique 3). Smooth activations (SiLU) keep ``d s / d x`` informative
    for the implicit and sliced objectives.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), conditional: bool = False):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim, self.conditional = dim, conditional
        self.net = mlp([dim + int(conditional), *hidden, dim], activation=nn.SiLU)

    def forward(self, x: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"score net expects inputs of width {self.dim}, got shape {tuple(x.shape)}")
        if not self.conditional:
            return self.net(x)
        sigma = _sigma_column(sigma, x)
        return self.net(torch.cat([x, sigma.log()], -1)) / sigma


def _sigma_column(sigma: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if sigma is None:
        raise ValueError("this score network is noise-conditional: call it as net(x, sigma)")
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]).reshape(-1, 1)


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int, stride: int = 1, up: bool = False):
        super().__init__()
        conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1) if up else nn.Conv2d(c_in, c_out, 3 if stride == 1 else 4, stride, 1)
        self.conv, self.emb, self.norm = conv, nn.Linear(emb, c_out), nn.GroupNorm(8, c_out)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(h) + self.emb(e)[:, :, None, None]))


class UNetScore(nn.Module):
    """A small noise-conditional U-Net for images, flat ``(B, C*H*W) -> (B, C*H*W)``.

    Two stride-2 levels with skip connections (H and W divisible by 4: 8x8 digits and 28x28
    MNIST-family); ``log sigma`` enters every block through a learned embedding and the output is
    divided by ``sigma`` (Song & Ermon 2019/2020).
    """

    def __init__(self, image_shape: Sequence[int] = (1, 28, 28), width: int = 32):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"UNetScore needs image height and width divisible by 4, got {h}x{w}")
        self.image_shape, self.dim, self.conditional = tuple(image_shape), c * h * w, True
        e = 4 * width
        self.embed = nn.Sequential(nn.Linear(1, e), nn.SiLU(), nn.Linear(e, e))
        self.inc = _Block(c, width, e)
        self.down1 = _Block(width, 2 * width, e, stride=2)
        self.down2 = _Block(2 * width, 2 * width, e, stride=2)
        self.mid = _Block(2 * width, 2 * width, e)
        self.up2 = _Block(4 * width, 2 * width, e, up=True)
        self.up1 = _Block(4 * width, width, e, up=True)
        self.out = nn.Conv2d(2 * width, c, 3, 1, 1)

    def forward(self, x: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"U-Net expects inputs of width {self.dim}, got shape {tuple(x.shape)}")
        sigma = _sigma_column(sigma, x)
        e = self.embed(sigma.log())
        h0 = self.inc(x.reshape(-1, *self.image_shape), e)
        h1 = self.down1(h0, e)
        h2 = self.down2(h1, e)
        h = self.mid(h2, e)
        h = self.up2(torch.cat([h, h2], 1), e)
        h = self.up1(torch.cat([h, h1], 1), e)
        return self.out(torch.cat([h, h0], 1)).reshape(x.shape[0], -1) / sigma
