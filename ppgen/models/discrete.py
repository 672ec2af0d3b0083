"""A VAE with a discrete latent layer: one categorical code per datapoint.

model: ``z ~ OneHotCategorical(1/K)``, ``x ~ Bernoulli(logits=decoder(z))``; guide:
``z ~ OneHotCategorical(logits=encoder(x))``, amortized. ``z`` has no reparameterization, so the
pathwise gradient is unavailable: the guide is trained by score-function estimators (Williams
1992; Mnih & Gregor 2014) or by summing over the K values exactly (``enum``, TraceEnum_ELBO).
With a single categorical layer the evidence ``log p(x) = logsumexp_k log p(x, z=k)`` is exact,
which makes this model a known-answer check of estimators and bounds (cf. Kingma et al. 2014's
M2 for a categorical latent next to a continuous one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppgen.models.helpers import check_batch
from ppgen.nets import mlp

__all__ = ["DiscreteVAE", "DiscreteVAEConfig"]


@dataclasses.dataclass(frozen=True)
class DiscreteVAEConfig:
    """Architecture of a :class:`DiscreteVAE`."""

    num_classes: int = 10  # K, values of the categorical latent
    hidden: tuple[int, ...] = (256,)  # hidden widths of the encoder; the decoder mirrors them

    def build(self, x_dim: int) -> "DiscreteVAE":
        return DiscreteVAE(x_dim, self.num_classes, self.hidden)


class DiscreteVAE(nn.Module):
    """Bernoulli-likelihood VAE whose latent is one K-way categorical (one-hot) per datapoint.

    :param x_dim: observation width ``D`` (flattened pixels, values 0/1).
    :param num_classes: ``K``.
    :param hidden: hidden widths of the MLP encoder ``x -> K logits``; the decoder
        ``one-hot z -> D logits`` mirrors them.
    """

    def __init__(self, x_dim: int, num_classes: int = 10, hidden: Sequence[int] = (256,)):
        super().__init__()
        for name, v in (("x_dim", x_dim), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.x_dim, self.num_classes = x_dim, num_classes
        self.encoder = mlp([x_dim, *hidden, num_classes])
        self.decoder = mlp([num_classes, *reversed(tuple(hidden)), x_dim])

    def model(self, x: torch.Tensor) -> None:
        """``p(z) p(x | z)`` for a batch ``x`` of shape ``(B, D)``; works under parallel
        enumeration of ``z`` (the decoder broadcasts over a leading enumeration dim)."""
        check_batch(x, self.x_dim)
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            probs = x.new_full((self.num_classes,), 1.0 / self.num_classes)
            z = pyro.sample("z", dist.OneHotCategorical(probs))
            lik = dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1)
            pyro.sample("x", lik, obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """``q(z | x) = Categorical(softmax(encoder(x)))`` for ``x`` of shape ``(B, D)``."""
        check_batch(x, self.x_dim)
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.OneHotCategorical(logits=self.encoder(x)))

    def joint_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x, z=k)`` for every datapoint and class: shape ``(B, K)``."""
        check_batch(x, self.x_dim)
        codes = torch.eye(self.num_classes, device=x.device, dtype=x.dtype)
        logits = self.decoder(codes)  # (K, D)
        loglik = dist.Bernoulli(logits=logits[None], validate_args=False).log_prob(x[:, None]).sum(-1)
        return loglik - math.log(self.num_classes)

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` per datapoint, shape ``(B,)``."""
        return torch.logsumexp(self.joint_log_prob(x), -1)

    def exact_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``E_q[log p(x, z) - log q(z | x)]`` per datapoint, shape ``(B,)``, differentiable."""
        logq = torch.log_softmax(self.encoder(x), -1)
        return (logq.exp() * (self.joint_log_prob(x) - logq)).sum(-1)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Pixel probabilities of ``n`` draws ``z ~ p(z)``: shape ``(n, D)``."""
        device = next(self.parameters()).device
        k = torch.randint(self.num_classes, (n,), device=device)
        return torch.sigmoid(self.decoder(nn.functional.one_hot(k, self.num_classes).float()))
