"""Pathwise (reparameterized) estimators' guide handling: "sticking the landing".

The pathwise gradient of ``log p(x, z) - log q_phi(z)`` at ``z = z(eps, phi)`` has two parts from
``log q``: the path through ``z`` and the direct score term ``d log q_phi(z) / d phi`` at fixed
``z``, whose expectation is zero. STL (Roeder, Wu & Duvenaud 2017, "Sticking the landing") drops
the score term: ``log q`` is evaluated with *every* guide parameter stopped (the encoder's heads,
a flow's network weights, its context), at the live sample ``z(eps, phi)``. When ``q`` equals the
exact posterior, ``log p(x, z) - log q(z) = log p(x)`` for every ``z`` and the STL guide gradient
is exactly zero for every draw.

How it is built (:class:`StickingTheLanding`, one wrapper distribution for every family): the
wrapped guide distribution draws through its live ``rsample``, and its ``log_prob(z)`` returns

    lp(v) + <grad_v lp(v), z - stop(z)>,      v = stop(z),   lp = log q_phi (live, fresh)

whose value is ``log q_phi(z)`` and whose gradient in ``phi`` is
``grad_z log q_phi(z) . dz/dphi``: exactly the STL gradient. Nothing in ``q`` has to be found and
detached (a parameter held anywhere, an encoder context, a buffer), since only the gradient with
respect to the leaf ``v`` is kept. ``lp(v)`` is computed at a tensor that is not the sampled
``z`` itself, so a flow (IAF; Kingma et al. 2016) computes the real inverse ``f^{-1}(z)`` instead
of returning its sampling cache, whose ``x`` carries ``phi`` (the cached path gives the flow's
weights part of the score term back). For an autoregressive flow that inverse costs ``d``
sequential network passes per step: the price of STL with a flow. A transform without an inverse
cannot give STL; :func:`sticking_the_landing` then refuses with a ``ValueError``.

The wrapper implements ``expand``, so the broadcasting of any vectorized plate (the ELBO's
particle plate, ``IWAE_ELBO``'s, a user's) keeps it: the first version set ``rsample`` as an
instance attribute on a detached copy, which ``expand`` dropped, and with ``num_particles > 1``
vectorized the guide got no gradient at all.
"""

from __future__ import annotations

from typing import Callable

import torch
from pyro.distributions import TorchDistribution
from pyro.infer import TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

__all__ = ["sticking_the_landing", "StickingTheLanding", "stopped_log_prob", "AnalyticKL_ELBO"]


def _fresh(value: torch.Tensor) -> torch.Tensor:
    # A new tensor object equal to ``value``: a transform's cache matches by identity (`y is y_old`),
    # so scoring this computes the real inverse.
    return value.detach().clone()


def stopped_log_prob(fn: torch.distributions.Distribution, value: torch.Tensor) -> torch.Tensor:
    """``log q(value)`` with every parameter of ``fn`` stopped and the gradient path through
    ``value`` kept: the STL log-density (Roeder et al. 2017), also what DReG (Tucker et al. 2019)
    needs.

    :param fn: the guide distribution, batch shape ``B``, event shape ``E``.
    :param value: a sample of shape ``S + B + E``, usually carrying ``d z / d phi``.
    :returns: shape ``S + B``; equal to ``fn.log_prob(value)``, gradient
        ``grad_z log q(z) . d value``, none through ``fn``'s parameters.
    :raises ValueError: ``fn`` cannot score a point it did not just sample (a transform without
        an inverse).
    """
    v = _fresh(value)
    if not (torch.is_grad_enabled() and value.requires_grad):
        # Nothing flows through ``value``: the stopped density is a constant.
        with torch.no_grad():
            return _log_prob(fn, v)
    v.requires_grad_(True)
    with torch.enable_grad():
        lp = _log_prob(fn, v)
        if not lp.requires_grad:  # log q does not depend on z (e.g. a Delta at the sample)
            return lp.detach()
        # retain_graph: lp's graph may share nodes with the live sample's (an encoder's heads);
        # it is freed when lp goes out of scope on return.
        (grad,) = torch.autograd.grad(lp.sum(), v, retain_graph=True, allow_unused=True)
    if grad is None:
        return lp.detach()
    event = len(fn.event_shape)
    path = grad * (value - value.detach())
    if event:
        path = path.sum(tuple(range(-event, 0)))
    return lp.detach() + path


