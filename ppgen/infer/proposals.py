"""Proposals for per-datapoint importance sampling of a model's local latent: one small interface.

Importance-sampled evidence ``log p(x_n) ~= log mean_k p(x_n, z_k) / r(z_k | x_n)`` is unbiased
for ``p(x_n)`` for any proposal ``r`` whose density is exact and positive wherever the posterior
is; how *trustworthy* it is (Pareto k-hat, Vehtari et al. 2024) depends on how well ``r``'s tails
cover the posterior's. The encoder's ``q(z | x)`` is often too narrow (Cremer et al. 2018; Wu et
al. 2017), so ppgen offers, as objects with one interface:

===================  =============================================================================
:class:`Guide`       the guide's ``q(z | x)`` as a distribution (``log_evidence``'s default,
                     ``proposal=None``, draws the same through the guide's traces, for any pair)
:class:`Refined`     ``q*``: each datapoint's own Gaussian, started at ``q(z | x_n)`` and optimised
                     on its ELBO (:func:`ppgen.infer.refine.refine_local`, Cremer et al. 2018)
:class:`Widened`     another proposal with its scale multiplied by ``factor`` (heavier coverage)
:class:`StudentT`    a Student-t with another proposal's location and scale (``df`` degrees)
:class:`Defensive`   ``w p(z) + (1 - w) r(z | x)``, a defensive mixture with the prior
                     (Hesterberg 1995); its log-density is the exact mixture's
===================  =============================================================================

Every proposal's :meth:`Proposal.prepare` returns, for one chunk of datapoints, a
:class:`Prepared`: ``{site: distribution}`` with batch shape ``(B,)`` (the site's event shape),
and per-datapoint statistics it found on the way (``L[q]`` and ``L[q*]`` for a refined one).
:meth:`Proposal.as_start` turns it into the callable AIS starts from:
``start(x_batch) -> {site: distribution}``, from which ``rsample((K,))`` and ``log_prob`` are
taken. Every proposal object needs a model with one local latent site in the datapoint plate
(batch shape ``(B,)``), and all but :class:`Guide` a Gaussian guide distribution there (the VAE's
``diag`` and ``fullcov`` posteriors), or a Gaussian under fixed bijective transforms (a
``TransformedDistribution``: ``LogNormal``, a logistic-normal, the IAF posterior), whose Gaussian
base is what gets refined, widened or made Student-t while the transforms stay (the density keeps
their ``log|det J|``: :func:`ppgen.infer.refine.gaussian_site`); other pairs are refused with an
error naming what to use instead: ``log_evidence``'s default ``proposal=None`` (the guide's
traces, any pair) or AIS.

Models that cannot take a particle plate (a ``BatchNorm1d`` in the decoder, as ProdLDA's): every
chunk is first checked by :func:`ppgen.infer.refine.particle_problem` (one draw scored with and
without the plate); where they disagree, or the plate raises, the chunk's model evaluations
(refinement, ELBOs and the ``K`` draws) run one ordinary trace per particle instead, with a
``UserWarning`` saying why (:attr:`Prepared.vectorized` is ``False``). Same numbers, slower.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, NamedTuple, Optional

import pyro.distributions as dist
import torch
from pyro.poutine.util import site_is_subsample

from ppgen.infer.batches import as_batch
from torch.distributions import TransformedDistribution
from torch.distributions.utils import _sum_rightmost

from ppgen.infer.refine import gaussian_site, local_log_joint, particle_problem, push_forward, refine_local
from ppgen.infer.plates import DATA, _trace_pair, find_data_plate
from ppgen.infer.traces import check_positive_int

__all__ = ["Proposal", "Prepared", "LocalPair", "local_pair", "Guide", "Refined", "Widened", "StudentT",
           "Defensive", "DefensiveMixture", "proposal_log_weights", "as_proposal", "refined_of"]


class Prepared(NamedTuple):
    """A proposal for one chunk of ``B`` datapoints.

    :param distributions: ``{site: distribution}``, batch shape ``(B,)``, event shape the site's.
    :param stats: per-datapoint tensors ``(B,)`` found while preparing (e.g. ``elbo_q``,
        ``elbo_qstar`` and their ``_se``), empty if none.
    :param vectorized: whether the model takes a particle plate on this chunk (else its
        evaluations run one ordinary trace per particle; see the module docstring).
    """

    distributions: dict
    stats: dict
    vectorized: bool = True


class LocalPair(NamedTuple):
    """A model/guide pair with one local latent ``site`` in the datapoint plate ``plate``."""

    model: Callable
    guide: Callable
    site: str
    nesting: int
    plate: str


def local_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict, plate: str, nesting: int) -> LocalPair:
    """Check that ``model``/``guide`` have exactly one latent site, of batch shape ``(B,)`` in the
    datapoint plate, and return it as a :class:`LocalPair` (one trace, off the random stream)."""
    g, m = _trace_pair(model, guide, args, kwargs)
    latents = [n for n, s in g.nodes.items() if s["type"] == "sample" and not s["is_observed"]
               and not site_is_subsample(s)]
    shared = [n for n in latents if plate not in [f.name for f in g.nodes[n]["cond_indep_stack"]]]
    if shared:
        raise ValueError(
            f"the guide's site(s) {shared} sit outside the datapoint plate {plate!r}: a global latent is shared by "
            "all datapoints, so p(x) does not factor per datapoint and no per-datapoint proposal (nor "
            "proposal='guide' or AIS) can estimate it; use ppgen.joint_log_evidence (nested importance sampling "
            "of the joint log p(x_1..N))"
        )
    if len(latents) != 1:
        raise ValueError(
            f"this proposal needs a guide with exactly one local latent site, got {len(latents)} ({latents}); "
            "use proposal='guide' (importance sampling from the guide itself, any pair) or AIS"
        )
    site = g.nodes[latents[0]]
    frames = [f for f in site["cond_indep_stack"] if f.vectorized]
    if [f.name for f in frames] != [plate]:
        raise ValueError(
            f"the guide's site {latents[0]!r} sits in plates {[f.name for f in frames]}; this proposal needs it in "
            f"the datapoint plate {plate!r} alone (batch shape (B,)); use proposal='guide' or AIS"
        )
    return LocalPair(model, guide, latents[0], nesting, plate)


def _site_dist(pair: LocalPair, args: tuple, kwargs: dict, prior: bool = False) -> dist.Distribution:
    g, m = _trace_pair(pair.model, pair.guide, args, kwargs)
    return (m if prior else g).nodes[pair.site]["fn"]


def _takes_particles(pair: LocalPair, args: tuple, kwargs: dict, q: dist.Distribution) -> bool:
    """Whether the chunk's model evaluations may use a particle plate (warns when not)."""
    problem = particle_problem(pair.model, args, kwargs, pair.site, q, pair.nesting, pair.plate)
    if problem is not None:
        problem = problem.splitlines()[0]  # Pyro appends the trace's shapes to a shape error
        warnings.warn(f"proposal: the model cannot take a particle plate on this chunk ({problem}); scoring its "
                      "particles one ordinary trace at a time (same numbers, slower)", stacklevel=4)
    return problem is None


