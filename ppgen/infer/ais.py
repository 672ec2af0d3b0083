"""Annealed importance sampling (AIS) of per-datapoint ``log p(x)``, and bidirectional Monte Carlo.

AIS (Neal 2001) moves ``K`` chains per datapoint from a normalized start density ``q(z)`` to the
posterior ``p(z | x)`` through the geometric path

    f_t(z) = q(z)^(1 - beta_t) p(x, z)^beta_t,    0 = beta_0 < ... < beta_T = 1,

with one HMC transition leaving ``f_t`` invariant per step, and accumulates, from ``z_0 ~ q``,

    log w = sum_t (beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log q(z_{t-1})],

an unbiased estimate of ``p(x)`` in ``w``: ``logsumexp_k log w_k - log K`` is a stochastic lower
bound. By default ``q`` is the prior ``p(z)``, and the path is ``p(z) p(x | z)^beta_t``. With
``start`` it is a per-datapoint distribution, e.g. the encoder's ``q(z | x)`` or a refined local
``q*``: the closer ``q`` is to the posterior, the fewer steps reach a given accuracy (Wu et al.
2017, sec. 5, start from the encoder to evaluate VAEs). An exact posterior start gives every chain
the weight ``p(x)``, with zero variance at any ``T``. ``q`` must be normalized, real-valued and
held fixed (its parameters are computed once per datapoint chunk, without gradient); its
``log_prob`` enters every HMC gradient, so a density that is costly to evaluate at arbitrary
points (an inverse autoregressive flow inverts sequentially) makes every leapfrog step costly.

Running the same chain backwards from an exact posterior sample to ``q`` gives an unbiased
estimate of ``1 / p(x)``, hence a stochastic *upper* bound; exact posterior samples are available
for data simulated from the model, so the pair sandwiches the true ``log p(x)``: bidirectional
Monte Carlo (Grosse et al. 2015; Wu et al. 2017, "On the quantitative analysis of decoder-based
generative models", who also adapt the HMC step size toward a target acceptance rate). With
``start`` both chains use it: the forward one starts at ``q(z | x*)``, the reverse one ends there.

Works on any Pyro model whose latent sites are real-valued and sit, with the observations, in a
single datapoint plate (no other plates): the log-densities are read from Pyro traces. The data
may be one tensor, a tuple of model arguments or a dict of keyword arguments
(:func:`ppgen.infer.batches.as_batch`), and the plate any name (``data_plate=``, else the model's
single plate of the chunk's size: :func:`ppgen.infer.traces.find_data_plate`). A latent may be a
scalar, a vector or a matrix per datapoint (event shape ``()``, ``(d,)`` or ``(d1, d2)``; declare
event dims with ``.to_event``). A latent with constrained support (``LogNormal``, ``Gamma``) is
refused: HMC moves on the reals; declare the site in unconstrained space (a ``Normal`` whose value
the model transforms) or use importance sampling (:mod:`ppgen.infer.proposals`). Many datapoints and
chains run in parallel as one ``(K, B, *event)`` batch, so the model must take a particle plate:
each chunk is checked first (one state scored with and without it), and a model that mixes the
particle dimension into its computation (a ``BatchNorm1d`` on the latent's path) is refused, naming
``log_evidence`` (which falls back to a particle loop). Networks reachable from the model and
``start`` run in eval mode (:func:`ppgen.infer.networks.eval_mode`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, NamedTuple, Optional

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample

from ppgen.infer.batches import as_batch
from ppgen.infer.evidence import log_mean_exp
from ppgen.infer.networks import eval_mode
from ppgen.infer.plates import DATA, DataPlate, _data_frame, _plate_nesting, find_data_plate
from ppgen.infer.traces import _PARTICLES, check_positive_int
from ppgen.runs import seeded

__all__ = ["AISResult", "BDMCResult", "sigmoid_schedule", "guide_start", "ais_log_evidence", "bdmc"]

# start(x) -> {latent site name: distribution of batch shape (B,)}, see ais_log_evidence; x is
# the chunk in the form the data came in (a tensor, a tuple, a dict).
Start = Callable[..., Mapping[str, torch.distributions.Distribution]]


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


def guide_start(guide: Callable) -> Start:
    """A ``start`` for :func:`ais_log_evidence` from an amortized Pyro guide: the distribution of
    each sample site of one trace of the guide on the chunk, batch shape ``(B,)`` (e.g.
    ``vae.guide``, giving the encoder's ``q(z | x)``). The guide is called as the model is:
    ``guide(x)``, ``guide(*x)`` for a tuple chunk, ``guide(**x)`` for a dict."""
    if not callable(guide):
        raise TypeError(f"guide must be callable guide(x), got {type(guide).__name__}")

    def start(x) -> dict:
        batch = as_batch(x, "x_batch", guide)
        with poutine.block(), torch.no_grad():
            tr = poutine.trace(guide).get_trace(*batch.args, **batch.kwargs)
        return {
            name: site["fn"] for name, site in tr.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        }

    return start


def _start_dists(start: Start, x, size: int, trace, latents: list) -> dict:
    """``start(x)`` checked against the model's latent sites in ``trace`` (batch ``B = size``)."""
    qs = start(x)
    if not isinstance(qs, Mapping):
        raise TypeError(f"start(x) must return a dict {{site name: distribution}}, got {type(qs).__name__}")
    if set(qs) != set(latents):
        raise ValueError(f"start(x) must give one distribution per latent site {sorted(latents)}, got {sorted(qs)}")
    for name in latents:
        q, site = qs[name], trace.nodes[name]["fn"]
        if not isinstance(q, torch.distributions.Distribution):
            raise TypeError(f"start(x)[{name!r}] must be a torch Distribution, got {type(q).__name__}")
        if tuple(q.batch_shape) != (size,) or q.event_shape != site.event_shape:
            raise ValueError(
                f"start(x)[{name!r}] must have batch shape ({size},) and event shape "
                f"{tuple(site.event_shape)} (the model's site), got {tuple(q.batch_shape)} and {tuple(q.event_shape)}"
            )
        if not _is_real(q.support):
            raise ValueError(f"start(x)[{name!r}] must be a distribution on the reals, got support {q.support}")
    return {name: qs[name] for name in latents}


class _Target:
    """Per-datapoint log densities of the path's two ends, read from ``model``'s traces: the start
    ``log q(z)`` (the prior ``log p(z)`` when ``start`` is None) and ``log p(x, z) - log q(z)``."""

    def __init__(self, model: Callable, batch, num_chains: int, start: Optional[Start] = None, plate: str = DATA):
        self.model, self.batch, self.k, self.plate = model, batch, num_chains, plate
        self.size, self.device = batch.size, batch.device
        with poutine.block(), torch.no_grad(), DataPlate(plate):
            tr = poutine.trace(model).get_trace(*batch.args, **batch.kwargs)
        if _plate_nesting(tr) != 1:
            raise ValueError(f"AIS needs a model whose only plate is the datapoint plate pyro.plate({plate!r}, B); "
                             "use log_evidence (importance sampling, any plates) for this model")
        self.latents = []
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if _data_frame(site) is None:
                raise ValueError(
                    f"site {name!r} is not inside pyro.plate({plate!r}, ...): AIS anneals each datapoint's own "
                    "latents; a global latent shared by all datapoints needs ppgen.joint_log_evidence (nested "
                    "importance sampling of the joint log p(x_1..N))")
            if not site["is_observed"]:
                if not _is_real(site["fn"].support):
                    if site["fn"].support.is_discrete:
                        advice = ("sum it out in the model, or use log_evidence(model, guide, x) (importance "
                                  "sampling from the guide, which may propose discrete values)")
                    else:
                        advice = ("declare it in unconstrained space (a Normal whose value the model transforms, "
                                  "e.g. exp(u)) or use log_evidence(..., proposal=Widened(Refined())) (importance "
                                  "sampling from a refined Gaussian pushed through the guide's transform)")
                    raise ValueError(f"AIS needs real-valued latents; site {name!r} has support "
                                     f"{site['fn'].support}: {advice}")
                self.latents.append(name)
        if not self.latents:
            raise ValueError("the model has no latent sample site")
        self.start = None if start is None else _start_dists(start, batch.data, self.size, tr, self.latents)

    def trace(self, z: Optional[dict] = None):
        fn = self.model if z is None else poutine.condition(self.model, data=z)
        with DataPlate(self.plate), pyro.plate(_PARTICLES, self.k, dim=-2):
            return poutine.trace(fn).get_trace(*self.batch.args, **self.batch.kwargs)

    def particle_problem(self, z: dict) -> Optional[str]:
        """Why the model cannot take the chains' plate (``None`` if it can): the first chain's state
        scored by an ordinary trace (no plate) and by the plate must agree."""
        one_z = {n: v[0] for n, v in z.items()}
        with poutine.block(), DataPlate(self.plate):
            fn = poutine.condition(self.model, data=one_z)
            tr = poutine.trace(fn).get_trace(*self.batch.args, **self.batch.kwargs)
        one = sum(s["fn"].log_prob(s["value"]).reshape(-1).expand(self.size) for s in tr.nodes.values()
                  if s["type"] == "sample" and not site_is_subsample(s))
        try:
            many = sum(self.parts({n: v[:1].expand_as(v) for n, v in z.items()}, raw=True))
        except Exception as error:
            return f"{type(error).__name__}: {str(error).splitlines()[0]}"
        eps = torch.finfo(one.dtype).eps
        bad = ~(((many - one).abs() <= math.sqrt(eps) * (1.0 + one.abs())) | (many == one))
        if bad.any():
            where = int(bad.any(0).nonzero()[0])
            return (f"the same state scores {float(many[0, where]):.6g} with the chains' plate but "
                    f"{float(one[where]):.6g} without it (datapoint {where} of the chunk)")
        return None

    def initial(self) -> dict:
        """``z_0 ~ q``: one ``(K, B, *event)`` tensor per latent site."""
        if self.start is None:
            tr = self.trace()
            return {n: tr.nodes[n]["value"] for n in self.latents}
        return {n: q.sample((self.k,)) for n, q in self.start.items()}

    def parts(self, z: dict, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log q(z), log p(x, z) - log q(z))``, each of shape ``(K, B)``; for the prior start
        ``(log p(z), log p(x | z))``; ``raw``: ``(log p(z), log p(x | z))`` whatever the start."""
        tr = self.trace(z)
        prior, lik = 0.0, 0.0
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            lp = site["fn"].log_prob(site["value"]).expand(self.k, self.size)
            if name in z:
                prior = prior + lp
            else:
                lik = lik + lp
        if self.start is None or raw:
            return prior, lik
        log_q = sum(q.log_prob(z[n]) for n, q in self.start.items())
        return log_q, prior + lik - log_q


def _kinetic(p: dict) -> torch.Tensor:
    """``sum 0.5 |p|^2`` per chain and datapoint: ``(K, B)`` from momenta of shape ``(K, B, *event)``,
    where the event shape may be empty (a scalar latent per datapoint), a vector or a matrix."""
    return sum(0.5 * v.pow(2).reshape(*v.shape[:2], -1).sum(-1) for v in p.values())


def _hmc(target: _Target, z: dict, beta: float, eps: torch.Tensor, leapfrog: int):
    """One HMC transition per chain, leaving ``q(z)^(1 - beta) p(x, z)^beta`` invariant; ``eps`` is ``(B,)``."""

    def energy_grad(z):
        z = {k: v.detach().requires_grad_(True) for k, v in z.items()}
        with torch.enable_grad():
            prior, lik = target.parts(z)  # (log q, log p(x, z) - log q)
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
    return z, pick(lik, lik0), accept.double().mean(0), log_accept.clamp(max=0).exp()


def _run(target, z, lik, betas, step_size, leapfrog, target_accept):
    b = target.size
    log_w = torch.zeros(target.k, b, dtype=torch.float64, device=target.device)
    eps = torch.full((b,), float(step_size), device=target.device)
    accepts = []
    for t in range(1, len(betas)):
        log_w += (float(betas[t]) - float(betas[t - 1])) * lik.double()
        z, lik, acc, _ = _hmc(target, z, float(betas[t]), eps, leapfrog)
        accepts.append(acc)
        # Wu et al. (2017): grow the step when chains accept more often than the target, else shrink.
        eps = eps * torch.where(acc > target_accept, 1.02, 0.98)  # on the device: no host sync per step
    return log_w, torch.stack(accepts).mean(0).cpu(), eps.double().cpu()


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
    start: Optional[Start] = None,
    data_plate: str = DATA,
) -> AISResult:
    """Per-datapoint AIS estimate of ``log p(x)`` (Neal 2001; Wu et al. 2017).

    :param model: Pyro model, called as ``model(x)``, ``model(*data)`` for a tuple and
        ``model(**data)`` for a dict; real latents and observations in one datapoint plate.
    :param data: a tensor ``(N, ...)``, a tuple of model arguments aligned on dim 0 or a dict of
        keyword arguments (:func:`ppgen.infer.batches.as_batch`).
    :param num_chains: ``K`` independent AIS chains per datapoint.
    :param num_steps: ``T`` annealing steps (sigmoid schedule), one HMC transition each.
    :param leapfrog: leapfrog steps per HMC transition.
    :param step_size: initial HMC step size, adapted per datapoint toward ``target_accept``.
    :param batch_size: datapoints run in parallel.
    :param seed: torch seed (the caller's random state is restored); ``None`` keeps the state.
    :param start: where the path starts: ``None`` for the prior ``p(z)``, else a callable
        ``start(x_batch) -> {latent site name: distribution}``, called once per datapoint chunk
        ``x_batch`` of ``B`` datapoints in the data's form, each distribution normalized, on the
        reals, of batch shape ``(B,)`` and the site's event shape (e.g. :func:`guide_start` of an
        encoder guide, or ``proposal.as_start(model, guide)`` of :mod:`ppgen.infer.proposals`).
    :param data_plate: the datapoint plate's name (default ``"data"``; else the model's single
        plate of the chunk's size).
    """
    return _chunked(model, data, num_chains, num_steps, leapfrog, step_size, target_accept, batch_size, seed, False,
                    start, data_plate)


def _no_guide(*args, **kwargs) -> None:
    """A guide with no sites: tracing the model behind it draws from the prior."""


def _chunked(model, data, k, t, leapfrog, step_size, target_accept, batch_size, seed, reverse, start, data_plate=DATA):
    if reverse and (not isinstance(data, torch.Tensor) or data.ndim < 1 or len(data) == 0):
        raise ValueError(f"bdmc simulates one observed tensor: like must be a non-empty tensor of shape (N, ...), "
                         f"got {getattr(data, 'shape', type(data).__name__)!r}")
    batch = as_batch(data, "data", model)
    for name, value in (("num_chains", k), ("leapfrog", leapfrog), ("batch_size", batch_size)):
        check_positive_int(name, value)
    if not 0 < target_accept < 1 or not step_size > 0:
        raise ValueError(f"need 0 < target_accept < 1 and step_size > 0, got {target_accept}, {step_size}")
    if start is not None and not callable(start):
        raise TypeError(f"start must be None (the prior) or a callable start(x) -> {{site: distribution}}, got {type(start).__name__}")
    betas = sigmoid_schedule(t)
    out = {"log_px": [], "stderr": [], "accept": [], "step_size": [], "sims": [], "upper": []}
    plate = None
    with seeded(seed, batch.device), eval_mode(model, *([start] if start is not None else [])):
        for i in range(0, batch.size, batch_size):
            chunk = batch.rows(slice(i, i + batch_size))
            if reverse:
                x, z_star = _simulate(model, chunk.data)
                out["sims"].append(x)
                chunk = as_batch(x, "like", model)
            if plate is None:
                plate = find_data_plate(model, _no_guide, chunk.args, chunk.kwargs, chunk.size, data_plate).data_plate
            target = _Target(model, chunk, k, start, plate)
            z = target.initial()
            problem = target.particle_problem(z)
            if problem is not None:
                raise ValueError(
                    f"AIS runs its {k} chains in one vectorized pass, an extra plate left of the model's, and this "
                    f"model cannot take it ({problem}): the model mixes that dimension into its computation (e.g. "
                    "a BatchNorm1d on the latent's path). Use log_evidence (it falls back to one trace per "
                    "particle), or write the model so that its networks broadcast over leading dimensions")
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
    start: Optional[Start] = None,
    data_plate: str = DATA,
) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al. 2015) on data simulated from ``model``.

    Simulates one ``(z*, x*)`` per row of ``like`` (shape ``(N, ...)``, values unused), then runs
    forward AIS on ``x*`` (lower bound) and reverse AIS from ``z*`` (upper bound). Arguments as in
    :func:`ais_log_evidence`; the gap ``upper - lower`` bounds the AIS error on such data. With
    ``start``, ``start(x*)`` is where the forward chain starts and the reverse chain ends (its
    weights then estimate ``1 / p(x*)`` as ``q`` is normalized), so the gap measures AIS from that
    start.
    """
    return _chunked(model, like, num_chains, num_steps, leapfrog, step_size, target_accept, batch_size, seed, True, start,
                    data_plate)
