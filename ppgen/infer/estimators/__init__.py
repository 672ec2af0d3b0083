"""Named gradient estimators of the ELBO, each a Pyro ELBO object plus how to treat the guide.

A guide is written once, reparameterized. Score-function estimators train the *same* guide with
its latent sites marked non-reparameterizable (``has_rsample_(False)``) by a poutine handler, so
no model or guide needs a switch of its own.

=================  ==========================  ===============================================
name               Pyro ELBO                   gradient
=================  ==========================  ===============================================
``reparam``        ``Trace_ELBO``              pathwise (Kingma & Welling 2014)
``analytic-kl``    ``TraceMeanField_ELBO``     pathwise, KL term in closed form where known;
                                               reparameterized guide sites only
``score``          ``TraceGraph_ELBO``         score function, Rao-Blackwellized by the
                                               dependency graph (Williams 1992; Ranganath et
                                               al. 2014; Schulman et al. 2015)
``score-baseline`` ``TraceGraph_ELBO``         as ``score`` with a decaying-average baseline
                                               (Mnih & Gregor 2014)
``stl``            ``Trace_ELBO``              pathwise, "sticking the landing": the score
                                               term of log q dropped (Roeder et al. 2017)
``score-naive``    ``Reinforce_ELBO``          plain REINFORCE (Williams 1992): every score
                                               weighted by its particle's whole log p - log q,
                                               no Rao-Blackwellization (Pyro's Trace_ELBO
                                               already sums the weight only to each site's
                                               plates)
``score-nn-        ``TraceGraph_ELBO``         as ``score`` with a learned input-dependent
baseline``                                     baseline b(x), own Adam lr (Mnih & Gregor 2014)
``enum``           ``TraceEnum_ELBO``          discrete guide sites summed exactly (parallel
                                               enumeration); others as ``reparam``
``iwae``           ``IWAE_ELBO`` (ppgen)       pathwise gradient of the per-datapoint
                                               importance-weighted bound (Burda et al. 2016);
                                               reparameterized guide sites only
``dreg``           ``DReG_ELBO`` (ppgen)       the same bound, doubly reparameterized: guide
                                               gradient ``sum_k w~_k^2 dlog w_k/dz dz/dphi``,
                                               no score term (Tucker et al. 2019)
``vimco``          ``VIMCO_ELBO`` (ppgen)      the same bound by score function with leave-
                                               one-out baselines, any guide site, K >= 2
                                               (Mnih & Rezende 2016)
=================  ==========================  ===============================================

The three multi-sample estimators (:mod:`.multisample`) share one objective, ``K =
--particles``: the per-datapoint bound with the minibatch factor ``N / B`` outside each
datapoint's logsumexp and every other ``poutine.scale`` (KL warm-up) inside each log weight.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

from pyro import infer

from ppgen.infer.estimators.enumeration import enumerate_guide
from ppgen.infer.estimators.multisample import DReG_ELBO, IWAE_ELBO, VIMCO_ELBO
from ppgen.infer.estimators.pathwise import AnalyticKL_ELBO, sticking_the_landing
from ppgen.infer.estimators.score_function import Reinforce_ELBO, ScoreFunctionMessenger, nn_baseline

__all__ = ["Estimator", "ESTIMATORS", "get_estimator", "make_elbo", "prepare_guide"]


class Estimator(NamedTuple):
    """A named gradient estimator.

    :param elbo_class: Pyro ELBO class to instantiate.
    :param reparameterized: if false, the guide's latent sites are made score-function only.
    :param baseline: Pyro ``infer={"baseline": ...}`` options put on each guide latent site.
    :param description: one line for ``--help`` and tables.
    :param guide_transform: optional ``guide -> guide`` that :func:`prepare_guide` applies
        instead of its default handling (sticking the landing, a learned baseline, enumeration;
        see the family modules of this package).
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
            AnalyticKL_ELBO,
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
            sticking_the_landing,
        ),
        Estimator("score-naive", Reinforce_ELBO, False, None, "plain REINFORCE, no Rao-Blackwellization"),
        Estimator(
            "score-nn-baseline",
            infer.TraceGraph_ELBO,
            False,
            None,
            "score function with a learned baseline network b(x) (Adam, lr 1e-3)",
            nn_baseline(lr=1e-3),
        ),
        Estimator(
            "enum",
            infer.TraceEnum_ELBO,
            True,
            None,
            "exact sum over discrete guide sites (TraceEnum_ELBO)",
            enumerate_guide,
        ),
        Estimator(
            "iwae",
            IWAE_ELBO,
            True,
            None,
            "importance-weighted bound per datapoint, K = --particles (Burda et al. 2016)",
        ),
        Estimator(
            "dreg",
            DReG_ELBO,
            True,
            None,
            "importance-weighted bound, doubly reparameterized gradient (Tucker et al. 2019)",
        ),
        Estimator(
            "vimco",
            VIMCO_ELBO,
            True,  # VIMCO_ELBO detaches the draws itself; the guide is passed unchanged
            None,
            "importance-weighted bound, score function with leave-one-out baselines, K >= 2 (Mnih & Rezende 2016)",
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


def prepare_guide(name: str, guide: Callable) -> Callable:
    """The guide as estimator ``name`` must see it: unchanged for pathwise estimators,
    wrapped by :class:`ScoreFunctionMessenger` for score-function ones."""
    est = get_estimator(name)
    if not est.reparameterized and est.guide_transform is None:
        return ScoreFunctionMessenger(est.baseline)(guide)
    return guide if est.guide_transform is None else est.guide_transform(guide)
