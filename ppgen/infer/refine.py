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
- either of them pushed through fixed bijections ``z = T(u)`` (a ``TransformedDistribution``
  whose base is one of the two, e.g. ``LogNormal(loc, scale).to_event(1)``, a logistic-normal
  ``TransformedDistribution(Normal(...).to_event(1), [StickBreakingTransform()])`` or the VAE's
  IAF posterior): the Gaussian ``u`` is refined, ``T`` (with whatever the encoder computed for
  it) is kept, and the density is ``q(u) / |det dT/du|``, so importance weights stay exact
  (:func:`gaussian_site`). A transform that is not bijective (``AbsTransform``) is refused.

A Gaussian site whose value the *model* transforms (ProdLDA's ``softmax(logtheta)``) needs
nothing of this: the latent is the Gaussian site itself.

The objective uses the family's exact entropy, ``L = E_q[log p(x, z)] + H[q]``, so only the
model term is sampled. ``L[q]`` and ``L[q*]`` are then re-estimated with ``elbo_samples`` fresh
draws each (no gradients), giving per-datapoint estimates with their standard errors.

The model's log joint ``log p(x_n, z)`` at given latent values (:func:`local_log_joint`) is read
from a trace of the model conditioned on those values under a particle plate, every site summed
per datapoint as the evidence path does (:func:`ppgen.infer.traces.log_density`). A model that
cannot take the particle plate (a ``BatchNorm1d`` in the decoder reads ``(S, B, F)`` as
``(N, C, L)``: an error, or silently wrong numbers when ``B == F``) is scored one particle at a
time instead (``vectorized=False``); :func:`particle_problem` finds out which, per chunk.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import Independent, TransformedDistribution
from torch.distributions.utils import _sum_rightmost

from ppgen.infer.traces import DataPlate, check_positive_int, log_density, trace_particles

__all__ = ["local_log_joint", "particle_problem", "family_of", "gaussian_site", "GaussianSite", "push_forward", "gaussian",
           "refine_local", "RefineResult"]


def local_log_joint(model: Callable, args: tuple, kwargs: dict, values: dict, nesting: int, plate: str,
                    vectorized: bool = True) -> torch.Tensor:
    """``log p(x_n, z_s)`` of shape ``(S, B)`` for latent ``values`` ``{site: (S, B, *event)}``.

    ``vectorized``: the model runs once, conditioned on ``values``, inside a particle plate of size
    ``S`` left of its ``nesting`` plates. Else it runs ``S`` times, once per particle, as an
    ordinary trace (for models that cannot take the particle plate, :func:`particle_problem`).
    Gradients flow to the values (not needed to the networks).
    """
    s = next(iter(values.values())).shape[0]
    full = nesting + 1
    if vectorized:
        with DataPlate(plate):
            tr = trace_particles(poutine.condition(model, data=values), args, kwargs, s, full)
        traces = [(tr, s)]
    else:
        traces = []
        for i in range(s):
            with DataPlate(plate):
                traces.append((poutine.trace(poutine.condition(model, data={k: v[i] for k, v in values.items()}))
                               .get_trace(*args, **kwargs), 1))
    rows = []
    for tr, k in traces:
        log_p, _, size = log_density(tr, full, k, observed=True)
        tr.nodes.clear()
        if size is None:
            raise ValueError(f"the model has no sample site inside a pyro.plate({plate!r}, ...)")
        rows.append(log_p)
    return rows[0] if vectorized else torch.cat(rows)


def particle_problem(model: Callable, args: tuple, kwargs: dict, site: str, q: dist.Distribution, nesting: int,
                     plate: str) -> Optional[str]:
    """Why ``model`` cannot be scored with a particle plate (``None`` if it can).

    One draw of ``q`` (off the caller's random stream) is scored by an ordinary trace and,
    repeated over two particles, by the particle plate; they must agree to about the square root
    of the unit roundoff. If the ordinary trace itself fails, its error propagates."""
    cuda = [v.device for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.device.type == "cuda"]
    with torch.no_grad(), torch.random.fork_rng(devices=cuda[:1]):
        z = q.sample((1,))
        one = local_log_joint(model, args, kwargs, {site: z}, nesting, plate, vectorized=False)
        try:
            two = local_log_joint(model, args, kwargs, {site: z.expand(2, *z.shape[1:])}, nesting, plate)
        except Exception as error:
            return f"{type(error).__name__}: {error}"
    if two.shape != (2, one.shape[-1]):
        return f"log joint of shape {tuple(two.shape)} for 2 particles of {one.shape[-1]} datapoints"
    eps = torch.finfo(one.dtype).eps if one.is_floating_point() else torch.finfo(torch.float32).eps
    one, two = one.double(), two.double()
    bad = ~(((two - one).abs() <= math.sqrt(eps) * (1.0 + one.abs())) | (two == one))
    if bad.any():
        where = int(bad.any(0).nonzero()[0])
        return (f"the same draw scores {float(two[0, where]):.6g} with the particle plate but {float(one[0, where]):.6g} "
                f"without it (datapoint {where} of the chunk): the model mixes the particle dimension into its "
                "computation")
    return None


class GaussianSite(NamedTuple):
    """A guide's site distribution read as a Gaussian ``u`` pushed through fixed bijections.

    :param family: ``"diag"`` or ``"fullcov"``.
    :param base: the Gaussian of ``u``: ``Normal(loc, scale).to_event(1)`` or ``MultivariateNormal``,
        batch shape ``(B,)``, event shape ``(d,)``.
    :param transforms: ``z = t_n(... t_1(u))`` in that order (empty: ``z = u``).
    """

    family: str
    base: dist.Distribution
    transforms: tuple

    def wrap(self, base: dist.Distribution) -> dist.Distribution:
        """``base`` (a distribution of ``u``) pushed through this site's transforms."""
        return dist.TransformedDistribution(base, list(self.transforms)) if self.transforms else base

    def push(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, log|det dz/du|)`` for ``u`` of shape ``(S, B, d)``: ``(S, B, *event)`` and ``(S, B)``."""
        z, ladj = push_forward(self.transforms, u, len(self.base.event_shape))
        return z, ladj if isinstance(ladj, torch.Tensor) else u.new_zeros(u.shape[:-1])


def push_forward(transforms, u: torch.Tensor, event_dim: int):
    """``z = t_n(... t_1(u))`` and ``log|det dz/du|`` summed over the event dims (``0.0`` for no
    transform), ``event_dim`` being ``u``'s number of event dims (as ``TransformedDistribution``
    counts them)."""
    ladj, x = 0.0, u
    for t in transforms:
        y = t(x)
        event_dim += t.codomain.event_dim - t.domain.event_dim
        ladj = ladj + _sum_rightmost(t.log_abs_det_jacobian(x, y), event_dim - t.codomain.event_dim)
        x = y
    return x, ladj


def _refuse(q: dist.Distribution, why: str) -> ValueError:
    return ValueError(
        f"a refined proposal needs a Gaussian guide site (Normal(loc, scale).to_event(1) or MultivariateNormal, "
        f"as the VAE's 'diag' and 'fullcov' posteriors, or either under fixed bijective transforms: a "
        f"TransformedDistribution such as LogNormal(...).to_event(1)), got {type(q).__name__} with event shape "
        f"{tuple(q.event_shape)}: {why}; use proposal='guide' (the guide itself) or AIS for this guide"
    )


def gaussian_site(q: dist.Distribution) -> GaussianSite:
    """Read a guide's site distribution (batch ``(B,)``) as :class:`GaussianSite`; anything else is
    refused (a refined ``q*`` is searched in the guide's own family, under the guide's transforms)."""
    node, extra, transforms = q, 0, []
    while True:  # peel Independent and TransformedDistribution layers, outermost first
        if isinstance(node, Independent):
            extra += node.reinterpreted_batch_ndims
            node = node.base_dist
        elif isinstance(node, TransformedDistribution):
            transforms = list(node.transforms) + transforms
            node = node.base_dist
        else:
            break
    for t in transforms:
        if not t.bijective:
            raise _refuse(q, f"its transform {t} is not a bijection (the density of z would need a sum over "
                             "pre-images)")
    batch = tuple(q.batch_shape)
    if isinstance(node, dist.Normal) and node.loc.ndim == 2 and tuple(node.loc.shape[:1]) == batch:
        family, base = "diag", dist.Normal(node.loc, node.scale).to_event(1)
    elif isinstance(node, dist.MultivariateNormal) and node.loc.ndim == 2 and tuple(node.batch_shape) == batch:
        family, base = "fullcov", dist.MultivariateNormal(node.loc, scale_tril=node.scale_tril)
    else:
        raise _refuse(q, f"its base is {type(node).__name__} of batch shape {tuple(node.batch_shape)} (with "
                         f"{extra} reinterpreted dims), not a Gaussian of batch (B,) and event (d,)")
    site = GaussianSite(family, base, tuple(transforms))
    rebuilt = site.wrap(base)
    base_dims = len(rebuilt.event_shape) - sum(t.codomain.event_dim - t.domain.event_dim for t in transforms)
    if rebuilt.batch_shape != q.batch_shape or rebuilt.event_shape != q.event_shape or base_dims != 1:
        raise _refuse(q, f"rebuilt from its Gaussian base it has batch {tuple(rebuilt.batch_shape)} and event "
                         f"{tuple(rebuilt.event_shape)}, not {tuple(q.batch_shape)} and {tuple(q.event_shape)}")
    return site


def family_of(q: dist.Distribution) -> str:
    """``"diag"`` or ``"fullcov"``: the Gaussian family of a guide's site distribution (see
    :func:`gaussian_site`, which also refuses anything else)."""
    return gaussian_site(q).family


def _init(q: dist.Distribution, family: str) -> list[torch.Tensor]:
    """Unconstrained parameters of the Gaussian ``q`` (a :attr:`GaussianSite.base`)."""
    if family == "diag":
        base = q.base_dist
        return [base.loc.detach().clone(), base.scale.detach().log()]
    tril = q.scale_tril.detach()
    d = tril.shape[-1]
    rows, cols = torch.tril_indices(d, d, offset=-1, device=tril.device)
    return [q.loc.detach().clone(), tril[..., rows, cols].clone(), tril.diagonal(dim1=-2, dim2=-1).log()]


def gaussian(family: str, params: list[torch.Tensor]) -> dist.Distribution:
    """The Gaussian of a family's unconstrained parameters (see :func:`refine_local`)."""
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

    :param q: the refined ``q*`` (batch shape ``(B,)``), parameters detached; under the guide's
        transforms if it had any (a ``TransformedDistribution``).
    :param family: ``"diag"`` or ``"fullcov"`` (of the Gaussian base).
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


