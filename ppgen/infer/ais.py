"""Annealed importance sampling (AIS) of per-datapoint ``log p(x)``, and bidirectional Monte Carlo.

AIS (Neal 2001) moves ``K`` chains per datapoint from the prior ``p(z)`` to the posterior
``p(z | x)`` through the geometric path ``f_t(z) = p(z) p(x | z)^beta_t``,
``0 = beta_0 < ... < beta_T = 1``, with one HMC transition per step, and accumulates

    log w = sum_t (beta_t - beta_{t-1}) log p(x | z_{t-1}),

an unbiased estimate of ``p(x)`` in ``w``: ``logsumexp_k log w_k - log K`` is a stochastic lower
bound. Running the same chain backwards from an exact posterior sample gives an unbiased
estimate of ``1 / p(x)``, hence a stochastic *upper* bound; exact posterior samples are available
for data simulated from the model, so the pair sandwiches the true ``log p(x)``: bidirectional
Monte Carlo (Grosse et al. 2015; Wu et al. 2017, "On the quantitative analysis of decoder-based
generative models", who also adapt the HMC step size toward a target acceptance rate).

Works on any Pyro model whose latent sites are real-valued and sit, with the observations, in a
single ``pyro.plate("data", B)`` (no other plates): the log-densities are read from Pyro traces.
A latent may be a scalar, a vector or a matrix per datapoint (event shape ``()``, ``(d,)`` or
``(d1, d2)``; declare event dims with ``.to_event``). Many datapoints and chains run in parallel
as one ``(K, B, *event)`` batch.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample

from ppgen.infer.evidence import log_mean_exp
from ppgen.infer.traces import _PARTICLES, _data_frame, _plate_nesting, check_positive_int
from ppgen.runs import seeded

__all__ = ["AISResult", "BDMCResult", "sigmoid_schedule", "ais_log_evidence", "bdmc"]


class AISResult(NamedTuple):
    """Per-datapoint AIS output, tensors of shape ``(N,)`` (CPU, float64).

    :param log_px: ``logsumexp_k log w_k - log K`` (lower bound in expectation).
    :param stderr: delta-method standard error over the ``K`` chains.
    :param accept: mean HMC acceptance rate over steps and chains.
    :param step_size: final adapted HMC step size.
    """

    log_px: torch.Tensor
    stderr: torch.Tensor
    accept: torch.Tensor
    step_size: torch.Tensor


class BDMCResult(NamedTuple):
    """Bidirectional Monte Carlo on simulated data: ``lower <= log p(x) <= upper`` in expectation.

    :param data: the simulated data, shape ``(N, ...)``.
    :param lower: forward AIS, shape ``(N,)``.
    :param upper: reverse AIS from exact posterior samples, shape ``(N,)``.
    """

    data: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def gap(self) -> float:
        """Mean ``upper - lower`` in nats per datapoint."""
        return float((self.upper - self.lower).mean())


def sigmoid_schedule(num_steps: int, delta: float = 4.0) -> torch.Tensor:
    """``num_steps + 1`` inverse temperatures from 0 to 1, dense at both ends (Grosse et al. 2015)."""
    check_positive_int("num_steps", num_steps)
    s = torch.sigmoid(delta * torch.linspace(-1.0, 1.0, num_steps + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class _Target:
    """Per-datapoint ``log p(z)`` and ``log p(x | z)`` of ``model`` read from its traces."""

    def __init__(self, model: Callable, data: torch.Tensor, num_chains: int):
        self.model, self.data, self.k = model, data, num_chains
        with poutine.block(), torch.no_grad():
            tr = poutine.trace(model).get_trace(data)
        if _plate_nesting(tr) != 1:
            raise ValueError("AIS needs a model whose only plate is pyro.plate('data', B)")
        self.latents = []
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if _data_frame(site) is None:
                raise ValueError(f"site {name!r} is not inside pyro.plate('data', ...)")
            if not site["is_observed"]:
                if not _is_real(site["fn"].support):
                    raise ValueError(f"AIS needs real-valued latents; site {name!r} has support {site['fn'].support}")
                self.latents.append(name)
        if not self.latents:
            raise ValueError("the model has no latent sample site")

    def trace(self, z: Optional[dict] = None, data: Optional[torch.Tensor] = None):
        fn = self.model if z is None else poutine.condition(self.model, data=z)
        with pyro.plate(_PARTICLES, self.k, dim=-2):
            return poutine.trace(fn).get_trace(self.data if data is None else data)

    def parts(self, z: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(z), log p(x | z))``, each of shape ``(K, B)``."""
        tr = self.trace(z)
        prior, lik = 0.0, 0.0
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            lp = site["fn"].log_prob(site["value"]).expand(self.k, len(self.data))
            if name in z:
                prior = prior + lp
            else:
                lik = lik + lp
        return prior, lik