class Proposal:
    """One proposal for the local latent: subclasses define :meth:`prepare` and ``name``."""

    name = "proposal"

    def prepare(self, pair: LocalPair, args: tuple, kwargs: dict) -> Prepared:
        """The proposal for the chunk ``model(*args, **kwargs)`` of ``B`` datapoints."""
        raise NotImplementedError

    def cost(self, num_samples: int) -> float:
        """Model evaluations per datapoint to prepare it and draw ``num_samples`` (a gradient step
        counts as three evaluations): the unit of the compute budget."""
        return float(num_samples)

    def as_start(self, model: Callable, guide: Callable, data_plate: str = DATA) -> Callable:
        """``start(x_batch) -> {site: distribution}`` (batch shape ``(B,)``) for AIS to start from;
        ``x_batch`` is the model's data argument(s) for ``B`` datapoints, as for ``log_evidence``."""

        def start(x_batch) -> dict:
            batch = as_batch(x_batch, "x_batch", model)
            found = find_data_plate(model, guide, batch.args, batch.kwargs, batch.size, data_plate)
            pair = local_pair(model, guide, batch.args, batch.kwargs, found.data_plate, found.nesting)
            return self.prepare(pair, batch.args, batch.kwargs).distributions

        return start

    def __repr__(self) -> str:
        return self.name


class Guide(Proposal):
    """The guide ``q(z | x)`` itself (as a distribution: a guide with one local latent site)."""

    name = "guide"

    def prepare(self, pair, args, kwargs):
        q = _site_dist(pair, args, kwargs)
        return Prepared({pair.site: q}, {}, _takes_particles(pair, args, kwargs, q))


