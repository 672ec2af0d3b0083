"""Amortized posterior (guide) families for latent-variable models: ``q(z | x)``.

Every family turns the shared :class:`ppgen.nets.Encoder` (trunk + ``loc``/``scale`` heads) into
a Pyro distribution with event shape ``(d,)`` and batch shape ``(B,)``:

- ``diag``: ``N(loc, diag(scale^2))``, the mean-field guide of Kingma & Welling (2014).
- ``fullcov``: ``N(loc, L L^T)`` with the Cholesky factor ``L = mask * L' + diag(sigma)``, where
  ``L'`` is an extra linear head on the encoder's features, ``mask`` keeps its strictly lower
  triangle and ``sigma`` is the encoder's positive scale head. ``L`` is lower triangular with
  diagonal ``sigma``, so ``log |det L| = sum_i log sigma_i`` and no determinant is computed
  (Kingma et al. 2016, section 2; Kingma & Welling 2019, "An Introduction to VAEs", 2.5.1).
- ``iaf``: inverse autoregressive flow (Kingma et al. 2016): the diagonal Normal is pushed
  through a stack of affine autoregressive transforms (Pyro's
  :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive`, "stable" gated
  update), each conditioned on the encoder's features ``h(x)``; the dimensions are reversed
  between steps. Sampling is one parallel pass per step; ``log q`` of a sample uses the
  transforms' cached inverse. The ``stl`` and score-function estimators need ``log q`` as a
  function of the sample's value with parameters fixed (the cache, filled while sampling, carries
  the parameters or is constant), so they score through the real inverse: ``d`` sequential
  network passes per step (:mod:`ppgen.infer.estimators.pathwise`, ``score_function``).
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive, Permute
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from ppgen.nets import Encoder

__all__ = ["POSTERIORS", "encoder_features", "DiagonalPosterior", "FullCovPosterior", "IAFPosterior", "make_posterior"]


def encoder_features(encoder: Encoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The encoder's ``loc (B, d)``, ``scale (B, d)`` and trunk features ``h (B, H)`` in one pass
    (the same numbers as ``encoder(x)``, plus ``h`` for the richer heads)."""
    if x.shape[-1] != encoder.x_dim:
        raise ValueError(
            f"encoder expects inputs of width {encoder.x_dim}, got shape {tuple(x.shape)}; "
            "flatten images to (batch, pixels) and check the dataset matches the model"
        )
    h = F.relu(encoder.trunk(x))
    return encoder.loc(h), F.softplus(encoder.scale(h)) + 1e-4, h


class DiagonalPosterior(nn.Module):
    """``q(z | x) = N(loc(x), diag scale(x)^2)``; no parameters of its own."""

    def __init__(self, z_dim: int, feature_dim: int):
        super().__init__()
        self.z_dim = z_dim

    def forward(self, loc: torch.Tensor, scale: torch.Tensor, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, scale).to_event(1)


class FullCovPosterior(nn.Module):
    """``q(z | x) = N(loc, L L^T)``, ``L = mask * L'(h) + diag(scale)`` (module docstring).

    :param z_dim: ``d``.
    :param feature_dim: width ``H`` of the encoder features the ``L'`` head reads.
    """

    def __init__(self, z_dim: int, feature_dim: int):
        super().__init__()
        self.z_dim = z_dim
        rows, cols = torch.tril_indices(z_dim, z_dim, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.off_diagonal = nn.Linear(feature_dim, max(len(rows), 1))
        # Start at the diagonal guide: L' = 0 until training says otherwise.
        nn.init.zeros_(self.off_diagonal.weight)
        nn.init.zeros_(self.off_diagonal.bias)

    def scale_tril(self, scale: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``L`` of shape ``(B, d, d)``: strictly lower entries from ``h (B, H)``, diagonal ``scale (B, d)``."""
        full = scale.new_zeros(*scale.shape, self.z_dim)
        if len(self.rows):
            full[..., self.rows, self.cols] = self.off_diagonal(h)
        return full + torch.diag_embed(scale)

    def forward(self, loc: torch.Tensor, scale: torch.Tensor, h: torch.Tensor) -> dist.TorchDistribution:
        return dist.MultivariateNormal(loc, scale_tril=self.scale_tril(scale, h))


class IAFPosterior(nn.Module):
    """Inverse autoregressive flow on top of the diagonal Normal (Kingma et al. 2016).

    :param z_dim: ``d``.
    :param feature_dim: width ``H`` of the context ``h(x)`` every step is conditioned on.
    :param flows: number of autoregressive steps ``K``.
    :param hidden: hidden width of each step's MADE network (default ``max(4 d, 32)``).
    """

    def __init__(self, z_dim: int, feature_dim: int, flows: int = 2, hidden: int = 0):
        super().__init__()
        if isinstance(flows, bool) or not isinstance(flows, int) or flows < 1:
            raise ValueError(f"flows must be a positive integer, got {flows!r}")
        if z_dim < 2:
            raise ValueError(f"an IAF posterior needs a latent of at least 2 dimensions, got z_dim={z_dim}")
        width = hidden or max(4 * z_dim, 32)
        self.z_dim = z_dim
        self.steps = nn.ModuleList(
            ConditionalAffineAutoregressive(
                # A fixed (identity) order: Pyro's default is a random permutation held in a buffer,
                # which a checkpoint of parameters alone would not restore.
                ConditionalAutoRegressiveNN(z_dim, feature_dim, [width], permutation=torch.arange(z_dim)),
                stable=True,
            )
            for _ in range(flows)
        )
        self.register_buffer("reverse", torch.arange(z_dim - 1, -1, -1), persistent=False)

    def transforms(self, h: torch.Tensor) -> list:
        """The ``K`` conditioned steps (with reversals between them) for context ``h (B, H)``."""
        out: list = []
        for i, step in enumerate(self.steps):
            if i:
                out.append(Permute(self.reverse))
            out.append(step.condition(h))
        return out

    def forward(self, loc: torch.Tensor, scale: torch.Tensor, h: torch.Tensor) -> dist.TorchDistribution:
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, self.transforms(h))


#: name -> constructor ``(z_dim, feature_dim, **options) -> posterior module``.
POSTERIORS: dict[str, Callable[..., nn.Module]] = {
    "diag": DiagonalPosterior,
    "fullcov": FullCovPosterior,
    "iaf": IAFPosterior,
}


def make_posterior(name: str, z_dim: int, feature_dim: int, flows: int = 2) -> nn.Module:
    """The posterior family ``name`` (one of :data:`POSTERIORS`)."""
    if name not in POSTERIORS:
        raise ValueError(f"unknown posterior {name!r}; choose one of {', '.join(POSTERIORS)}")
    if name == "iaf":
        return IAFPosterior(z_dim, feature_dim, flows)
    return POSTERIORS[name](z_dim, feature_dim)