def _kinetic(p: dict) -> torch.Tensor:
    """``sum 0.5 |p|^2`` per chain and datapoint: ``(K, B)`` from momenta of shape ``(K, B, *event)``,
    where the event shape may be empty (a scalar latent per datapoint), a vector or a matrix."""
    return sum(0.5 * v.pow(2).reshape(*v.shape[:2], -1).sum(-1) for v in p.values())


def _hmc(target: _Target, z: dict, beta: float, eps: torch.Tensor, leapfrog: int):
    """One HMC transition per chain, leaving ``p(z) p(x|z)^beta`` invariant; ``eps`` is ``(B,)``."""

    def energy_grad(z):
        z = {k: v.detach().requires_grad_(True) for k, v in z.items()}
        with torch.enable_grad():
            prior, lik = target.parts(z)
            u = -(prior + beta * lik)
            grads = torch.autograd.grad(u.sum(), list(z.values()))
        return u.detach(), dict(zip(z, grads)), prior.detach(), lik.detach()

    def step(v):  # per-datapoint step size broadcast over (K, B, event...)
        return eps.view(1, -1, *([1] * (v.ndim - 2))).to(v.dtype)

    u0, g, prior0, lik0 = energy_grad(z)
    p = {k: torch.randn_like(v) for k, v in z.items()}
    h0 = u0 + _kinetic(p)
    zn, pn = dict(z), {k: v - 0.5 * step(v) * g[k] for k, v in p.items()}
    for i in range(leapfrog):
        zn = {k: v + step(v) * pn[k] for k, v in zn.items()}
        u, g, prior, lik = energy_grad(zn)
        frac = 1.0 if i < leapfrog - 1 else 0.5
        pn = {k: v - frac * step(v) * g[k] for k, v in pn.items()}
    h1 = u + _kinetic(pn)
    log_accept = (h0 - h1).nan_to_num(nan=-math.inf)
    accept = torch.rand_like(log_accept).log() < log_accept  # (K, B)

    def pick(new, old):
        return torch.where(accept.view(*accept.shape, *([1] * (new.ndim - 2))), new, old)

    z = {k: pick(zn[k], z[k]) for k in z}
    return z, pick(lik, lik0), accept.double().mean(0).cpu(), log_accept.clamp(max=0).exp()


def _run(target, z, lik, betas, step_size, leapfrog, target_accept):
    b = len(target.data)
    log_w = torch.zeros(target.k, b, dtype=torch.float64, device=target.data.device)
    eps = torch.full((b,), float(step_size), device=target.data.device)
    accepts = []
    for t in range(1, len(betas)):
        log_w += (float(betas[t]) - float(betas[t - 1])) * lik.double()
        z, lik, acc, _ = _hmc(target, z, float(betas[t]), eps, leapfrog)
        accepts.append(acc)
        # Wu et al. (2017): grow the step when chains accept more often than the target, else shrink.
        grow = (acc > target_accept).to(eps.device)
        eps = eps * torch.where(grow, 1.02, 0.98)
    return log_w, torch.stack(accepts).mean(0), eps.double().cpu()


