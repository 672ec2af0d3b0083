"""Statistics of importance weights, shared by every evidence estimator in ppgen.

Given log weights ``log w_k`` (``K`` of them along the last axis) of an unbiased estimator of
``p(x)`` -- importance sampling (:mod:`ppgen.infer.evidence`), AIS (:mod:`ppgen.infer.ais`), the
outer weights of nested IS (:mod:`ppgen.infer.nested_evidence`) -- these functions give the
estimate ``log mean_k w_k`` and its delta-method standard error (:func:`log_mean_exp`), Kish's
effective sample size ``(sum w)^2 / sum w^2`` (:func:`kish_ess`), the Pareto k-hat of the weights
(:func:`psis_khat`; Vehtari et al. 2024, ArviZ ``psislw``) with the sample-size threshold up to
which an estimate is trusted (:func:`khat_threshold`, :func:`khat_untrusted`), and the ``K`` values
of an IWAE ladder (:func:`iwae_ladder_sizes`; Burda et al. 2016).

An estimate is trusted when its k-hat is at most ``min(1 - 1 / log10 K, 0.7)`` (Vehtari et al.
2024, sec. 3.2.4; 0.41 at ``K = 50``, 0.7 from ``K = 2154``). Fewer than 10 weights cannot be
fitted: k-hat is NaN and such an estimate is never counted as trusted. Weights equal up to the
rounding of the arithmetic that made them (an exact proposal, in float32 or float64) have no
tail: k-hat is ``-inf``. All functions take tensors on any device and do no sampling.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["kish_ess", "khat_threshold", "khat_untrusted", "psis_khat", "log_mean_exp", "iwae_ladder_sizes"]


def kish_ess(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` along the last axis of ``log_w``."""
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def khat_threshold(num_samples: int) -> float:
    """The largest Pareto k-hat for which ``num_samples`` importance weights give a trustworthy
    estimate: ``min(1 - 1 / log10 S, 0.7)`` (Vehtari et al. 2024, "Pareto smoothed importance
    sampling", sec. 3.2.4; ArviZ ``loo``'s ``good_k``). 0.41 at ``S = 50``, 0.67 at ``S = 1000``,
    0.7 from ``S = 2154`` on.

    :param num_samples: ``S >= 10`` (k-hat is not fitted below 10 weights).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(
            f"num_samples must be an integer >= 10 for a k-hat threshold, got {num_samples!r}; "
            "with fewer importance weights no Pareto tail can be fitted (use K >= 10)"
        )
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def khat_untrusted(khat: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Boolean mask of the datapoints whose estimate is *not* trusted: k-hat above
    :func:`khat_threshold` ``(num_samples)``, or NaN (``K < 10``, nothing fitted). ``-inf``
    (equal weights) is trusted. Shape of ``khat``."""
    if num_samples < 10:
        return torch.ones_like(khat, dtype=torch.bool)
    return torch.isnan(khat) | (khat > khat_threshold(num_samples))


def psis_khat(log_w: torch.Tensor, rounding: Optional[float] = None) -> torch.Tensor:
    """Pareto k-hat of importance weights along the last axis (ArviZ ``psislw``; Vehtari et al.
    2024). Shape ``(..., K) -> (...)``; NaN where ``K < 10`` (too few weights to fit a tail),
    ``-inf`` where the weights are equal up to rounding (bounded weights, no tail).

    Weights count as equal when ``max - min`` of the log weights is at most
    ``sqrt(rounding) * (1 + max |log w|)``: several thousand float32 rounding units, far above
    what the rounding of an exact proposal's terms was measured to produce (at most ~360 units in
    float32), and a spread so small that the weights are bounded within that factor, which is
    what a negative k-hat means. The only ArviZ call in ppgen.

    :param log_w: log weights ``(..., K)`` (any float dtype; fitted in float64).
    :param rounding: unit roundoff of the arithmetic that *computed* ``log_w`` (e.g.
        ``torch.finfo(torch.float32).eps`` for float32 weights later stored as float64); default
        that of ``log_w.dtype``.
    """
    if rounding is None:
        rounding = torch.finfo(log_w.dtype).eps if log_w.is_floating_point() else torch.finfo(torch.float64).eps
    if not (isinstance(rounding, (int, float)) and 0 < rounding < 1):
        raise ValueError(f"rounding must be a unit roundoff in (0, 1), e.g. torch.finfo(dtype).eps, got {rounding!r}")
    if log_w.shape[-1] < 10:
        return torch.full(log_w.shape[:-1], math.nan, dtype=torch.float64)
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's refactor notice; warnings on large k (k-hat says it).
        import arviz as az

        _, k = az.psislw(np.asarray(log_w.detach().double().cpu().numpy()), reff=1.0)
    k = torch.as_tensor(np.asarray(k, dtype=np.float64)).reshape(log_w.shape[:-1])
    # Equal weights (an exact proposal) have no tail; a fit to rounding noise would mean nothing
    # (float32 rounding gave k-hat = inf here with the old absolute cut-off of 1e-9 nats).
    lw = log_w.detach().double().cpu()
    spread = lw.max(-1).values - lw.min(-1).values
    tol = math.sqrt(rounding) * (1.0 + lw.abs().max(-1).values)
    return torch.where(spread <= tol, torch.full_like(k, -math.inf), k)


def iwae_ladder_sizes(num_samples: int) -> list[int]:
    """``1, 5, 50, 500, ...`` below ``num_samples``, then ``num_samples`` itself."""
    sizes, k = [1], 5
    while k < num_samples:
        sizes.append(k)
        k *= 10
    if sizes[-1] != num_samples:
        sizes.append(num_samples)
    return sizes


def log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance-sampling estimate ``log mean_k w_k`` along ``dim`` of log weights ``log_w``,
    and its delta-method standard error ``sd(w) / (sqrt(K) mean(w))`` (computed with the largest
    weight scaled to 1, so nothing overflows). Shared by IS, AIS and nested IS."""
    k = log_w.shape[dim]
    w = torch.exp(log_w - log_w.max(dim, keepdim=True).values)
    return torch.logsumexp(log_w, dim) - math.log(k), w.std(dim, unbiased=False) / w.mean(dim) / math.sqrt(k)
