"""GAN objectives by name, and the optimal discriminator they imply.

Discriminators output logits ``d``; ``D(x) = sigmoid(d)``. Each objective is a pair of losses on
logits that both players minimize (Goodfellow et al. 2014, "Generative Adversarial Nets"); the
loop that plays them against each other is :func:`ppgen.gan.loop.adversarial_loop`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GANLoss", "LOSSES", "get_loss", "r1_penalty", "optimal_discriminator", "optimal_discriminator_gap"]


# --------------------------------------------------------------------------- losses


class GANLoss(NamedTuple):
    """A named GAN objective on discriminator logits: both losses are minimized.

    ``d_loss(real (B,), fake (B,)) -> scalar`` and ``g_loss(fake (B,)) -> scalar``.
    """

    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]
    doc: str


def _d_bce(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # -log D(x) - log(1 - D(G(z))) with D = sigmoid(d): softplus(-d) = -log sigmoid(d).
    return F.softplus(-real).mean() + F.softplus(fake).mean()


#: name -> GANLoss. minimax and ns: Goodfellow et al. 2014 (eq. 1 and the "maximize log D(G(z))"
#: remark of section 3); hinge: Lim & Ye 2017, Miyato et al. 2018.
LOSSES: dict[str, GANLoss] = {
    "minimax": GANLoss(_d_bce, lambda fake: -F.softplus(fake).mean(),  # G minimizes log(1 - D(G(z)))
                       "original minimax game: G minimizes log(1 - D(G(z)))"),
    "ns": GANLoss(_d_bce, lambda fake: F.softplus(-fake).mean(),  # G minimizes -log D(G(z))
                  "non-saturating: G maximizes log D(G(z))"),
    "hinge": GANLoss(lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
                     lambda fake: -fake.mean(), "hinge loss (Lim & Ye 2017)"),
}


def get_loss(name: str) -> GANLoss:
    """The :class:`GANLoss` registered as ``name`` in :data:`LOSSES`."""
    if name not in LOSSES:
        raise ValueError(f"unknown GAN loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def r1_penalty(real_logits: torch.Tensor, x: torch.Tensor, gamma: float) -> torch.Tensor:
    """The zero-centred gradient penalty on real data, ``gamma / 2 * E_x ||grad_x d(x)||^2``
    (R1 of Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?", eq. 9),
    with ``d`` the discriminator's logits: it pushes the discriminator to be flat on the data, which
    makes the Dirac-GAN equilibrium locally convergent for simultaneous and alternating steps.

    :param real_logits: ``d(x)`` of shape ``(B,)``, computed from ``x`` with the graph kept.
    :param x: the real batch ``(B, D)``, with ``requires_grad=True`` before ``d(x)`` was computed.
    :param gamma: the penalty weight (``>= 0``).
    :returns: a scalar, differentiable in the discriminator's parameters (double backward).

    On a linear discriminator ``d(x) = w . x + b`` it equals ``gamma / 2 * ||w||^2``.
    """
    if not x.requires_grad:
        raise ValueError("r1_penalty needs the real batch x with requires_grad=True before d(x) is computed; "
                         "call x.requires_grad_(True) first")
    if real_logits.shape != x.shape[:1]:
        raise ValueError(f"real_logits must have shape ({x.shape[0]},) for a batch x of shape {tuple(x.shape)}, "
                         f"got {tuple(real_logits.shape)}")
    # Sum over the batch: each logit depends on its own row only, so this gives every row's gradient.
    (grad,) = torch.autograd.grad(real_logits.sum(), x, create_graph=True)
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(1).mean()


# --------------------------------------------------------------------------- theory check


def optimal_discriminator(log_p_data: torch.Tensor, log_p_g: torch.Tensor) -> torch.Tensor:
    """``D*(x) = p_data(x) / (p_data(x) + p_g(x)) = sigmoid(log p_data - log p_g)``
    (Goodfellow et al. 2014, Proposition 1), from log densities of shape ``(B,)``."""
    if log_p_data.shape != log_p_g.shape:
        raise ValueError(f"log densities must match in shape, got {tuple(log_p_data.shape)} and {tuple(log_p_g.shape)}")
    return torch.sigmoid(log_p_data - log_p_g)


@torch.no_grad()
def optimal_discriminator_gap(discriminator: nn.Module, x: torch.Tensor, log_p_data: torch.Tensor,
                              log_p_g: torch.Tensor) -> float:
    """Mean ``|D(x) - D*(x)|`` over points ``x`` (B, D), with ``D = sigmoid(logits)`` and the known
    log densities ``log_p_data``, ``log_p_g`` (B,) of the data and the (fixed) generator."""
    d = torch.sigmoid(discriminator(x))
    if d.shape != log_p_data.shape:
        raise ValueError(f"discriminator gives shape {tuple(d.shape)} but densities have {tuple(log_p_data.shape)}")
    return float((d - optimal_discriminator(log_p_data, log_p_g)).abs().mean())
