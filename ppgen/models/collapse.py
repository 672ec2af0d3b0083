"""Posterior-collapse diagnostics of a trained VAE: per-dimension KL and active units.

- Per-dimension KL: the data mean of ``KL(q(z_j | x) || N(0, 1))`` for each latent dimension
  ``j``, analytic for the Gaussian guides (for ``fullcov`` the marginal ``q(z_j|x) =
  N(loc_j, Sigma_jj)``), a Monte Carlo estimate ``E_q[log q(z_j|x) - log N(z_j; 0, 1)]``
  of the same marginal's moments for ``iaf``. A dimension whose KL is ~0 carries no information
  about ``x``: it has collapsed onto the prior.
- Active units (Burda et al. 2016, section 5.2): dimension ``j`` is active when
  ``A_j = Cov_x(E_q[z_j | x]) > 0.01``. For the IAF the posterior mean is a Monte Carlo mean of
  ``S`` draws; its noise adds ``E_x[Var_q(z_j|x)] / S`` to the variance across ``x``, which is
  subtracted (otherwise with ``S = 64`` a collapsed unit would read ~0.016, "active").
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ppgen.models.vae import VAE, diagonal_normal_kl

__all__ = ["CollapseReport", "posterior_moments", "collapse_report"]


class CollapseReport(NamedTuple):
    """Per-dimension numbers of shape ``(d,)`` (CPU, float64) and their summaries.

    :param kl: data-mean KL per latent dimension (nats).
    :param activity: ``Cov_x(E_q[z_j|x])`` per dimension.
    :param active_units: number of dimensions with ``activity > threshold``.
    :param threshold: the activity threshold (0.01, Burda et al. 2016).
    """

    kl: torch.Tensor
    activity: torch.Tensor
    active_units: int
    threshold: float

    def summary(self) -> dict:
        return {
            "active_units": self.active_units,
            "latent_dim": len(self.kl),
            "kl_total": float(self.kl.sum()),
            "kl_per_dim": [round(float(v), 4) for v in self.kl],
            "activity": [round(float(v), 4) for v in self.activity],
        }


@torch.no_grad()
def posterior_moments(vae: VAE, x: torch.Tensor, num_samples: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-dimension variance of ``q(z | x)`` for ``x (B, D)``: two ``(B, d)`` tensors,
    exact for the Gaussian guides and from ``num_samples`` draws for the IAF."""
    q = vae.posterior_dist(x)
    if vae.posterior_name == "diag":
        return q.base_dist.loc, q.base_dist.scale.pow(2)
    if vae.posterior_name == "fullcov":
        return q.loc, q.scale_tril.pow(2).sum(-1)  # Sigma_jj = sum_k L_jk^2
    z = q.rsample((num_samples,))
    return z.mean(0), z.var(0)


@torch.no_grad()
def collapse_report(vae: VAE, data: torch.Tensor, batch_size: int = 500, num_samples: int = 256,
                    threshold: float = 0.01) -> CollapseReport:
    """Per-dimension KL and active units of ``vae`` on ``data (N, D)`` (module docstring).

    For the IAF guide the KL of dimension ``j`` is that of the Gaussian with the marginal's Monte
    Carlo mean and variance (``num_samples`` draws), a summary rather than the exact marginal KL.
    """
    if not isinstance(data, torch.Tensor) or data.ndim != 2 or len(data) < 2:
        raise ValueError(f"data must be a (N, D) tensor with N >= 2, got {getattr(data, 'shape', data)!r}")
    means, kls, variances = [], [], []
    for i in range(0, len(data), batch_size):
        mean, var = posterior_moments(vae, data[i : i + batch_size], num_samples)
        means.append(mean.double().cpu())
        variances.append(var.double().cpu())
        kls.append(diagonal_normal_kl(mean, var.sqrt()).double().cpu())
    mean = torch.cat(means)
    activity = mean.var(0)
    if vae.posterior_name not in ("diag", "fullcov"):  # Monte Carlo means: remove their noise
        activity = activity - torch.cat(variances).mean(0) / num_samples
    active = int((activity > threshold).sum())
    return CollapseReport(torch.cat(kls).mean(0), activity, active, threshold)
