"""Evidence you can trust: the proposal that leaves the fewest untrusted datapoints, and the
inference gap split into approximation and amortization (Cremer, Li & Duvenaud 2018).

:func:`trusted_evidence` runs importance sampling (:func:`ppgen.infer.evidence.log_evidence`)
from refined local proposals (:mod:`ppgen.infer.proposals`) within a compute budget it states:

1. the budget is ``budget`` times the cost of plain IS from the guide with ``num_samples`` draws,
   counted in model evaluations per datapoint (a gradient step counts three);
2. every candidate is tried on a pilot of the first ``pilot`` datapoints (the refined ``q*`` is
   computed once and shared by all candidates built on it); the one with the smallest share of
   k-hat above :func:`~ppgen.infer.evidence.khat_threshold` wins (ties: the first listed);
3. when the candidates are widenings of one proposal (:func:`default_candidates`) and the
   :class:`WidthSearch` is on (the default for the default candidates), a widest (narrowest)
   factor among the best, with untrusted datapoints left, means the pilot may ask for wider
   (narrower): the grid is extended past that end in geometric steps (outward first), reusing the
   one ``q*`` (a step costs only its ``K`` draws on the pilot), while the pilot's untrusted share
   keeps falling below the best so far, up to ``extra`` steps and factors within
   ``[1 / cap, cap]``; a step is chosen only if it beats every candidate tried before it. Models
   need different widths (ProdLDA's logistic-normal ``q*`` about 1.5-1.6x, a VAE's on
   Fashion-MNIST 1.3x): no fixed grid fits every model;
4. the winner runs on the remaining datapoints, its pilot result is kept, and the number of
   draws ``K`` is the largest (at most ``num_samples``) that keeps the whole plan in budget, the
   pilot draws of all ``extra`` possible steps included (reserved before the pilot; what the
   search did not use is left unspent).

Which candidate ran, the pilot's shares, the planned cost and the budget are returned with the
result. Every candidate keeps IS unbiased for ``p(x)``: the choice only decides how far the
weights' tails reach, and each datapoint's k-hat says whether its estimate is trusted.

:func:`inference_gaps` reads, per datapoint, ``L[q]`` (the encoder's ELBO), ``L[q*]`` (the
refined one's) and the IS ``log p(x)``, and returns

    approximation gap = log p(x) - L[q*],   amortization gap = L[q*] - L[q],

with Monte Carlo standard errors from independent draws (``sqrt(se_a^2 + se_b^2)``); the run's
mean carries ``sqrt(sum se^2) / N`` (the error of the mean over these fixed datapoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import NamedTuple, Optional, Sequence, Union

import torch

from ppgen.infer.batches import as_batch
from ppgen.infer.evidence import EvidenceResult, khat_threshold, khat_untrusted, log_evidence
from ppgen.infer.proposals import Proposal, Refined, Widened, refined_of
from ppgen.infer.traces import DATA

__all__ = ["default_candidates", "WidthSearch", "trusted_evidence", "TrustedResult", "inference_gaps", "Gaps"]

#: the smallest K whose sample-size threshold is 0.7 (Vehtari et al. 2024: 1 - 1/log10 K >= 0.7)
K_FULL_THRESHOLD = 2154


def default_candidates(steps: int = 50, samples: int = 16, lr: float = 0.05,
                       factors: Sequence[float] = (1.2, 1.3, 1.4)) -> list[Proposal]:
    """``q*`` (one :class:`~ppgen.infer.proposals.Refined`) widened by each of ``factors``."""
    refined = Refined(steps, samples, lr)
    return [Widened(refined, f) for f in factors]


@dataclasses.dataclass(frozen=True)
class WidthSearch:
    """How :func:`trusted_evidence` extends a grid of widenings ``Widened(r, f)`` of one proposal
    ``r`` past the end the pilot prefers (see the module docstring)."""

    step: float = 1.15  # each new factor is the grid's end factor times `step` (outward) or over it (inward)
    cap: float = 3.0  # no factor above `cap` nor below `1 / cap` is tried (the last step stops at it)
    extra: int = 4  # most candidates added to the grid; their pilot draws are reserved in the budget

    def __post_init__(self) -> None:
        if not (isinstance(self.step, (int, float)) and math.isfinite(self.step) and self.step > 1):
            raise ValueError(f"step must be a number > 1 (the ratio between neighbouring factors), got {self.step!r}")
        if not (isinstance(self.cap, (int, float)) and math.isfinite(self.cap) and self.cap >= 1):
            raise ValueError(f"cap must be a number >= 1 (the widest factor; 1 / cap the narrowest), got {self.cap!r}")
        if isinstance(self.extra, bool) or not isinstance(self.extra, int) or self.extra < 1:
            raise ValueError(f"extra must be a positive integer (candidates added at most), got {self.extra!r}")


def _width_search(extend, candidates: Optional[Sequence]) -> Optional[WidthSearch]:
    """The search to run: the default candidates are searched, a user's list is tried as given
    unless ``extend`` asks (``True`` or a :class:`WidthSearch`)."""
    if extend is None:
        return WidthSearch() if candidates is None else None
    if isinstance(extend, bool):
        return WidthSearch() if extend else None
    if isinstance(extend, WidthSearch):
        return extend
    raise TypeError(f"extend must be None, a bool or a WidthSearch, got {extend!r}")


def _grid_inner(candidates: list) -> Proposal:
    """The one proposal all ``candidates`` widen (the same object), or a ValueError."""
    inners = {id(c.inner) for c in candidates if isinstance(c, Widened)}
    if len(inners) != 1 or not all(isinstance(c, Widened) for c in candidates):
        raise ValueError(
            f"extend searches the widening of one proposal: candidates must all be Widened(r, factor) with the same r "
            f"(e.g. default_candidates() or [Widened(r, f) for f in (1.2, 1.4)]), got {candidates!r}; "
            "pass extend=False to try them as given"
        )
    return candidates[0].inner


class TrustedResult(NamedTuple):
    """What :func:`trusted_evidence` returns.

    :param result: the chosen proposal's :class:`~ppgen.infer.evidence.EvidenceResult` on all ``N``.
    :param chosen: the chosen proposal's name.
    :param pilot: ``{candidate name: share of pilot datapoints above the k-hat threshold}``.
    :param plan: the budget and the plan: ``budget_evals`` (per datapoint), ``planned_evals`` (the
        plan's cost with every search step it reserved, at most the budget), ``spent_evals`` (with
        the steps taken), ``num_samples`` actually drawn, ``pilot`` size, ``candidates`` (the names
        tried, the grid's first), ``tried`` (their number), ``grid`` (the given list's length),
        ``search`` (the :class:`WidthSearch` as a dict, or ``None``), ``seconds``.
    """

    result: EvidenceResult
    chosen: str
    pilot: dict
    plan: dict


def _cat(a: EvidenceResult, b: Optional[EvidenceResult]) -> EvidenceResult:
    if b is None:
        return a
    n_a, n_b = len(a.log_px), len(b.log_px)
    ladder = {k: (a.ladder[k] * n_a + b.ladder[k] * n_b) / (n_a + n_b) for k in a.ladder}
    local = None if a.local is None else {k: torch.cat([a.local[k], b.local[k]]) for k in a.local}
    tensors = {f: torch.cat([getattr(a, f), getattr(b, f)]) for f in ("log_px", "stderr", "ess", "khat", "elbo")}
    return a._replace(ladder=ladder, local=local, **tensors)


def trusted_evidence(model, guide, data, num_samples: int = 5000, *, candidates: Optional[Sequence[Proposal]] = None,
                     budget: float = 1.5, pilot: int = 50, extend: Union[bool, WidthSearch, None] = None,
                     seed: Optional[int] = 0, batch_size: int = 100, particle_chunk: int = 500, progress: bool = False,
                     data_plate: str = DATA) -> TrustedResult:
    """Per-datapoint ``log p(x)`` from the candidate proposal with the fewest untrusted datapoints.

    :param model: a Pyro model with one local latent site whose guide is Gaussian (the VAE's
        ``diag`` and ``fullcov`` posteriors) or a Gaussian under fixed bijective transforms
        (``LogNormal``, a logistic-normal, the IAF posterior); other pairs are refused by the
        proposals, naming ``log_evidence(..., proposal=None)`` (the guide) and AIS instead. A model
        that cannot take a particle plate (a ``BatchNorm1d`` decoder) is scored one trace per
        particle (:mod:`ppgen.infer.proposals`).
    :param data: as for :func:`~ppgen.infer.evidence.log_evidence` (the first ``pilot`` rows
        choose the proposal).
    :param num_samples: ``K`` of the plain IS whose cost sets the budget (and the most draws used).
    :param candidates: proposals to choose from (default :func:`default_candidates`).
    :param budget: the plan's cost may be at most ``budget`` times that of plain IS with ``K``,
        the pilot draws of every candidate the search may add included.
    :param pilot: datapoints the candidates are compared on (``min(pilot, N)``); at most
        ``batch_size`` is cheapest (a :class:`~ppgen.infer.proposals.Refined` keeps the last
        chunk's ``q*``: a pilot of several chunks is refined again for every candidate, and the
        plan counts it).
    :param extend: whether to extend a grid of widenings past its ends (module docstring, step 3):
        ``None`` (default) searches the default candidates and tries a user's list as given;
        ``True`` or a :class:`WidthSearch` searches the given list too, which must then widen one
        proposal object (``[Widened(r, f) for f in factors]``); ``False`` tries the list as given.
    :param seed, batch_size, particle_chunk, progress, data_plate: as for ``log_evidence`` (the
        pilot draws with ``seed``, the rest with ``seed + 1``).
    """
    search = _width_search(extend, candidates)
    candidates = list(candidates) if candidates is not None else default_candidates()
    if not candidates or not all(isinstance(c, Proposal) for c in candidates):
        raise TypeError(f"candidates must be a non-empty list of Proposal objects, got {candidates!r}")
    inner = _grid_inner(candidates) if search is not None else None
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive number (a multiple of plain IS's cost), got {budget!r}")
    if isinstance(pilot, bool) or not isinstance(pilot, int) or pilot < 1:
        raise ValueError(f"pilot must be a positive integer (datapoints), got {pilot!r}")
    batch = as_batch(data, "data", model)
    n, p = batch.size, min(pilot, batch.size)
    # Plan: preparing (refining) costs the same for all candidates sharing it; draws K each on the
    # pilot, the search's possible steps included (they widen the same q*: no new preparation). A
    # Refined keeps the last chunk's q*: a pilot of several chunks is prepared again per candidate.
    prep = max(c.cost(0) for c in candidates)
    reserve = search.extra if search is not None else 0
    again = p if isinstance(batch_size, int) and p > batch_size else 0

    def cost(more: int) -> tuple[float, float]:  # (fixed, per draw) with `more` candidates after the first
        return prep * (n + more * again), n + more * p

    allowed = budget * num_samples * n
    fixed, per_draw = cost(len(candidates) - 1 + reserve)
    k = int((allowed - fixed) // per_draw)
    k = min(num_samples, k)
    if k < 10:
        steps = f" and {reserve} search steps on the pilot (extend)" if reserve else ""
        raise ValueError(
            f"budget={budget} x plain IS with K={num_samples} leaves {k} draws per datapoint after preparing the "
            f"proposals ({prep:.0f} model evaluations each){steps}: raise budget or num_samples, or use fewer "
            "refine steps" + (", or fewer search steps (WidthSearch(extra=...)) or extend=False" if reserve else "")
        )
    common = dict(batch_size=batch_size, particle_chunk=particle_chunk, seed=seed, progress=progress,
                  data_plate=data_plate)
    t0 = time.perf_counter()
    head = batch.rows(slice(0, p)).data
    shares, results, tried = {}, {}, []

    def score(c: Proposal) -> float:
        r = log_evidence(model, guide, head, k, proposal=c, **common)
        results[c.name], shares[c.name] = r, float(khat_untrusted(r.khat, k).double().mean())
        tried.append(c)
        return shares[c.name]

    with contextlib.ExitStack() as stack:  # candidates on one Refined share its q* of the pilot
        for refined in refined_of(candidates):
            stack.enter_context(refined.keep())
        for c in candidates:
            score(c)
        if search is not None:
            _extend(inner, tried, shares, score, search)
    chosen = min(tried, key=lambda c: shares[c.name])  # first tried on ties: a step wins only by improving
    rest = None
    if p < n:
        rest = log_evidence(model, guide, batch.rows(slice(p, n)).data, k, proposal=chosen,
                            **{**common, "seed": None if seed is None else seed + 1})
    spent = cost(len(tried) - 1)
    plan = {"budget_evals": budget * num_samples,
            "planned_evals": (fixed + k * per_draw) / n,
            "spent_evals": (spent[0] + k * spent[1]) / n,
            "num_samples": k, "pilot": p, "candidates": [c.name for c in tried], "tried": len(tried),
            "grid": len(candidates), "search": None if search is None else dataclasses.asdict(search),
            "seconds": time.perf_counter() - t0,
            "khat_threshold": khat_threshold(k) if k >= 10 else None,
            "unit": "model evaluations per datapoint (a gradient step counts 3)"}
    return TrustedResult(_cat(results[chosen.name], rest), chosen.name, shares, plan)


def _extend(inner: Proposal, tried: list, shares: dict, score, search: WidthSearch) -> None:
    """Widen (or narrow) past the grid's end while the pilot's untrusted share falls (step 3 of the
    module docstring); ``score(candidate)`` runs one on the pilot and returns its share."""
    level = min(shares.values())
    if level == 0:
        return  # nothing to gain
    ends = [max(tried, key=lambda c: c.factor), min(tried, key=lambda c: c.factor)]
    ways = [(w, end) for w, end in zip((search.step, 1 / search.step), ends) if shares[end.name] == level]
    factors = [c.factor for c in tried]
    added = 0
    for way, end in ways:  # an end among the best (ties too): outward first, inward if that did not help
        f, moved = end.factor, False
        while added < search.extra:
            nxt = round(min(search.cap, max(1 / search.cap, f * way)), 3)
            if nxt == round(f, 3) or any(nxt == round(g, 3) for g in factors):
                break  # at the cap, or a factor already tried
            c = Widened(inner, nxt)
            share = score(c)
            added, f = added + 1, nxt
            factors.append(nxt)
            if share >= level:
                break
            level, moved = share, True
            if level == 0:
                break
        if moved or added >= search.extra:
            return


class Gaps(NamedTuple):
    """Per-datapoint inference gaps ``(N,)`` (float64) and their standard errors; see the module."""

    log_px: torch.Tensor
    log_px_se: torch.Tensor
    trusted: torch.Tensor
    elbo_q: torch.Tensor
    elbo_q_se: torch.Tensor
    elbo_qstar: torch.Tensor
    elbo_qstar_se: torch.Tensor
    approximation: torch.Tensor
    approximation_se: torch.Tensor
    amortization: torch.Tensor
    amortization_se: torch.Tensor

    def summary(self) -> dict:
        """Run means (nats per datapoint) with their standard errors, over all datapoints and over
        the trusted ones."""
        out = {"n": len(self.log_px), "share_trusted": float(self.trusted.double().mean())}
        for name in ("log_px", "elbo_q", "elbo_qstar", "approximation", "amortization"):
            value, se = getattr(self, name), getattr(self, name + "_se")
            out[name] = float(value.mean())
            out[name + "_se"] = float(se.pow(2).sum().sqrt() / len(value))
            t = self.trusted
            out[name + "_trusted"] = float(value[t].mean()) if t.any() else None
        out["dominant"] = "amortization" if out["amortization"] > out["approximation"] else "approximation"
        return out

    def rows(self) -> list[dict]:
        """One dict per datapoint (for evidence.json)."""
        cols = {f: getattr(self, f).tolist() for f in self._fields}
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def inference_gaps(result: EvidenceResult) -> Gaps:
    """The gaps of a result drawn from a refined proposal (its ``local`` holds ``L[q]``, ``L[q*]``).

    :raises ValueError: a result without them (drawn from the guide): use a refined proposal.
    """
    local = result.local or {}
    if "elbo_qstar" not in local:
        raise ValueError(
            f"inference gaps need L[q*] from a refined proposal; this result was drawn from {result.proposal!r}. "
            "Use log_evidence(..., proposal=Widened(Refined())) or trusted_evidence(...)"
        )
    se = result.stderr
    trusted = ~khat_untrusted(result.khat, result.num_samples)
    approx = result.log_px - local["elbo_qstar"]
    amort = local["elbo_qstar"] - local["elbo_q"]
    return Gaps(result.log_px, se, trusted, local["elbo_q"], local["elbo_q_se"], local["elbo_qstar"],
                local["elbo_qstar_se"], approx, (se.pow(2) + local["elbo_qstar_se"].pow(2)).sqrt(),
                amort, (local["elbo_qstar_se"].pow(2) + local["elbo_q_se"].pow(2)).sqrt())
