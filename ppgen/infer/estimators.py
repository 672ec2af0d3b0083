"""Named gradient estimators of the ELBO, each a Pyro ELBO object plus how to treat the guide.

A guide is written once, reparameterized. Score-function estimators train the *same* guide with
its latent sites marked non-reparameterizable (``has_rsample_(False)``) by a poutine handler, so
no model or guide needs a switch of its own.

=================  ==========================  ===============================================
name               Pyro ELBO                   gradient
=================  ==========================  ===============================================
``reparam``        ``Trace_ELBO``              pathwise (Kingma & Welling 2014)
``analytic-kl``    ``TraceMeanField_ELBO``     pathwise, KL term in closed form where known
``score``          ``TraceGraph_ELBO``         score function, Rao-Blackwellized by the
                                               dependency graph (Williams 1992; Ranganath et
                                               al. 2014; Schulman et al. 2015)
``score-baseline`` ``TraceGraph_ELBO``         as ``score`` with a decaying-average baseline
                                               (Mnih & Gregor 2014)
``stl``            ``Trace_ELBO``              pathwise, "sticking the landing": the score
                                               term of log q dropped (Roeder et al. 2017)
``score-naive``    ``Reinforce_ELBO``          plain REINFORCE (Williams 1992): every score
                                               weighted by the whole ELBO, no Rao-Blackwell-
                                               ization (Pyro's Trace_ELBO already sums the
                                               weight only to each site's plates)
``score-nn-        ``TraceGraph_ELBO``         as ``score`` with a learned input-dependent
baseline``                                     baseline b(x), own Adam lr (Mnih & Gregor 2014)
``enum``           ``TraceEnum_ELBO``          discrete guide sites summed exactly (parallel
                                               enumeration); others as ``reparam``
``iwae``           ``IWAE_ELBO`` (ppgen)       pathwise gradient of the per-datapoint
                                               importance-weighted bound (Burda et al. 2016)
=================  ==========================  ===============================================
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import pyro.distributions as dist
import torch
from pyro import infer
from pyro.poutine.messenger import Messenger

from ppgen.infer import guide_transforms as _gt
from ppgen.infer.reinforce import Reinforce_ELBO
from ppgen.infer.evidence import IWAE_ELBO

__all__ = ["Estimator", "ESTIMATORS", "get_estimator", "make_elbo", "prepare_guide"]


class Estimator(NamedTuple):
    """A named gradient estimator.

    :param elbo_class: Pyro ELBO class to instantiate.
    :param reparameterized: if false, the guide's latent sites are made score-function only.
    :param baseline: Pyro ``infer={"baseline": ...}`` options put on each guide latent site.
    :param description: one line for ``--help`` and tables.
    :param guide_transform: optional ``guide -> guide`` that :func:`prepare_guide` applies
        instead of its default handling (sticking the landing, a learned baseline, enumeration;
        see :mod:`ppgen.infer.guide_transforms`).
    """

    name: str
    elbo_class: Callable[..., infer.ELBO]
    reparameterized: bool
    baseline: Optional[dict]
    description: str
    guide_transform: Optional[Callable[[Callable], Callable]] = None


#: name -> :class:`Estimator`. Users may add their own entries.
ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in [
        Estimator("reparam", infer.Trace_ELBO, True, None, "reparameterized (pathwise) gradient"),
        Estimator(
            "analytic-kl",
            infer.TraceMeanField_ELBO,
            True,
            None,
            "reparameterized, analytic KL(q || p)",
        ),
        Estimator(
            "score",
            infer.TraceGraph_ELBO,
            False,
            None,
            "score function, Rao-Blackwellized (TraceGraph_ELBO)",
        ),
        Estimator(
            "score-baseline",
            infer.TraceGraph_ELBO,
            False,
            {"use_decaying_avg_baseline": True, "baseline_beta": 0.95},
            "score function with a decaying-average baseline",
        ),
        Estimator(
            "stl",
            infer.Trace_ELBO,
            True,
            None,
            "reparameterized, sticking the landing (Roeder et al. 2017)",
            _gt.sticking_the_landing,
        ),
        Estimator("score-naive", Reinforce_ELBO, False, None, "plain REINFORCE, no Rao-Blackwellization"),
        Estimator(
            "score-nn-baseline",
            infer.TraceGraph_ELBO,
            False,
            None,
            "score function with a learned baseline network b(x) (Adam, lr 1e-3)",
            _gt.nn_baseline(lr=1e-3),
        ),
        Estimator(
            "enum",
            infer.TraceEnum_ELBO,
            True,
            None,
            "exact sum over discrete guide sites (TraceEnum_ELBO)",
            _gt.enumerate_guide,
        ),
        Estimator(
            "iwae",
            IWAE_ELBO,
            True,
            None,
            "importance-weighted bound per datapoint, K = --particles (Burda et al. 2016)",
        ),
    ]
}


def _discrete_score_guide(guide: Callable) -> Callable:
    from ppgen.models.m2 import discrete_score_guide

    return discrete_score_guide(guide)


# Mixed models (M2): score function on the discrete sites only, pathwise on the continuous ones.
ESTIMATORS["score-discrete"] = Estimator(
    "score-discrete",
    infer.TraceGraph_ELBO,
    True,
    None,
    "score function (decaying-average baseline) on discrete sites, pathwise on the rest",
    _discrete_score_guide,
)


def get_estimator(name: str) -> Estimator:
    """Look an estimator up by name; unknown names get the list of known ones."""
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown estimator {name!r}; known estimators: {', '.join(ESTIMATORS)}"
        ) from None


def make_elbo(
    name: str,
    num_particles: int = 1,
    vectorize_particles: bool = False,
    max_plate_nesting: Optional[int] = None,
) -> infer.ELBO:
    """The Pyro ELBO object for estimator ``name``.

    :param num_particles: samples per gradient estimate (averaged).
    :param vectorize_particles: draw the particles in one vectorized pass (needs
        ``max_plate_nesting``, guessed by tracing if not given).
    """
    est = get_estimator(name)
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    kwargs: dict = {"num_particles": num_particles, "vectorize_particles": vectorize_particles}
    if max_plate_nesting is not None:
        kwargs["max_plate_nesting"] = max_plate_nesting
    return est.elbo_class(**kwargs)


class _SettableRsample:
    """Mixin: ``has_rsample`` reads and writes the wrapped base distribution's."""

    @property
    def has_rsample(self) -> bool:
        return self.base_dist.has_rsample

    @has_rsample.setter
    def has_rsample(self, value: bool) -> None:
        self.base_dist.has_rsample = value