class Refined(Proposal):
    """``q*``: per-datapoint Gaussians refined from the guide's (:func:`ppgen.infer.refine.refine_local`).

    :param steps: Adam steps per datapoint; :param samples: draws per step;
    :param lr: Adam's step size; :param elbo_samples: draws for the estimates of ``L[q]``, ``L[q*]``.

    Inside ``with refined.keep():`` the last chunk's ``q*`` is kept, so proposals built on the
    same :class:`Refined` object (:class:`Widened`, :class:`StudentT`, :class:`Defensive`) reuse
    it for the same chunk (same tensors, unmodified); outside it every call refines afresh (a
    model trained further in between must not meet a stale ``q*``).
    """

    def __init__(self, steps: int = 50, samples: int = 16, lr: float = 0.05, elbo_samples: int = 100):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        check_positive_int("samples", samples)
        check_positive_int("elbo_samples", elbo_samples)
        self.steps, self.samples, self.lr, self.elbo_samples = steps, samples, float(lr), elbo_samples
        self.name = f"refined({steps}x{samples})"
        self._memo: Optional[tuple] = None
        self._keeping = 0

    @contextlib.contextmanager
    def keep(self):
        """Within this block, reuse the last chunk's ``q*`` for the same chunk (see above)."""
        self._keeping += 1
        try:
            yield self
        finally:
            self._keeping -= 1
            if not self._keeping:
                self._memo = None

    def cost(self, num_samples):
        return 3.0 * self.steps * self.samples + 2.0 * self.elbo_samples + num_samples

    def prepare(self, pair, args, kwargs):
        key = (id(pair.model), pair.site, *(_fingerprint(a) for a in (*args, *kwargs.values())))
        if self._keeping and self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        q = _site_dist(pair, args, kwargs)
        gaussian_site(q)  # refuse a non-Gaussian guide before any work
        vectorized = _takes_particles(pair, args, kwargs, q)
        r = refine_local(pair.model, args, kwargs, pair.site, q, pair.nesting, pair.plate, self.steps,
                         self.samples, self.lr, self.elbo_samples, vectorized)
        stats = {"elbo_q": r.elbo_q, "elbo_q_se": r.elbo_q_se, "elbo_qstar": r.elbo_qstar,
                 "elbo_qstar_se": r.elbo_qstar_se}
        out = Prepared({pair.site: r.q}, stats, vectorized)
        self._memo = (key, out) if self._keeping else None
        return out


def _fingerprint(a):
    if isinstance(a, torch.Tensor):
        return (a.data_ptr(), tuple(a.shape), a._version, str(a.device))
    return id(a)


class _Wrapper(Proposal):
    def __init__(self, inner: Proposal):
        if not isinstance(inner, Proposal):
            raise TypeError(f"inner must be a Proposal (e.g. Refined()), got {type(inner).__name__}")
        self.inner = inner

    def cost(self, num_samples):
        return self.inner.cost(num_samples)

    def prepare(self, pair, args, kwargs):
        p = self.inner.prepare(pair, args, kwargs)
        return p._replace(distributions={s: self.change(d, pair, args, kwargs) for s, d in p.distributions.items()})


class Widened(_Wrapper):
    """``inner``'s Gaussian with its scale (Cholesky factor) multiplied by ``factor >= 1`` (under
    its transforms, if any: the Gaussian base is widened)."""

    def __init__(self, inner: Proposal, factor: float = 1.25):
        super().__init__(inner)
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be a positive number, got {factor!r}")
        self.factor = float(factor)
        self.name = f"{inner.name}*{self.factor:g}"

    def change(self, d, pair, args, kwargs):
        g = gaussian_site(d)
        if g.family == "diag":
            return g.wrap(dist.Normal(g.base.base_dist.loc, self.factor * g.base.base_dist.scale).to_event(1))
        return g.wrap(dist.MultivariateNormal(g.base.loc, scale_tril=self.factor * g.base.scale_tril))


class StudentT(_Wrapper):
    """A Student-t with ``inner``'s location and scale (Cholesky factor) and ``df`` degrees of freedom
    (under ``inner``'s transforms, if any: the Gaussian base becomes a Student-t)."""

    def __init__(self, inner: Proposal, df: float = 5.0):
        super().__init__(inner)
        if not (isinstance(df, (int, float)) and math.isfinite(df) and df > 0):
            raise ValueError(f"df must be a positive number, got {df!r}")
        self.df = float(df)
        self.name = f"t{self.df:g}({inner.name})"

    def change(self, d, pair, args, kwargs):
        g = gaussian_site(d)
        if g.family == "diag":
            loc, scale = g.base.base_dist.loc, g.base.base_dist.scale
            return g.wrap(dist.StudentT(torch.full_like(loc, self.df), loc, scale).to_event(1))
        b = g.base
        return g.wrap(dist.MultivariateStudentT(torch.full_like(b.loc[..., 0], self.df), b.loc, b.scale_tril))


