"""Does the guide propose every value of a discrete latent that the model allows?

Importance sampling estimates ``p(x) = sum_y p(x, y)`` without bias only when the proposal is
positive wherever the integrand is (Owen 2013, "Monte Carlo theory, methods and examples",
sec. 9.1). A guide that gives probability exactly 0 to a value ``y'`` of a discrete latent that the
model allows never proposes it, so every weight, and hence the estimate, misses the term
``p(x, y')``: with a semi-supervised guide that pins ``y`` to a given label (Kingma et al. 2014's
M2 called with its labels), IS estimates ``log p(x, y)``, not ``log p(x)``, however many samples,
and the weights are all alike, so neither the standard error nor k-hat gives it away.

:func:`check_guide_support` refuses such a pair before any sampling, naming the site, the number
of datapoints affected and what to do. It costs one guide trace and one model trace replaying it
per chunk of datapoints, taken off the caller's random stream (:func:`ppgen.infer.plates._trace_pair`:
the caller's RNG state and every later draw are unchanged), and stops after the first chunk when
the guide has no latent with enumerable support (continuous models pay one trace pair).

"Probability 0" is read as the guide's sampler sees it: the value's ``exp(log_prob)`` is 0 in the
distribution's dtype (``-inf`` logits, or a logit gap so large that it underflows: ``exp(-1e4)``),
or, for ``Categorical``, ``OneHotCategorical`` and a ``Bernoulli`` built from ``probs``, the
``probs`` they draw from are exactly 0 there (``OneHotCategorical(probs=one_hot)``, whose
``log_prob`` torch clamps to ``log(eps)``, about -15.9 in float32, although the value is never
drawn). A ``Bernoulli`` built from logits is read by ``log_prob`` only: its ``probs`` round to 1
from a logit of about 17 in float32, where the other value still has ``exp(-17)``. A value is
allowed by the model where the same test finds its probability positive, so a model whose support
depends on the data (zeros in its ``probs``, ``-inf`` logits) is checked against the values it
allows. A vector of such latents (``Bernoulli(p).to_event(1)``) is checked element by element.

Not refused: a guide that is merely confident (``1e-30`` is drawn rarely but is not 0), and
enumerated sites (``infer={"enumerate": ...}``), which plain traces draw like any other. Not
checked: latents without enumerable support (``Poisson``, ``Geometric``), and values of the model
beyond the guide's enumerated support (a model with more classes than its guide).
"""

from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Optional

import torch
from pyro.poutine.util import site_is_subsample

from ppgen.infer.plates import _trace_pair

__all__ = ["Uncovered", "uncovered_values", "check_guide_support", "GuideSupportError", "UNCOVERED_ADVICE"]

#: what :func:`check_guide_support` tells a Python caller to do (a CLI passes its own words).
UNCOVERED_ADVICE = (
    "If these are labels given as data (a semi-supervised model called with its labels), call the model "
    "without them to score log p(x) (e.g. log_evidence(model, guide, xs), not with (xs, ys, labelled)); "
    "otherwise give every value the model allows a positive probability in the guide (e.g. mix its "
    "probabilities with a little of the uniform)"
)


class GuideSupportError(ValueError):
    """:func:`check_guide_support`'s refusal. ``problem`` is the message without its advice, so a
    caller that names its own remedies (``ppgen evidence``: its flags) can reword it."""

    def __init__(self, problem: str, advice: str):
        super().__init__(f"{problem} {advice}")
        self.problem = problem


class Uncovered(NamedTuple):
    """One site's values that the guide never proposes, counted by :func:`uncovered_values`.

    :param count: datapoints (positions of the datapoint plate) with at least one such value; for
        a site outside the datapoint plate, 1 if it has any.
    :param size: datapoints looked at (1 for a site outside the datapoint plate).
    :param in_plate: whether the site sits in the datapoint plate.
    """

    count: int
    size: int
    in_plate: bool


def _draw_probability(fn, values: torch.Tensor) -> Optional[torch.Tensor]:
    """``(V, *batch)``: the probability with which ``fn``'s sampler draws each of ``values`` (its
    ``enumerate_support(expand=False)``), for the families that draw from ``probs``; else None."""
    if isinstance(fn, torch.distributions.OneHotCategorical):
        p = fn.probs  # (*batch, C); values (V, 1.., 1, C) one-hot: the sum picks p exactly
        return (p * values).sum(-1) if values.shape[-1] == p.shape[-1] else None
    if isinstance(fn, torch.distributions.Categorical):
        p = fn.probs  # (*batch, C); values (V, 1.., 1) class indices
        index = values.long()
        if index.numel() == 0 or index.min() < 0 or index.max() >= p.shape[-1]:
            return None
        shape = (index.shape[0], *p.shape[:-1])
        return p.unsqueeze(0).expand(*shape, p.shape[-1]).gather(-1, index.unsqueeze(-1).expand(*shape, 1))[..., 0]
    if isinstance(fn, torch.distributions.Bernoulli) and fn._param is fn.__dict__.get("probs"):
        # built from probs only: from logits, probs = sigmoid(logits) rounds to 1 at a gap of 17 nats
        # in float32, a confident guide (exp(log_prob) keeps its 4e-8), not one that means 0
        return torch.where(values == 1, fn.probs, 1 - fn.probs)
    return None


