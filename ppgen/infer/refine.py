"""Per-datapoint refined posteriors ``q*``: the encoder's ``q(z | x_n)`` optimised locally.

An amortized guide maps every ``x_n`` to the parameters ``lambda_n = f(x_n)`` of one family. Its
ELBO ``L[q]`` falls short of ``log p(x_n)`` by the *inference gap*, which Cremer, Li & Duvenaud
(2018, "Inference Suboptimality in Variational Autoencoders") split in two:

    log p(x) - L[q] = (log p(x) - L[q*])  +  (L[q*] - L[q])
                       approximation gap      amortization gap

where ``q*`` is the best member of the *same family* for that one datapoint. :func:`refine_local`
finds ``q*`` the way they do: start at ``lambda_n = f(x_n)`` and take ``steps`` Adam steps on
datapoint ``n``'s own ELBO, each with ``samples`` reparameterized draws. All ``B`` datapoints of a
chunk are optimised at once: their parameters are tensors ``(B, ...)`` and the summed objective
has a block-diagonal Jacobian, so (Adam being elementwise) each datapoint follows exactly the
path it would follow alone. No Python loop over datapoints; the networks only run forward and
backward to the latent, their own gradients are never formed (``torch.autograd.grad``).

Families (read off the guide's distribution at the latent site, batch shape ``(B,)``):

- ``diag``: ``Normal(loc, scale).to_event(1)``; parameters ``loc``, ``log scale``.
- ``fullcov``: ``MultivariateNormal(loc, scale_tril=L)``; parameters ``loc``, the strictly lower
  triangle of ``L`` and ``log diag L``.

The objective uses the family's exact entropy, ``L = E_q[log p(x, z)] + H[q]``, so only the
model term is sampled. ``L[q]`` and ``L[q*]`` are then re-estimated with ``elbo_samples`` fresh
draws each (no gradients), giving per-datapoint estimates with their standard errors.

The model's log joint ``log p(x_n, z)`` at given latent values (:func:`local_log_joint`) is read
from a trace of the model conditioned on those values under a particle plate, every site summed
per datapoint as the evidence path does (:func:`ppgen.infer.traces.log_density`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import pyro.distributions as dist
import torch
from pyro import poutine

from ppgen.infer.traces import DataPlate, check_positive_int, log_density, trace_particles

__all__ = ["local_log_joint", "family_of", "gaussian", "refine_local", "RefineResult"]


def local_log_joint(model: Callable, args: tuple, kwargs: dict, values: dict, nesting: int, plate: str) -> torch.Tensor:
    """``log p(x_n, z_s)`` of shape ``(S, B)`` for latent ``values`` ``{site: (S, B, *event)}``.

    The model runs once, conditioned on ``values``, inside a particle plate of size ``S`` left of
    its ``nesting`` plates; gradients flow to the values (not needed to the networks).
    """
    s = next(iter(values.values())).shape[0]
    full = nesting + 1
    with DataPlate(plate):
        tr = trace_particles(poutine.condition(model, data=values), args, kwargs, s, full)
    log_p, _, size = log_density(tr, full, s, observed=True)
    tr.nodes.clear()
    if size is None:
        raise ValueError(f"the model has no sample site inside a pyro.plate({plate!r}, ...)")
    return log_p


def family_of(q: dist.Distribution) -> str:
    """``"diag"`` or ``"fullcov"``: the Gaussian family of a guide's site distribution; anything
    else is refused (a refined ``q*`` is searched in the guide's own family)."""
    base = q
    while isinstance(base, dist.Independent):
        base = base.base_dist
    if isinstance(base, dist.Normal) and isinstance(q, dist.Independent) and q.event_shape == base.loc.shape[-1:] \
            and len(q.event_shape) == 1:
        return "diag"
    if isinstance(q, dist.MultivariateNormal):
        return "fullcov"
    raise ValueError(
        f"a refined proposal needs a Gaussian guide site (Normal(loc, scale).to_event(1) or MultivariateNormal, "
        f"as the VAE's 'diag' and 'fullcov' posteriors), got {type(q).__name__} with event shape "
        f"{tuple(q.event_shape)}; use proposal='guide' (the guide itself) or AIS for this guide"
    )


def _init(q: dist.Distribution, family: str) -> list[torch.Tensor]:
    if family == "diag":
        base = q.base_dist
        return [base.loc.detach().clone(), base.scale.detach().log()]
    tril = q.scale_tril.detach()
    d = tril.shape[-1]
    rows, cols = torch.tril_indices(d, d, offset=-1, device=tril.device)
    return [q.loc.detach().clone(), tril[..., rows, cols].clone(), tril.diagonal(dim1=-2, dim2=-1).log()]


def gaussian(family: str, params: list[torch.Tensor]) -> dist.Distribution:
    """The distribution of a family's unconstrained parameters (see :func:`refine_local`)."""
    if family == "diag":
        loc, log_scale = params
        return dist.Normal(loc, log_scale.exp()).to_event(1)
    loc, lower, log_diag = params
    d = loc.shape[-1]
    rows, cols = torch.tril_indices(d, d, offset=-1, device=loc.device)
    tril = torch.diag_embed(log_diag.exp())
    if len(rows):
        tril = tril.clone()
        tril[..., rows, cols] = lower
    return dist.MultivariateNormal(loc, scale_tril=tril)


class RefineResult(NamedTuple):
    """What :func:`refine_local` returns for a chunk of ``B`` datapoints.

    :param q: the refined ``q*`` (batch shape ``(B,)``), parameters detached.
    :param family: ``"diag"`` or ``"fullcov"``.
    :param elbo_q: ``L[q]`` of the starting (encoder) distribution, ``(B,)``.
    :param elbo_q_se: its Monte Carlo standard error, ``(B,)``.
    :param elbo_qstar: ``L[q*]``, ``(B,)``.
    :param elbo_qstar_se: its standard error, ``(B,)``.
    """

    q: dist.Distribution
    family: str
    elbo_q: torch.Tensor
    elbo_q_se: torch.Tensor
    elbo_qstar: torch.Tensor
    elbo_qstar_se: torch.Tensor


def _elbo(model, args, kwargs, site, q, n, nesting, plate, chunk: int = 256):
    """Per-datapoint ELBO estimate from ``n`` draws of ``q`` and its standard error, ``(B,)`` each."""
    parts = []
    for k0 in range(0, n, chunk):
        z = q.sample((min(chunk, n - k0),))
        parts.append(local_log_joint(model, args, kwargs, {site: z}, nesting, plate) - q.log_prob(z))
    lw = torch.cat(parts)
    return lw.mean(0), lw.std(0) / math.sqrt(n)


def refine_local(
    model: Callable,
    args: tuple,
    kwargs: dict,
    site: str,
    q: dist.Distribution,
    nesting: int,
    plate: str,
    steps: int = 50,
    samples: int = 16,
    lr: float = 0.05,
    elbo_samples: int = 100,
) -> RefineResult:
    """Optimise each datapoint's own parameters of ``q`` on its ELBO (Cremer et al. 2018).

    :param model: the Pyro model, called as ``model(*args, **kwargs)`` on one chunk of ``B`` rows.
    :param site: the latent site ``z`` (the model's only local latent).
    :param q: the encoder's distribution at ``site`` for the chunk: batch ``(B,)``, event ``(d,)``.
    :param nesting: the model's plate dims; ``plate``: the datapoint plate's name.
    :param steps: Adam steps (0: ``q* = q``).
    :param samples: reparameterized draws per step and datapoint.
    :param lr: Adam's step size (on ``loc`` and the log scales).
    :param elbo_samples: fresh draws for the final estimates of ``L[q]`` and ``L[q*]``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    check_positive_int("samples", samples)
    check_positive_int("elbo_samples", elbo_samples)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    family = family_of(q)
    with torch.no_grad():
        elbo_q, elbo_q_se = _elbo(model, args, kwargs, site, q, elbo_samples, nesting, plate)
    params = [p.requires_grad_(True) for p in _init(q, family)]
    # Adam by hand: elementwise, so each datapoint's parameters move independently of the others.
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    with torch.enable_grad():
        for t in range(1, steps + 1):
            qt = gaussian(family, params)
            z = qt.rsample((samples,))
            # "Sticking the landing" (Roeder et al. 2017): log q scored with its parameters held
            # fixed, so the gradient's noise vanishes where q matches the posterior. Summed over
            # datapoints (independent).
            log_q = gaussian(family, [p.detach() for p in params]).log_prob(z)
            objective = (local_log_joint(model, args, kwargs, {site: z}, nesting, plate) - log_q).mean(0)
            grads = torch.autograd.grad(objective.sum(), params)
            with torch.no_grad():
                for p, g, mi, vi in zip(params, grads, m, v):
                    g = torch.nan_to_num(g)  # a datapoint with a non-finite draw stays where it is
                    mi.mul_(b1).add_(g, alpha=1 - b1)
                    vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                    # step size decays linearly to 0, so q* settles instead of jittering at the optimum
                    step = lr * (1 - (t - 1) / steps) * math.sqrt(1 - b2**t) / (1 - b1**t)
                    p.add_(step * mi / (vi.sqrt() + eps))  # ascent on the ELBO
    params = [p.detach() for p in params]
    qstar = gaussian(family, params)
    with torch.no_grad():
        elbo_qstar, elbo_qstar_se = _elbo(model, args, kwargs, site, qstar, elbo_samples, nesting, plate)
    return RefineResult(qstar, family, elbo_q, elbo_q_se, elbo_qstar, elbo_qstar_se)
