"""Linear-Gaussian latent model with exact evidence and exact posterior (probabilistic PCA;
Tipping & Bishop 1999), a reference for checking evidence estimators.

    z ~ N(0, I_d),   x | z ~ N(W z + b, s^2 I_D)
    p(x) = N(x; b, W W^T + s^2 I_D)
    p(z | x) = N(S W^T (x - b) / s^2, S),   S = (I_d + W^T W / s^2)^{-1}

It is a Pyro model/guide pair like any other: sites ``"z"`` (latent, event dim 1) and ``"x"``
(observed, event dim 1) inside ``pyro.plate("data", B)``.
"""

from __future__ import annotations

from typing import Optional

import pyro
import pyro.distributions as dist
import torch

from ppgen.models.helpers import check_batch

__all__ = ["LinearGaussian"]


class LinearGaussian:
    """The model ``x = W z + b + s * eps`` with exact ``log p(x)`` and posterior.

    :param weight: ``W`` of shape ``(D, d)``.
    :param bias: ``b`` of shape ``(D,)``.
    :param noise: ``s > 0``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, noise: float):
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise ValueError(f"weight must be a (D, d) tensor, got {getattr(weight, 'shape', weight)!r}")
        if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {getattr(bias, 'shape', bias)!r}")
        if not float(noise) > 0:
            raise ValueError(f"noise must be positive, got {noise!r}")
        self.weight, self.bias, self.noise = weight, bias, float(noise)
        self.x_dim, self.z_dim = weight.shape
        eye = torch.eye(self.z_dim, dtype=weight.dtype, device=weight.device)
        self.post_cov = torch.linalg.inv(eye + weight.T @ weight / self.noise**2)  # S, (d, d)
        self.post_scale_tril = torch.linalg.cholesky(self.post_cov)

    @classmethod
    def random(cls, x_dim: int, z_dim: int, noise: float = 0.5, seed: int = 0, dtype=torch.float64) -> "LinearGaussian":
        """A model with ``W, b`` drawn from ``N(0, 1)`` under ``seed``."""
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(x_dim, z_dim, generator=g, dtype=dtype), torch.randn(x_dim, generator=g, dtype=dtype), noise)

    def model(self, x: torch.Tensor) -> None:
        """``p(x, z)`` for ``x`` of shape ``(B, D)``."""
        check_batch(x, self.x_dim)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1))
            loc = z @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(loc, self.noise).to_event(1), obs=x)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """The exact ``p(z | x)``, batch shape ``(B,)``, event shape ``(d,)``."""
        check_batch(x, self.x_dim)
        mean = (x - self.bias) @ self.weight @ self.post_cov.T / self.noise**2
        return dist.MultivariateNormal(mean, scale_tril=self.post_scale_tril)

    def guide(self, x: torch.Tensor) -> None:
        """Exact posterior guide: every importance weight equals ``p(x)``."""
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.posterior(x))

    def mean_field_guide(self, x: torch.Tensor, inflate: float = 1.0) -> None:
        """The best amortized diagonal-Normal guide, ``argmin KL(q || p(z|x))``: the exact mean and
        variances ``1 / Lambda_ii`` (``Lambda = S^{-1}``), what a mean-field encoder converges to.
        ``inflate`` multiplies the scales (1: the optimum)."""
        post = self.posterior(x)
        scale = inflate * torch.linalg.inv(self.post_cov).diagonal().rsqrt()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(post.loc, scale).to_event(1))

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x_n) = log N(x_n; b, W W^T + s^2 I)``, shape ``(B,)``."""
        check_batch(x, self.x_dim)
        eye = torch.eye(self.x_dim, dtype=self.weight.dtype, device=self.weight.device)
        cov = self.weight @ self.weight.T + self.noise**2 * eye
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov).log_prob(x)

    @torch.no_grad()
    def sample(self, n: int, seed: Optional[int] = None) -> torch.Tensor:
        """``n`` draws of ``x``, shape ``(n, D)``."""
        g = torch.Generator(device=self.weight.device)
        if seed is not None:
            g.manual_seed(seed)
        kw = {"generator": g, "dtype": self.weight.dtype, "device": self.weight.device}
        z = torch.randn(n, self.z_dim, **kw)
        return z @ self.weight.T + self.bias + self.noise * torch.randn(n, self.x_dim, **kw)