def _never_drawn(fn, values: torch.Tensor) -> torch.Tensor:
    """``(V, *batch)`` boolean: where ``fn`` gives ``values`` probability exactly 0 (module docstring)."""
    zero = fn.log_prob(values).exp() == 0
    p = _draw_probability(fn, values)
    return zero if p is None else zero | (p == 0)


def _elementwise(fn) -> tuple:
    """``(base, k)``: ``fn`` without its ``Independent`` layers (``.to_event(k)`` of a Bernoulli,
    whose elements are each enumerable) and the number of batch dims they made event dims."""
    k = 0
    while isinstance(fn, torch.distributions.Independent):
        fn, k = fn.base_dist, k + fn.reinterpreted_batch_ndims
    return fn, k


def _site_uncovered(site: dict, model_site: dict, data_plate: str) -> Optional[Uncovered]:
    """:class:`Uncovered` of one guide site against the model's, or None when it cannot be checked
    (no enumerable support, or the model cannot score the guide's values)."""
    (fn, k), (model_fn, model_k) = _elementwise(site["fn"]), _elementwise(model_site["fn"])
    if k != model_k:
        return None  # model and guide disagree on the site's shape; IS itself will say so
    try:
        values = fn.enumerate_support(expand=False)  # (V, 1, .., 1, *event)
        missed = _never_drawn(fn, values) & ~_never_drawn(model_fn, values)  # (V, *batch)
    except (NotImplementedError, ValueError, RuntimeError, IndexError):
        return None  # e.g. a Binomial of unequal total counts; IS itself will say what is wrong
    missed = missed.any(0)  # (*batch)
    if k:  # an element of a .to_event(k) vector missed: the site's value is missed
        missed = missed.reshape(*missed.shape[:missed.ndim - k], -1).any(-1)
    frame = next((f for f in site["cond_indep_stack"] if f.name == data_plate and f.vectorized), None)
    if frame is None or -frame.dim > missed.ndim:
        return Uncovered(int(missed.any()), 1, False)
    per_datapoint = missed.movedim(frame.dim, 0).reshape(missed.shape[frame.dim], -1).any(1)
    return Uncovered(int(per_datapoint.sum()), len(per_datapoint), True)


def uncovered_values(model: Callable, guide: Callable, calls: Iterable[tuple[tuple, dict]],
                     data_plate: str) -> dict[str, Uncovered]:
    """``{site: Uncovered}`` of the guide's discrete latents that give probability 0 to a value
    the model allows, summed over chunks of datapoints (sites without such values left out).

    :param calls: ``(args, kwargs)`` of ``model``/``guide`` for each chunk of datapoints; only the
        first is traced when its guide draws no latent with enumerable support.
    :param data_plate: name of the datapoint plate (as found by
        :func:`ppgen.infer.traces.find_data_plate`); a site outside it counts once.
    """
    out: dict[str, Uncovered] = {}
    for args, kwargs in calls:
        g, m = _trace_pair(model, guide, args, kwargs)
        discrete = [(name, site) for name, site in g.nodes.items()
                    if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
                    and getattr(_elementwise(site["fn"])[0], "has_enumerate_support", False)
                    and name in m.nodes and not m.nodes[name]["is_observed"]]
        if not discrete:
            break  # a continuous pair: one trace pair is all it costs
        for name, site in discrete:
            found = _site_uncovered(site, m.nodes[name], data_plate)
            if found is None:
                continue
            before = out.get(name, Uncovered(0, 0, found.in_plate))
            count = before.count + found.count if found.in_plate else max(before.count, found.count)
            out[name] = Uncovered(count, before.size + found.size if found.in_plate else 1, found.in_plate)
    return {name: u for name, u in out.items() if u.count}


def check_guide_support(model: Callable, guide: Callable, calls: Iterable[tuple[tuple, dict]], data_plate: str,
                        advice: str = UNCOVERED_ADVICE, subject: str = "the guide") -> None:
    """Refuse a guide that never proposes values of a discrete latent that the model allows
    (:func:`uncovered_values`; the module docstring says why and what counts as probability 0).

    :param calls: ``(args, kwargs)`` per chunk of datapoints, as the caller will call the pair.
    :param data_plate: name of the datapoint plate.
    :param advice: what to do, appended to the message (a CLI names its own flags).
    :param subject: who gives probability 0 (``"the guide of runs/m2"``).
    :raises GuideSupportError: (a ``ValueError``) naming each such site and the number of
        datapoints affected.
    """
    found = uncovered_values(model, guide, calls, data_plate)
    if not found:
        return
    where = ", ".join(f"{name!r} in {u.count} of {u.size} datapoints" if u.in_plate
                      else f"{name!r} outside the datapoint plate {data_plate!r}" for name, u in found.items())
    raise GuideSupportError(
        f"{subject} gives probability 0 to values of discrete latents that the model allows ({where}): "
        "importance sampling then estimates the evidence of the values the guide proposes only (e.g. "
        "log p(x, y) where the guide pins a given label), not log p(x), however many samples.", advice)