class Defensive(_Wrapper):
    """``weight * p(z) + (1 - weight) * inner`` with the model's prior ``p(z)`` at the site."""

    def __init__(self, inner: Proposal, weight: float = 0.1):
        super().__init__(inner)
        if not (isinstance(weight, (int, float)) and 0 < weight < 1):
            raise ValueError(f"weight must be in (0, 1), got {weight!r}")
        self.weight = float(weight)
        self.name = f"defensive{self.weight:g}({inner.name})"

    def change(self, d, pair, args, kwargs):
        return DefensiveMixture(_site_dist(pair, args, kwargs, prior=True), d, self.weight)


class DefensiveMixture(dist.TorchDistribution):
    """``weight * prior + (1 - weight) * q``, same batch and event shapes; exact ``log_prob``.

    ``rsample`` draws like ``sample`` (the component choice is discrete: no gradient through it).
    """

    arg_constraints: dict = {}

    def __init__(self, prior: dist.Distribution, q: dist.Distribution, weight: float):
        if prior.event_shape != q.event_shape:
            raise ValueError(f"prior and q must share an event shape, got {prior.event_shape} and {q.event_shape}")
        self.prior, self.q, self.weight = prior.expand(q.batch_shape), q, float(weight)
        super().__init__(q.batch_shape, q.event_shape, validate_args=False)

    @property
    def support(self):
        return self.q.support

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            a, b = self.prior.sample(sample_shape), self.q.sample(sample_shape)
            pick = torch.rand(a.shape[: a.ndim - len(self.event_shape)], device=a.device) < self.weight
            return torch.where(pick.reshape(pick.shape + (1,) * len(self.event_shape)), a, b)

    def rsample(self, sample_shape=torch.Size()):
        return self.sample(sample_shape)

    def log_prob(self, value):
        return torch.logaddexp(math.log(self.weight) + self.prior.log_prob(value),
                               math.log1p(-self.weight) + self.q.log_prob(value))


def as_proposal(proposal) -> Optional[Proposal]:
    """``None`` for the guide's own trace path (``None`` or ``"guide"``), else the :class:`Proposal`."""
    if proposal is None or (isinstance(proposal, str) and proposal == "guide"):
        return None
    if isinstance(proposal, Proposal):
        return proposal
    raise TypeError(f"proposal must be None, 'guide' or a ppgen.infer.proposals.Proposal "
                    f"(Refined(), Widened(Refined()), ...), got {proposal!r}")


def proposal_log_weights(pair: LocalPair, prepared: Prepared, args: tuple, kwargs: dict, num_samples: int,
                         particle_chunk: int) -> tuple[torch.Tensor, float]:
    """Log weights ``log p(x_n, z_k) - log r(z_k | x_n)``, ``(B, K)`` float64 on CPU, of ``K`` draws
    from a prepared proposal (in particle chunks), and the unit roundoff the model computed in."""
    (site, r), = prepared.distributions.items()
    parts, rounding = [], 0.0
    for k0 in range(0, num_samples, particle_chunk):
        z, log_r = _draw(r, min(particle_chunk, num_samples - k0))
        lw = local_log_joint(pair.model, args, kwargs, {site: z}, pair.nesting, pair.plate,
                             prepared.vectorized) - log_r
        rounding = max(rounding, torch.finfo(lw.dtype).eps)
        parts.append(lw.T.double().cpu())
    return torch.cat(parts, 1), rounding


def _draw(r: dist.Distribution, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` draws of ``r`` and their log-density, ``(k, B, *event)`` and ``(k, B)``; a
    ``TransformedDistribution`` is drawn in its base space and scored by the change of variables
    ``log r(u) - log|det dz/du|`` (exact, without inverting the transforms)."""
    if not isinstance(r, TransformedDistribution):
        z = r.sample((k,))
        return z, r.log_prob(z)
    base = r.base_dist
    lifted = len(r.event_shape) - sum(t.codomain.event_dim - t.domain.event_dim for t in r.transforms)
    u = base.sample((k,))
    z, ladj = push_forward(r.transforms, u, lifted)
    return z, _sum_rightmost(base.log_prob(u), lifted - len(base.event_shape)) - ladj


def refined_of(proposals) -> list["Refined"]:
    """The distinct :class:`Refined` objects inside ``proposals`` (through the wrappers)."""
    out: list = []
    for p in proposals:
        while isinstance(p, _Wrapper):
            p = p.inner
        if isinstance(p, Refined) and all(p is not q for q in out):
            out.append(p)
    return out
