"""Score matching: objectives that learn ``s(x) = grad_x log p(x)`` without a normalizing constant.

Every objective is a plain function ``loss(score_net, x, ...) -> scalar`` on a batch ``x`` of
shape ``(B, D)``. The noise an objective draws (projections, noise levels, ``eps``) may instead be
passed in, batch first, so a data-parallel loop can draw it once for the global batch and give
each process its rows (:mod:`ppgen.score_train`); the samplers that use a trained score live in :mod:`ppgen.langevin` (the
losses / sampling split of score_sde). Score networks are called as ``score_net(x)`` (noise-free
objectives) or ``score_net(x, sigma)`` with ``sigma`` of shape ``(B,)`` (noise-conditional
objectives); :class:`ScoreNet` and :class:`UNetScore` accept both.

References:

- Hyvarinen (2005), *Estimation of non-normalized statistical models by score matching*.
- Vincent (2011), *A connection between score matching and denoising autoencoders*.
- Song, Garg, Shi & Ermon (2019), *Sliced score matching: a scalable approach to density and
  score estimation*.
- Song & Ermon (2019), *Generative modeling by estimating gradients of the data distribution*.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ppgen.nets import mlp

__all__ = [
    "OBJECTIVES",
    "ScoreNet",
    "UNetScore",
    "dae_loss",
    "dae_score",
    "dsm_loss",
    "geometric_sigmas",
    "ism_loss",
    "ncsn_loss",
    "ssm_loss",
]


def _check_batch(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (batch, dim) with batch >= 1, got {tuple(x.shape)}")


def _check_sigma(sigma: float, name: str = "sigma") -> float:
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool):
        raise TypeError(f"{name} must be a positive number, got {type(sigma).__name__}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"{name} must be a positive finite noise level, got {sigma}")
    return float(sigma)


def _check_noise(noise: Optional[torch.Tensor], shape: tuple, name: str) -> None:
    if noise is not None and (not isinstance(noise, torch.Tensor) or tuple(noise.shape) != shape):
        got = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"{name} must be a tensor of shape {shape} (batch first), got {got}")


def geometric_sigmas(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """The noise ladder of Song & Ermon (2019): ``n`` levels from ``sigma_max`` down to
    ``sigma_min`` in constant ratio. Returns a float tensor of shape ``(n,)``, descending."""
    _check_sigma(sigma_max, "sigma_max"), _check_sigma(sigma_min, "sigma_min")
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must not exceed sigma_max ({sigma_max})")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (number of noise levels) must be a positive integer, got {n!r}")
    if n == 1:
        return torch.tensor([float(sigma_max)])
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n))


# --------------------------------------------------------------------------- implicit / sliced SM


def _score_with_input(score_net: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    s = score_net(x)
    if s.shape != x.shape:
        raise ValueError(f"score_net must return the input's shape {tuple(x.shape)}, got {tuple(s.shape)}")
    return x, s


def ism_loss(score_net: Callable, x: torch.Tensor, trace: str = "exact", n_probes: int = 1,
             probes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Implicit score matching (Hyvarinen 2005):
    ``E_x[ 0.5 ||s(x)||^2 + tr(d s(x) / d x) ]``, equal to the Fisher divergence
    ``0.5 E||s - grad log p||^2`` up to a constant.

    :param score_net: ``(B, D) -> (B, D)``.
    :param x: data batch ``(B, D)``.
    :param trace: ``"exact"`` (one backward pass per dimension: cost grows with ``D``) or
        ``"hutchinson"`` (unbiased estimate ``v^T J v`` with Rademacher probes ``v``).
    :param n_probes: Hutchinson probes per datapoint.
    :param probes: optional Rademacher probes ``(B, n_probes, D)`` (entries +-1) to use instead
        of drawing them.
    :returns: scalar loss (mean over the batch), differentiable in the network's parameters.
    """
    _check_batch(x)
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    if trace == "hutchinson":
        return _projected_loss(score_net, x, n_probes, "rademacher", True, probes)
    x, s = _score_with_input(score_net, x)
    tr = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for i in range(x.shape[1]):  # d s_i / d x_i, one backward pass each
        (g,) = torch.autograd.grad(s[:, i].sum(), x, create_graph=True)
        tr = tr + g[:, i]
    return (0.5 * s.pow(2).sum(-1) + tr).mean()


