"""Score matching: objectives that learn ``s(x) = grad_x log p(x)`` without a normalizing constant.

Every objective is a plain function ``loss(score_net, x, ...) -> scalar`` on a batch ``x`` of
shape ``(B, D)``. The noise an objective draws (projections, noise levels, ``eps``) may instead be
passed in, batch first, so a data-parallel loop can draw it once for the global batch and give
each process its rows (:mod:`ppgen.score.loop`); the samplers that use a trained score live in
:mod:`ppgen.score.sampling` (the losses / sampling split of score_sde). Score networks are called as ``score_net(x)`` (noise-free
objectives) or ``score_net(x, sigma)`` with ``sigma`` of shape ``(B,)`` (noise-conditional
objectives); :class:`ppgen.score.networks.ScoreNet` and :class:`~ppgen.score.networks.UNetScore`
accept both.

References:

- Hyvarinen (2005), *Estimation of non-normalized statistical models by score matching*.
- Vincent (2011), *A connection between score matching and denoising autoencoders*.
- Song, Garg, Shi & Ermon (2019), *Sliced score matching: a scalable approach to density and
  score estimation*.
- Song & Ermon (2019), *Generative modeling by estimating gradients of the data distribution*.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = [
    "OBJECTIVES",
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
              eps: Optional[torch.Tensor] = None, sigma_data: Optional[float] = None) -> torch.Tensor:
    """Noise-conditional DSM over a ladder (Song & Ermon 2019, eq. 6 with ``lambda = sigma^2``):
    each datapoint draws a level ``sigma`` uniformly from ``sigmas`` and contributes
    ``0.5 ||sigma s(x~, sigma) + eps||^2`` with ``x~ = x + sigma eps``.

    With ``sigma_data`` given, each term is multiplied by ``(sigma^2 + sigma_data^2) / sigma_data^2``,
    the weighting of Karras et al. (2022), eq. 8 and Table 1 (``lambda = (sigma^2 + sigma_data^2) /
    (sigma sigma_data)^2`` on the denoiser error): for the EDM-preconditioned nets of
    :mod:`ppgen.score.networks` the term is then ``0.5 ||F - F*||^2``, the network output's
    error against its target with unit weight at every level. Under ``lambda = sigma^2`` it is
    ``0.5 sigma_data^2 / (sigma^2 + sigma_data^2) ||F - F*||^2``, so levels far above
    ``sigma_data`` hardly train ``F``.

    :param score_net: ``(x (B, D), sigma (B,)) -> (B, D)``.
    :param x: clean batch ``(B, D)``.
    :param sigmas: noise levels ``(L,)``, e.g. :func:`geometric_sigmas`.
    :param levels: optional indices into ``sigmas`` ``(B,)`` to use instead of drawing them.
    :param eps: optional standard normal noise ``(B, D)`` to use instead of drawing it.
    :param sigma_data: the data's standard deviation for the EDM weighting, or None (``lambda = sigma^2``).
    """
    _check_batch(x)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or not (sigmas > 0).all():
        raise ValueError(f"sigmas must be a 1-d tensor of positive noise levels, got {sigmas!r}")
    _check_noise(levels, (x.shape[0],), "levels")
    _check_noise(eps, tuple(x.shape), "eps")
    if sigma_data is not None:
        _check_sigma(sigma_data, "sigma_data")
    if levels is None:
        levels = torch.randint(len(sigmas), (x.shape[0],), device=x.device)
    sigma = sigmas.to(x)[levels.to(x.device)]
    eps = torch.randn_like(x) if eps is None else eps.to(x)
    s = score_net(x + sigma[:, None] * eps, sigma)
    term = 0.5 * (sigma[:, None] * s + eps).pow(2).sum(-1)
    if sigma_data is not None:
        term = term * (sigma**2 + sigma_data**2) / sigma_data**2
    return term.mean()


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
