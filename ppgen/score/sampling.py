"""Langevin samplers driven by a score, and an isotropic Gaussian mixture with analytic scores.

Unadjusted Langevin dynamics ``x <- x + eta s(x) + sqrt(2 eta) z``, ``z ~ N(0, I)``, samples
``p`` as ``eta -> 0`` and steps -> infinity, but mixes between separated modes only through
low-density regions where the score is poorly learned, and it never corrects the relative mode
weights of its initialization. Annealed Langevin (Song & Ermon 2019, Algorithm 1) runs it down a
ladder of noise levels, where the heavily noised density joins the modes.
The ladder and the step sizes can be set from the data: :mod:`ppgen.score.ladder`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["GaussianMixture", "LangevinResult", "annealed_langevin", "denoise_step", "langevin"]


class LangevinResult(tuple):
    """``(x, trajectory)``: final samples ``(N, D)`` and, when asked, the states
    ``(K, N, D)`` after every ``keep_every``-th step (``None`` otherwise)."""

    def __new__(cls, x: torch.Tensor, trajectory: Optional[torch.Tensor]):
        return super().__new__(cls, (x, trajectory))

    @property
    def x(self) -> torch.Tensor:
        return self[0]

    @property
    def trajectory(self) -> Optional[torch.Tensor]:
        return self[1]


def _check(x0: torch.Tensor, eta: float, steps: int) -> None:
    if not isinstance(x0, torch.Tensor) or x0.ndim != 2:
        raise ValueError(f"x0 must be a tensor of shape (n, dim), got {getattr(x0, 'shape', type(x0))}")
    if not (isinstance(eta, (int, float)) and eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta (step size) must be a positive finite number, got {eta!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


@torch.no_grad()
def langevin(
    score: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    eta: float,
    steps: int,
    keep_every: int = 0,
    generator: Optional[torch.Generator] = None,
) -> LangevinResult:
    """Unadjusted Langevin dynamics ``x <- x + eta s(x) + sqrt(2 eta) z``.

    :param score: ``(N, D) -> (N, D)`` score function.
    :param x0: initial states ``(N, D)``.
    :param eta: step size.
    :param steps: number of steps.
    :param keep_every: keep the state every this many steps (0: no trajectory).
    :param generator: torch generator for the noise (on ``x0``'s device).
    """
    _check(x0, eta, steps)
    x, kept = x0.clone(), [x0.clone()] if keep_every else []
    for t in range(steps):
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + eta * score(x) + math.sqrt(2 * eta) * z
        if keep_every and (t + 1) % keep_every == 0:
            kept.append(x.clone())
    return LangevinResult(x, torch.stack(kept) if kept else None)


@torch.no_grad()
def annealed_langevin(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    sigmas: Union[torch.Tensor, Sequence[float]],
    eta: float,
    steps_per_level: int,
    denoise: bool = False,
    keep_every: int = 0,
    generator: Optional[torch.Generator] = None,
) -> LangevinResult:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

    At level ``sigma_i`` (descending) run ``steps_per_level`` Langevin steps with step size
    ``eta_i = eta * sigma_i^2 / sigma_L^2`` on the noise-conditional score ``s(x, sigma_i)``.

    :param score: ``(x (N, D), sigma (N,)) -> (N, D)``.
    :param x0: initial states ``(N, D)``, e.g. uniform noise.
    :param sigmas: noise levels ``(L,)``, descending.
    :param eta: step size at the smallest level.
    :param denoise: finish with one Tweedie step ``x + sigma_L^2 s(x, sigma_L)`` (Jolicoeur-Martineau
        et al. 2021), which removes the last level's noise from the samples.
    :param keep_every: keep the state every this many steps, counted across levels (0: none).
    """
    _check(x0, eta, steps_per_level)
    sigmas = torch.as_tensor(sigmas, dtype=x0.dtype, device=x0.device)
    if sigmas.ndim != 1 or not (sigmas > 0).all() or (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError(f"sigmas must be a 1-d tensor of positive, descending noise levels, got {sigmas}")
    x, kept, t = x0.clone(), [x0.clone()] if keep_every else [], 0
    for sigma in sigmas:
        step = eta * float(sigma / sigmas[-1]) ** 2
        level = sigma.expand(x.shape[0])
        for _ in range(steps_per_level):
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + step * score(x, level) + math.sqrt(2 * step) * z
            t += 1
            if keep_every and t % keep_every == 0:
                kept.append(x.clone())
    if denoise:
        x = denoise_step(score, x, sigmas[-1])
    return LangevinResult(x, torch.stack(kept) if kept else None)


@torch.no_grad()
def denoise_step(score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 sigma: Union[float, torch.Tensor]) -> torch.Tensor:
    """Tweedie's formula ``E[x_0 | x] = x + sigma^2 grad log p_sigma(x)``: the posterior mean of the
    clean point given ``x = x_0 + sigma z``, the last step of annealed Langevin that removes the
    smallest level's noise (Jolicoeur-Martineau et al. 2021; Song & Ermon 2020).

    :param score: ``(x (N, D), sigma (N,)) -> (N, D)``, the score of the ``sigma``-noised data.
    :param x: ``(N, D)``.
    :param sigma: the noise level, a number or a 0-d tensor.
    :returns: ``(N, D)``.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return x + sigma**2 * score(x, sigma.expand(x.shape[0]))


class GaussianMixture:
    """Isotropic Gaussian mixture ``sum_k w_k N(mu_k, std^2 I)`` with exact log density and score,
    and the same for its convolution with ``N(0, sigma^2 I)`` (the DSM target): a known answer
    for score matching and Langevin samplers.

    :param weights: ``(K,)`` mixture weights (normalized here).
    :param means: ``(K, D)`` component means.
    :param std: common component standard deviation.
    """

    def __init__(self, weights: Sequence[float], means: Sequence[Sequence[float]], std: float = 1.0):
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.means = torch.as_tensor(means, dtype=torch.float32)
        if self.means.ndim != 2 or self.weights.shape != self.means.shape[:1] or (self.weights <= 0).any():
            raise ValueError(
                f"weights must be (K,) positive and means (K, D), got {tuple(self.weights.shape)} "
                f"and {tuple(self.means.shape)}"
            )
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        self.weights = self.weights / self.weights.sum()
        self.std = float(std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: Optional[torch.Generator] = None, sigma: float = 0.0) -> torch.Tensor:
        """``n`` draws ``(n, D)``, from the mixture convolved with ``N(0, sigma^2 I)`` if ``sigma``."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        s = math.sqrt(self.std**2 + sigma**2)
        return self.means[k] + s * torch.randn(n, self.dim, generator=generator)

    def _resp(self, x: torch.Tensor, var: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu = self.means.to(x)
        diff = x[:, None, :] - mu  # (N, K, D)
        logits = self.weights.to(x).log() - 0.5 * diff.pow(2).sum(-1) / var
        return diff, logits, logits.softmax(-1)

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Log density ``(N,)`` at ``x (N, D)`` (of the ``sigma``-noised mixture if ``sigma``)."""
        var = self.std**2 + sigma**2
        _, logits, _ = self._resp(x, var)
        return logits.logsumexp(-1) - 0.5 * self.dim * math.log(2 * math.pi * var)

    def score(self, x: torch.Tensor, sigma: Union[float, torch.Tensor] = 0.0) -> torch.Tensor:
        """``grad_x log p_sigma(x)``, shape ``(N, D)``; ``sigma`` a number or an ``(N,)`` tensor
        of levels, one per point (the annealed sampler's calling convention)."""
        if isinstance(sigma, torch.Tensor) and sigma.numel() > 1:
            if not torch.allclose(sigma, sigma.flatten()[0]):
                return torch.stack([self.score(xi[None], float(si))[0] for xi, si in zip(x, sigma)])
            sigma = float(sigma.flatten()[0])
        var = self.std**2 + float(sigma) ** 2
        diff, _, r = self._resp(x, var)
        return -(r[..., None] * diff).sum(1) / var

    def mode_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction ``(K,)`` of the points ``x`` nearest to each component mean."""
        k = torch.cdist(x, self.means.to(x)).argmin(-1)
        return torch.bincount(k, minlength=len(self.weights)).float() / x.shape[0]
