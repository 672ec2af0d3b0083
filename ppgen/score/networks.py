"""Score networks: an MLP and a small U-Net, noise-free ``s(x)`` or noise-conditional ``s(x, sigma)``.

Noise-conditional nets come in two parametrizations, both returning the score of the noised data:

- **preconditioned** (``sigma_data`` given; the default of :class:`ppgen.score.ScoreConfig`), after
  Karras et al. (2022), *Elucidating the design space of diffusion-based generative models* (EDM):
  the network ``F`` sees ``c_in (x - mu)`` with ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` (unit
  scale at every level) and the noise level as a Fourier embedding of ``c_noise = log(sigma) / 4``
  added to every hidden layer; it predicts the denoiser
  ``D = mu + c_skip (x - mu) + c_out F`` with ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``,
  ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``, and the score is Tweedie's
  ``(D - x) / sigma^2 = -(x - mu) / (sigma^2 + sigma_data^2) + c_out F / sigma^2``. With ``F = 0`` it
  is the exact score of ``N(mu, sigma_data^2 I)`` noised at ``sigma``, and the denoising target of
  ``F``, ``(x0 - mu - c_skip (x - mu)) / c_out``, has unit variance at every ``sigma`` for such data.
  With ``data_range = (lo, hi)`` (the smallest and largest training entry) ``D`` is clamped to
  ``[lo, hi]``: the posterior mean ``E[x0 | x]`` lies there, so the clamp only moves ``D`` towards
  it, and far from the data the score points back into the box (without it, annealed Langevin
  on Fashion-MNIST escaped to where the MLP's extrapolation pushes outward, and overflowed).
- **legacy** (``sigma_data`` None), Song & Ermon (2020), technique 3: ``log sigma`` appended to the
  input (raw scale) and the output divided by ``sigma``. Kept so runs trained with it still load.

Inputs and outputs are flat ``(B, D)``, the calling convention of :mod:`ppgen.score.objectives`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ppgen.nets import mlp

__all__ = ["ScoreNet", "UNetScore", "NoiseEmbedding", "edm_coefficients"]


def edm_coefficients(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_in, c_skip, c_out, c_noise)`` of Karras et al. (2022), Table 1, for noise levels ``sigma``
    (any shape; the results have its shape)."""
    var = sigma**2 + sigma_data**2
    return var.rsqrt(), sigma_data**2 / var, sigma * sigma_data * var.rsqrt(), sigma.log() / 4


