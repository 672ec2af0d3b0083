"""Observation models ``p(x | z)`` for decoders that output one unconstrained number per pixel.

- ``bernoulli``: ``Bernoulli(logits)`` for 0/1 data (binarized images).
- ``gaussian``: ``Normal(loc, sigma)`` for continuous data, ``sigma`` one learned number per pixel
  (``scale=None``) or fixed. A density on the real line, so its ``log p(x)`` is not comparable
  with the Bernoulli's probabilities.
- ``cb``: the continuous Bernoulli of Loaiza-Ganem & Cunningham (2019), a proper density on
  ``[0, 1]`` for grey-level pixels: ``p(x | lam) = C(lam) lam^x (1 - lam)^(1 - x)`` with the
  normalizer ``C(lam)`` that the plain "Bernoulli on grey levels" objective leaves out.

Each likelihood is an ``nn.Module`` (so learned scales are saved with the model) with
``dist(out)`` -> a distribution with event shape ``(D,)``, ``mean(out)`` for pictures, and
``check_data(x)`` that raises ``ValueError`` on data outside its support.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import pyro.distributions as dist
import torch
from torch import nn

from ppgen.data import check_binary

__all__ = ["LIKELIHOODS", "BernoulliLikelihood", "GaussianLikelihood", "ContinuousBernoulliLikelihood",
           "make_likelihood", "check_unit_interval"]


def check_unit_interval(x: torch.Tensor, what: str = "data") -> None:
    """Raise ``ValueError`` unless every value of ``x`` is finite and in ``[0, 1]``."""
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or Inf values; clean the data before training.")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"{what} must lie in [0, 1] for this likelihood, got values in "
            f"[{float(x.min()):.3g}, {float(x.max()):.3g}]"
        )


class BernoulliLikelihood(nn.Module):
    """``x ~ Bernoulli(logits=out)``, 0/1 data."""

    def dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        # Support is checked once per dataset (check_data), not per step.
        return dist.Bernoulli(logits=out, validate_args=False).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)

    def check_data(self, x: torch.Tensor) -> None:
        check_binary(x)


class GaussianLikelihood(nn.Module):
    """``x ~ Normal(out, sigma)`` with ``sigma`` per pixel learned (``scale=None``) or fixed.

    :param x_dim: ``D``.
    :param scale: fixed standard deviation, or ``None`` to learn ``log sigma`` (initial 0.1).
    """

    def __init__(self, x_dim: int, scale: Optional[float] = None):
        super().__init__()
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"gaussian scale must be a positive number or None (learned), got {scale!r}")
        self.fixed = None if scale is None else float(scale)
        if scale is None:
            self.log_scale = nn.Parameter(torch.full((x_dim,), math.log(0.1)))

    def scale(self, like: torch.Tensor) -> torch.Tensor:
        if self.fixed is not None:
            return like.new_full((like.shape[-1],), self.fixed)
        return self.log_scale.clamp(min=math.log(1e-3)).exp()

    def dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(out, self.scale(out)).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def check_data(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError("data contains NaN or Inf values; clean the data before training.")


class ContinuousBernoulliLikelihood(nn.Module):
    """``x ~ ContinuousBernoulli(logits=out)`` on ``[0, 1]`` (Loaiza-Ganem & Cunningham 2019)."""

    def dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=out, validate_args=False).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return dist.ContinuousBernoulli(logits=out, validate_args=False).mean

    def check_data(self, x: torch.Tensor) -> None:
        check_unit_interval(x)


#: name -> constructor ``(x_dim, scale) -> likelihood module``.
LIKELIHOODS: dict[str, Callable[[int, Optional[float]], nn.Module]] = {
    "bernoulli": lambda x_dim, scale=None: BernoulliLikelihood(),
    "gaussian": GaussianLikelihood,
    "cb": lambda x_dim, scale=None: ContinuousBernoulliLikelihood(),
}


def make_likelihood(name: str, x_dim: int, scale: Optional[float] = None) -> nn.Module:
    """The likelihood family ``name`` (one of :data:`LIKELIHOODS`); ``scale`` is the Gaussian's
    fixed standard deviation (``None``: learned)."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name](x_dim, scale)