def _log_prob(fn, v: torch.Tensor) -> torch.Tensor:
    try:
        return fn.log_prob(v)
    except NotImplementedError as err:
        raise ValueError(
            f"stl needs log q(z) at the sampled z with the guide's parameters stopped, which for "
            f"{type(fn).__name__} means inverting its transforms, and one has no inverse ({err}); "
            "train this guide with estimator 'reparam' (or 'iwae'), whose gradients use the "
            "sampling cache instead"
        ) from err


class StickingTheLanding(TorchDistribution):
    """``base`` sampled through its live ``rsample``, scored by :func:`stopped_log_prob`.

    :param base: a reparameterized distribution (``has_rsample``), batch shape ``B``, event ``E``.
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, base: torch.distributions.Distribution):
        if not base.has_rsample:
            raise ValueError(
                f"sticking the landing needs a reparameterized site, got {type(base).__name__} "
                "without rsample; score-function sites are left to the score estimators"
            )
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.base.rsample(sample_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return self.base.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return stopped_log_prob(self.base, value)

    def expand(self, batch_shape, _instance=None) -> "StickingTheLanding":
        # Plates broadcast a site by `fn.expand(...)`: keep the wrapper, expand what it wraps.
        return StickingTheLanding(self.base.expand(torch.Size(batch_shape)))

    @property
    def mean(self) -> torch.Tensor:
        return self.base.mean

    @property
    def variance(self) -> torch.Tensor:
        return self.base.variance


class _StickingTheLanding(Messenger):
    def _process_message(self, msg: dict) -> None:
        # Runs after the plates inside the guide have broadcast the site and before the plates
        # outside it (vectorized particles) do; those expand the wrapper (its `expand`).
        if (
            msg["type"] == "sample"
            and not msg["is_observed"]
            and msg["fn"].has_rsample
            and not isinstance(msg["fn"], StickingTheLanding)
        ):
            msg["fn"] = StickingTheLanding(msg["fn"])


def sticking_the_landing(guide: Callable) -> Callable:
    """``guide`` with every reparameterized latent site scored by :func:`stopped_log_prob`, for
    the STL gradient of Roeder et al. (2017) when trained with ``Trace_ELBO`` (any number of
    particles, vectorized or not) or any objective that scores guide sites by ``log_prob``."""
    return _StickingTheLanding()(guide)


class AnalyticKL_ELBO(TraceMeanField_ELBO):
    """Pyro's ``TraceMeanField_ELBO`` (the KL term in closed form where ``kl_divergence`` knows
    the pair, Kingma & Welling 2014, appendix B) that refuses guide sites without ``rsample``.

    ``TraceMeanField_ELBO`` has no score-function term: for a discrete guide site it would
    differentiate only ``KL(q || p)`` and silently drop the gradient of ``E_q[log p(x | z)]``
    with respect to ``q``. Pyro checks this only while validation is on, and the SVI loop turns
    validation off after its first pass; here the check runs on every trace.
    """

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site) \
                    and not site["fn"].has_rsample:
                raise ValueError(
                    f"estimator 'analytic-kl' needs every guide site reparameterized, but site {name!r} "
                    f"({type(site['fn']).__name__}) has no rsample, and its gradient would silently lose "
                    "the expected log-likelihood term; use 'enum' (exact sum over a discrete site), "
                    "'score-discrete' or 'reparam' (score function for that site) instead"
                )
        return model_trace, guide_trace