def ssm_loss(
    score_net: Callable, x: torch.Tensor, n_projections: int = 1, variance_reduced: bool = True,
    projections: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sliced score matching (Song et al. 2019): ``E_{x,v}[ v^T J(x) v + 0.5 (v^T s(x))^2 ]``
    with Gaussian projections ``v``; ``variance_reduced=True`` (SSM-VR) replaces the second term
    by its expectation over ``v``, ``0.5 ||s(x)||^2``.

    :param score_net: ``(B, D) -> (B, D)``.
    :param x: data batch ``(B, D)``.
    :param n_projections: random directions per datapoint.
    :param projections: optional standard normal directions ``(B, n_projections, D)`` to use
        instead of drawing them.
    :returns: scalar loss; one backward pass per projection, whatever ``D`` is.
    """
    _check_batch(x)
    return _projected_loss(score_net, x, n_projections, "gaussian", variance_reduced, projections)


def _projected_loss(score_net: Callable, x: torch.Tensor, n: int, dist: str, variance_reduced: bool,
                    directions: Optional[torch.Tensor] = None) -> torch.Tensor:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of projections must be a positive integer, got {n!r}")
    _check_noise(directions, (x.shape[0], n, x.shape[1]), "projections" if dist == "gaussian" else "probes")
    x, s = _score_with_input(score_net, x)
    total = 0.5 * s.pow(2).sum(-1) if variance_reduced else torch.zeros_like(s[:, 0])
    for j in range(n):
        if directions is not None:
            v = directions[:, j].to(x)
        else:
            v = torch.randn_like(x)
            if dist == "rademacher":
                v = v.sign()
        sv = (s * v).sum(-1)
        (jv,) = torch.autograd.grad(sv.sum(), x, create_graph=True)  # J^T v per row
        total = total + (jv * v).sum(-1) / n
        if not variance_reduced:
            total = total + 0.5 * sv.pow(2) / n
    return total.mean()


# --------------------------------------------------------------------------- denoising SM


def dsm_loss(score_net: Callable, x: torch.Tensor, sigma: float, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Denoising score matching at one noise level (Vincent 2011):
    ``0.5 sigma^2 E||s(x + sigma eps) + eps / sigma||^2``. Its minimizer is the score of the
    noised data ``p_sigma = p * N(0, sigma^2 I)`` (the ``sigma^2`` weight only rescales it).

    :param score_net: ``(B, D) -> (B, D)``, unconditional.
    :param x: clean batch ``(B, D)``.
    :param sigma: noise standard deviation.
    :param eps: optional standard normal noise ``(B, D)`` to use instead of drawing it.
    """
    _check_batch(x)
    sigma = _check_sigma(sigma)
    _check_noise(eps, tuple(x.shape), "eps")
    eps = torch.randn_like(x) if eps is None else eps.to(x)
    s = score_net(x + sigma * eps)
    return 0.5 * (sigma * s + eps).pow(2).sum(-1).mean()


def ncsn_loss(score_net: Callable, x: torch.Tensor, sigmas: torch.Tensor, levels: Optional[torch.Tensor] = None,
              eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Noise-conditional DSM over a ladder (Song & Ermon 2019, eq. 6 with ``lambda = sigma^2``):
    each datapoint draws a level ``sigma`` uniformly from ``sigmas`` and contributes
    ``0.5 ||sigma s(x~, sigma) + eps||^2`` with ``x~ = x + sigma eps``.

    :param score_net: ``(x (B, D), sigma (B,)) -> (B, D)``.
    :param x: clean batch ``(B, D)``.
    :param sigmas: noise levels ``(L,)``, e.g. :func:`geometric_sigmas`.
    :param levels: optional indices into ``sigmas`` ``(B,)`` to use instead of drawing them.
    :param eps: optional standard normal noise ``(B, D)`` to use instead of drawing it.
    """
    _check_batch(x)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not (sigmas > 0).all():
        raise ValueError(f"sigmas must be a 1-d tensor of positive noise levels, got {sigmas!r}")
    _check_noise(levels, (x.shape[0],), "levels")
    _check_noise(eps, tuple(x.shape), "eps")
    if levels is None:
        levels = torch.randint(len(sigmas), (x.shape[0],), device=x.device)
    sigma = sigmas.to(x)[levels.to(x.device)]
    eps = torch.randn_like(x) if eps is None else eps.to(x)
    s = score_net(x + sigma[:, None] * eps, sigma)
    return 0.5 * (sigma[:, None] * s + eps).pow(2).sum(-1).mean()


def dae_loss(denoiser: Callable, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Denoising autoencoder: reconstruct ``x`` from ``x~ = x + sigma eps``, ``E||D(x~) - x||^2``.
    The optimum is ``D(x~) = E[x | x~]``, and by Tweedie's formula :func:`dae_score` turns it into
    the score of the noised data (Vincent 2011, Alain & Bengio 2014)."""
    _check_batch(x)
    sigma = _check_sigma(sigma)
    return (denoiser(x + sigma * torch.randn_like(x)) - x).pow(2).sum(-1).mean()


def dae_score(denoiser: Callable, sigma: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The score ``(D(x~) - x~) / sigma^2`` of the noised data implied by a trained denoiser."""
    sigma = _check_sigma(sigma)
    return lambda x: (denoiser(x) - x) / sigma**2


#: objective name -> one-line description (``ppgen train score --objective``).
OBJECTIVES = {
    "ism": "implicit score matching, exact trace (Hyvarinen 2005)",
    "ism-hutchinson": "implicit score matching, Hutchinson trace estimate",
    "ssm": "sliced score matching, variance-reduced (Song et al. 2019)",
    "dsm": "denoising score matching over a geometric noise ladder (Vincent 2011; Song & Ermon 2019)",
}


# --------------------------------------------------------------------------- networks


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