class NoiseEmbedding(nn.Module):
    """``c_noise (B, 1) -> (B, width)``: ``c_noise`` with its sines and cosines at ``n_freq`` fixed
    frequencies ``pi * 2^(k/2)`` rad per unit of ``c_noise = log(sigma)/4``, ``k = 0..n_freq-1``,
    followed by a two-layer SiLU MLP. ``n_freq`` 12 (the first runs) reaches 142 rad, over 2.8 rad
    between neighbouring levels of a 98-level ladder, nearly decoupling them; 5 stops at 12.6."""

    def __init__(self, width: int, n_freq: int = 12):
        super().__init__()
        if not isinstance(n_freq, int) or n_freq < 0:
            raise ValueError(f"n_freq (Fourier frequencies of the noise embedding) must be an integer >= 0, got {n_freq!r}")
        self.register_buffer("freq", math.pi * 2.0 ** (torch.arange(n_freq) / 2), persistent=False)
        self.net = nn.Sequential(nn.Linear(2 * n_freq + 1, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        a = c_noise * self.freq.to(c_noise)
        return self.net(torch.cat([c_noise, a.sin(), a.cos()], -1))


def _check_sigma_data(sigma_data: Optional[float], data_mean: float, data_range: Optional[tuple]) -> None:
    if data_range is not None and not (len(data_range) == 2 and data_range[0] < data_range[1]):
        raise ValueError(f"data_range must be (min, max) with min < max, or None, got {data_range!r}")
    if data_range is not None and sigma_data is None:
        raise ValueError("data_range bounds the preconditioned denoiser: it needs sigma_data")
    if sigma_data is not None and not (isinstance(sigma_data, (int, float)) and 0 < sigma_data < math.inf):
        raise ValueError(f"sigma_data must be a positive finite number (or None: no preconditioning), got {sigma_data!r}")
    if not (isinstance(data_mean, (int, float)) and math.isfinite(data_mean)):
        raise ValueError(f"data_mean must be a finite number, got {data_mean!r}")


class ScoreNet(nn.Module):
    """MLP score network ``(B, D) -> (B, D)``.

    ``conditional=False``: :func:`ppgen.nets.mlp`, ``s(x)``. ``conditional=True`` takes
    ``(x, sigma)``: with ``sigma_data`` given, EDM-preconditioned (module docstring) with the
    noise embedding added to every hidden layer's pre-activation; with ``sigma_data`` None, the
    legacy ``mlp([x, log sigma]) / sigma``. Smooth activations (SiLU) keep ``d s / d x``
    informative for the implicit and sliced objectives.

    :param sigma_data: the data's standard deviation (all coordinates pooled), or None.
    :param data_mean: the data's mean ``mu`` (pooled), used with ``sigma_data``.
    :param data_range: ``(lo, hi)`` the range of the data's entries, the denoiser is clamped to; or None.
    :param noise_freqs: Fourier frequencies of the noise embedding (:class:`NoiseEmbedding`), with ``sigma_data``.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (128, 128), conditional: bool = False,
                 sigma_data: Optional[float] = None, data_mean: float = 0.0,
                 data_range: Optional[tuple[float, float]] = None, noise_freqs: int = 12):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        _check_sigma_data(sigma_data, data_mean, data_range)
        if sigma_data is not None and not conditional:
            raise ValueError("sigma_data (preconditioning) needs a noise-conditional net: pass conditional=True")
        self.dim, self.conditional = dim, conditional
        self.sigma_data, self.data_mean = (None if sigma_data is None else float(sigma_data)), float(data_mean)
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        if self.sigma_data is None:
            self.net = mlp([dim + int(conditional), *hidden, dim], activation=nn.SiLU)
            return
        widths = [dim, *hidden]
        emb = max(64, min(hidden, default=64) // 2)
        self.embed = NoiseEmbedding(emb, noise_freqs)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.emb_proj = nn.ModuleList(nn.Linear(emb, b) for b in widths[1:])
        self.out = nn.Linear(widths[-1], dim)

    def forward(self, x: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"score net expects inputs of width {self.dim}, got shape {tuple(x.shape)}")
        if not self.conditional:
            return self.net(x)
        sigma = _sigma_column(sigma, x)
        if self.sigma_data is None:
            return self.net(torch.cat([x, sigma.log()], -1)) / sigma
        c_in, _, c_out, c_noise = edm_coefficients(sigma, self.sigma_data)
        xc = x - self.data_mean
        e, h = self.embed(c_noise), c_in * xc
        for layer, proj in zip(self.layers, self.emb_proj):
            h = F.silu(layer(h) + proj(e))
        return _edm_score(self.out(h), x, xc, sigma, c_out, self.sigma_data, self.data_range)


def _edm_score(f: torch.Tensor, x: torch.Tensor, xc: torch.Tensor, sigma: torch.Tensor, c_out: torch.Tensor,
               sigma_data: float, data_range: Optional[tuple[float, float]]) -> torch.Tensor:
    # (D - x) / sigma^2 with D = mu + c_skip (x - mu) + c_out F, written without the cancellation of D - x
    s = c_out / sigma**2 * f - xc / (sigma**2 + sigma_data**2)
    if data_range is None:
        return s
    d = x + sigma**2 * s  # the denoiser; E[x0 | x] lies in the data's range, so project D onto it
    return s + (d.clamp(*data_range) - d) / sigma**2


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
    MNIST-family); the noise level enters every block through a learned embedding. With
    ``sigma_data`` given it is EDM-preconditioned (module docstring; embedding of
    ``c_noise = log(sigma)/4`` by :class:`NoiseEmbedding`); with None, the legacy net of
    Song & Ermon (2019/2020): an MLP embedding of ``log sigma``, raw input, output divided by ``sigma``.
    """

    def __init__(self, image_shape: Sequence[int] = (1, 28, 28), width: int = 32,
                 sigma_data: Optional[float] = None, data_mean: float = 0.0,
                 data_range: Optional[tuple[float, float]] = None, noise_freqs: int = 12):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"UNetScore needs image height and width divisible by 4, got {h}x{w}")
        _check_sigma_data(sigma_data, data_mean, data_range)
        self.image_shape, self.dim, self.conditional = tuple(image_shape), c * h * w, True
        self.sigma_data, self.data_mean = (None if sigma_data is None else float(sigma_data)), float(data_mean)
        self.data_range = None if data_range is None else (float(data_range[0]), float(data_range[1]))
        e = 4 * width
        if self.sigma_data is None:
            self.embed = nn.Sequential(nn.Linear(1, e), nn.SiLU(), nn.Linear(e, e))
        else:
            self.embed = NoiseEmbedding(e, noise_freqs)
        self.inc = _Block(c, width, e)
        self.down1 = _Block(width, 2 * width, e, stride=2)
        self.down2 = _Block(2 * width, 2 * width, e, stride=2)
        self.mid = _Block(2 * width, 2 * width, e)
        self.up2 = _Block(4 * width, 2 * width, e, up=True)
        self.up1 = _Block(4 * width, width, e, up=True)
        self.out = nn.Conv2d(2 * width, c, 3, 1, 1)

    def _body(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        h0 = self.inc(x.reshape(-1, *self.image_shape), e)
        h1 = self.down1(h0, e)
        h2 = self.down2(h1, e)
        h = self.mid(h2, e)
        h = self.up2(torch.cat([h, h2], 1), e)
        h = self.up1(torch.cat([h, h1], 1), e)
        return self.out(torch.cat([h, h0], 1)).reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor, sigma: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"U-Net expects inputs of width {self.dim}, got shape {tuple(x.shape)}")
        sigma = _sigma_column(sigma, x)
        if self.sigma_data is None:
            return self._body(x, self.embed(sigma.log())) / sigma
        c_in, _, c_out, c_noise = edm_coefficients(sigma, self.sigma_data)
        xc = x - self.data_mean
        return _edm_score(self._body(c_in * xc, self.embed(c_noise)), x, xc, sigma, c_out, self.sigma_data,
                          self.data_range)