def _elbo(model, args, kwargs, site, g: GaussianSite, n, nesting, plate, vectorized, chunk: int = 256):
    """Per-datapoint ELBO estimate from ``n`` draws of ``g`` and its standard error, ``(B,)`` each."""
    parts = []
    for k0 in range(0, n, chunk):
        u = g.base.sample((min(chunk, n - k0),))
        z, ladj = g.push(u)
        log_q = g.base.log_prob(u) - ladj  # the change of variables, without inverting T
        parts.append(local_log_joint(model, args, kwargs, {site: z}, nesting, plate, vectorized) - log_q)
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
    vectorized: bool = True,
) -> RefineResult:
    """Optimise each datapoint's own parameters of ``q`` on its ELBO (Cremer et al. 2018).

    :param model: the Pyro model, called as ``model(*args, **kwargs)`` on one chunk of ``B`` rows.
    :param site: the latent site ``z`` (the model's only local latent).
    :param q: the encoder's distribution at ``site`` for the chunk: batch ``(B,)``, a Gaussian of
        event ``(d,)`` or one under fixed bijections (:func:`gaussian_site`).
    :param nesting: the model's plate dims; ``plate``: the datapoint plate's name.
    :param steps: Adam steps (0: ``q* = q``).
    :param samples: reparameterized draws per step and datapoint.
    :param lr: Adam's step size (on ``loc`` and the log scales).
    :param elbo_samples: fresh draws for the final estimates of ``L[q]`` and ``L[q*]``.
    :param vectorized: score the model's particles in a plate (else one ordinary trace each,
        :func:`local_log_joint`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    check_positive_int("samples", samples)
    check_positive_int("elbo_samples", elbo_samples)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    g0 = gaussian_site(q)
    family = g0.family
    with torch.no_grad():
        elbo_q, elbo_q_se = _elbo(model, args, kwargs, site, g0, elbo_samples, nesting, plate, vectorized)
    params = [p.requires_grad_(True) for p in _init(g0.base, family)]
    # Adam by hand: elementwise, so each datapoint's parameters move independently of the others.
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    with torch.enable_grad():
        for t in range(1, steps + 1):
            u = gaussian(family, params).rsample((samples,))
            z, ladj = g0.push(u)
            # "Sticking the landing" (Roeder et al. 2017): log q scored with its parameters held
            # fixed, so the gradient's noise vanishes where q matches the posterior. Summed over
            # datapoints (independent). Under transforms, log q(z) = log q(u) - log|det dz/du|.
            log_q = gaussian(family, [p.detach() for p in params]).log_prob(u) - ladj
            objective = (local_log_joint(model, args, kwargs, {site: z}, nesting, plate, vectorized) - log_q).mean(0)
            grads = torch.autograd.grad(objective.sum(), params)
            with torch.no_grad():
                for p, g, mi, vi in zip(params, grads, m, v):
                    g = torch.nan_to_num(g)  # a datapoint with a non-finite draw stays where it is
                    mi.mul_(b1).add_(g, alpha=1 - b1)
                    vi.mul_(b2).addcmul_(g, g, value=1 - b2)
                    # step size decays linearly to 0, so q* settles instead of jittering at the optimum
                    step = lr * (1 - (t - 1) / steps) * math.sqrt(1 - b2**t) / (1 - b1**t)
                    p.add_(step * mi / (vi.sqrt() + eps))  # ascent on the ELBO
    gstar = g0._replace(base=gaussian(family, [p.detach() for p in params]))
    with torch.no_grad():
        elbo_qstar, elbo_qstar_se = _elbo(model, args, kwargs, site, gstar, elbo_samples, nesting, plate, vectorized)
    return RefineResult(gstar.wrap(gstar.base), family, elbo_q, elbo_q_se, elbo_qstar, elbo_qstar_se)