@torch.no_grad()
def ais_log_evidence(
    model: Callable,
    data: torch.Tensor,
    num_chains: int = 16,
    num_steps: int = 500,
    leapfrog: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    batch_size: int = 100,
    seed: Optional[int] = 0,
) -> AISResult:
    """Per-datapoint AIS estimate of ``log p(x)`` (Neal 2001; Wu et al. 2017).

    :param model: Pyro model ``model(x)``; real latents and observations in ``pyro.plate("data", B)``.
    :param data: shape ``(N, ...)``.
    :param num_chains: ``K`` independent AIS chains per datapoint.
    :param num_steps: ``T`` annealing steps (sigmoid schedule), one HMC transition each.
    :param leapfrog: leapfrog steps per HMC transition.
    :param step_size: initial HMC step size, adapted per datapoint toward ``target_accept``.
    :param batch_size: datapoints run in parallel.
    :param seed: torch seed (the caller's random state is restored); ``None`` keeps the state.
    """
    return _chunked(model, data, num_chains, num_steps, leapfrog, step_size, target_accept, batch_size, seed, False)


def _chunked(model, data, k, t, leapfrog, step_size, target_accept, batch_size, seed, reverse):
    if not isinstance(data, torch.Tensor) or data.ndim < 1 or len(data) == 0:
        raise ValueError(f"data must be a non-empty tensor of shape (N, ...), got {getattr(data, 'shape', data)!r}")
    for name, value in (("num_chains", k), ("leapfrog", leapfrog), ("batch_size", batch_size)):
        check_positive_int(name, value)
    if not 0 < target_accept < 1 or not step_size > 0:
        raise ValueError(f"need 0 < target_accept < 1 and step_size > 0, got {target_accept}, {step_size}")
    betas = sigmoid_schedule(t)
    out = {"log_px": [], "stderr": [], "accept": [], "step_size": [], "sims": [], "upper": []}
    with seeded(seed, data.device):
        for i in range(0, len(data), batch_size):
            x = data[i : i + batch_size]
            if reverse:
                x, z_star = _simulate(model, x)
                out["sims"].append(x)
            target = _Target(model, x, k)
            tr = target.trace()
            z = {n: tr.nodes[n]["value"] for n in target.latents}
            _, lik = target.parts(z)
            log_w, acc, eps = _run(target, z, lik, betas, step_size, leapfrog, target_accept)
            for key, value in zip(("log_px", "stderr"), log_mean_exp(log_w, 0)):
                out[key].append(value.cpu())
            out["accept"].append(acc)
            out["step_size"].append(eps)
            if reverse:
                z = {n: v.expand(k, *v.shape) for n, v in z_star.items()}
                _, lik = target.parts(z)
                log_w, _, _ = _run(target, z, lik, betas.flip(0), step_size, leapfrog, target_accept)
                out["upper"].append(-log_mean_exp(log_w, 0)[0].cpu())
    if reverse:
        return BDMCResult(torch.cat(out["sims"]), torch.cat(out["log_px"]), torch.cat(out["upper"]))
    return AISResult(*(torch.cat(out[key]) for key in ("log_px", "stderr", "accept", "step_size")))


def _simulate(model: Callable, like: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Draw ``(z*, x*) ~ p(z) p(x | z)`` with ``x*`` shaped like ``like``: one observed site needed."""
    with poutine.block():
        conditioned = poutine.trace(model).get_trace(like)
    observed = [n for n, s in conditioned.nodes.items() if s["type"] == "sample" and s["is_observed"]]
    if len(observed) != 1:
        raise ValueError(f"BDMC simulates the data from one observed site; the model has {observed}")
    tr = poutine.trace(poutine.uncondition(model)).get_trace(like)
    latents = {
        n: s["value"] for n, s in tr.nodes.items()
        if s["type"] == "sample" and n not in observed and not site_is_subsample(s)
    }
    return tr.nodes[observed[0]]["value"].detach(), latents


@torch.no_grad()
def bdmc(
    model: Callable,
    like: torch.Tensor,
    num_chains: int = 16,
    num_steps: int = 500,
    leapfrog: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.65,
    batch_size: int = 100,
    seed: Optional[int] = 0,
) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al. 2015) on data simulated from ``model``.

    Simulates one ``(z*, x*)`` per row of ``like`` (shape ``(N, ...)``, values unused), then runs
    forward AIS on ``x*`` (lower bound) and reverse AIS from ``z*`` (upper bound). Arguments as in
    :func:`ais_log_evidence`; the gap ``upper - lower`` bounds the AIS error on such data.
    """
    return _chunked(model, like, num_chains, num_steps, leapfrog, step_size, target_accept, batch_size, seed, True)