class _Transformed(_SettableRsample, dist.TransformedDistribution):
    pass


class _Independent(_SettableRsample, dist.Independent):
    pass


def _settable(fn):
    """``fn`` rebuilt so that ``fn.has_rsample = False`` works through its wrappers.

    Marking only the innermost distribution is not enough: when a plate later expands the site
    (vectorized particles), Pyro's broadcasting copies the mark onto the expanded wrapper by
    assignment, which torch's ``Independent``/``TransformedDistribution`` properties refuse.
    The subclasses keep every KL registration (type dispatch goes through the MRO)."""
    if isinstance(fn, torch.distributions.TransformedDistribution):
        return _Transformed(_settable(fn.base_dist), fn.transforms)
    if isinstance(fn, torch.distributions.Independent):
        return _Independent(_settable(fn.base_dist), fn.reinterpreted_batch_ndims)
    return fn


def _detach_sampling(fn):
    """``fn`` with score-function (non-reparameterized) sampling, through its wrappers."""
    fn = _settable(fn)
    try:
        fn.has_rsample = False
    except AttributeError:  # another wrapper (e.g. masked) that forwards to its base
        if not hasattr(fn, "base_dist"):
            raise
        _detach_sampling(fn.base_dist)
    return fn


class ScoreFunctionMessenger(Messenger):
    """Marks every latent sample site non-reparameterized and attaches baseline options."""

    def __init__(self, baseline: Optional[dict] = None):
        super().__init__()
        self.baseline = baseline

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        if msg["fn"].has_rsample:
            msg["fn"] = _detach_sampling(msg["fn"])
        if self.baseline is not None:
            msg["infer"] = {**msg["infer"], "baseline": dict(self.baseline)}


def prepare_guide(name: str, guide: Callable) -> Callable:
    """The guide as estimator ``name`` must see it: unchanged for pathwise estimators,
    wrapped by :class:`ScoreFunctionMessenger` for score-function ones."""
    est = get_estimator(name)
    if not est.reparameterized and est.guide_transform is None:
        return ScoreFunctionMessenger(est.baseline)(guide)
    return guide if est.guide_transform is None else est.guide_transform(guide)
