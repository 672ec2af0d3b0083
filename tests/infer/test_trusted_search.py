"""``trusted_evidence``'s search of the widening (:class:`ppgen.infer.trusted.WidthSearch`), checked
on linear-Gaussian models with exact evidence: a posterior with correlation 0.85 whose best
diagonal ``q*`` (the ELBO's optimum) is too narrow for the fixed grid 1.2-1.4, so the pilot asks
for wider; the search must reach it, leave fewer untrusted datapoints than the fixed grid at the
same budget, keep every estimate within its errors of the exact ``log p(x)``, and stay in budget
counted in actual model evaluations."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer.evidence import khat_untrusted
from ppgen.infer.proposals import Proposal, Refined, Widened
from ppgen.infer.trusted import WidthSearch, _extend, trusted_evidence
from ppgen.models.linear_gaussian import LinearGaussian

N, PILOT, K, BUDGET = 60, 30, 1000, 2.0


def correlated(rho: float = 0.85, precision: float = 10.0) -> LinearGaussian:
    """``x = W z + eps`` in 2-D whose posterior precision is ``[[a, -rho a], [-rho a, a]]``."""
    gram = torch.tensor([[precision - 1, -rho * precision], [-rho * precision, precision - 1]], dtype=torch.float64)
    return LinearGaussian(torch.linalg.cholesky(gram).T.contiguous(), torch.zeros(2, dtype=torch.float64), 1.0)


LG = correlated()
X = LG.sample(N, seed=1)
EXACT = LG.log_evidence(X)


class Counted:
    """``LG.model`` counting its (particle, datapoint) evaluations of the likelihood."""

    def __init__(self):
        self.evals = 0

    def __call__(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            self.evals += z.shape[:-1].numel()
            pyro.sample("x", dist.Normal(z @ LG.weight.T + LG.bias, LG.noise).to_event(1), obs=x)


def grid():
    refined = Refined(5, 4, elbo_samples=50)
    return [Widened(refined, f) for f in (1.2, 1.3, 1.4)]


def run(extend, model=LG.model):
    return trusted_evidence(model, LG.mean_field_guide, X, K, candidates=grid(), budget=BUDGET, pilot=PILOT,
                            extend=extend, batch_size=N)


def untrusted(t):
    return float(khat_untrusted(t.result.khat, t.result.num_samples).double().mean())


def test_the_search_goes_wider_than_the_grid_and_trusts_more_within_budget():
    fixed, searched = run(False), run(True)
    # the fixed grid: half of the datapoints stay untrusted (1.3 and 1.4 tie on the pilot)
    assert fixed.plan["tried"] == 3 and fixed.plan["search"] is None and untrusted(fixed) > 0.4
    # the search steps x1.15 past 1.4 while the pilot's share falls: 1.61 ... 2.448 trusts all
    assert searched.plan["candidates"][:3] == fixed.plan["candidates"] and searched.plan["tried"] > 3
    chosen = float(searched.chosen.split("*")[1])
    assert chosen > 2.0 and searched.pilot[searched.chosen] < min(searched.pilot[c] for c in fixed.plan["candidates"])
    assert untrusted(searched) < 0.1 < 0.4 < untrusted(fixed)
    # both are unbiased: every datapoint within 4.5 standard errors of the exact log p(x)
    for t in (fixed, searched):
        assert ((t.result.log_px - EXACT).abs() < 4.5 * t.result.stderr).all()
        assert float((t.result.log_px - EXACT).mean().abs()) < 3 * float(t.result.stderr.pow(2).sum().sqrt()) / N
        # the same budget; the search reserved its steps' pilot draws, so it draws fewer K
        assert t.plan["spent_evals"] <= t.plan["planned_evals"] <= t.plan["budget_evals"] + 1e-9
    assert searched.result.num_samples < fixed.result.num_samples


@pytest.mark.parametrize("batch_size", [N, 20])  # 20: the pilot is refined again per candidate
@pytest.mark.parametrize("extend", [False, True, WidthSearch(step=1.3, cap=2.0, extra=2)])
def test_the_budget_holds_in_counted_model_evaluations(extend, batch_size):
    model = Counted()
    t = trusted_evidence(model, LG.mean_field_guide, X, K, candidates=grid(), budget=BUDGET, pilot=PILOT,
                         extend=extend, batch_size=batch_size)
    k, tried = t.result.num_samples, t.plan["tried"]
    search = extend if isinstance(extend, WidthSearch) else WidthSearch() if extend else None
    assert tried <= 3 + (search.extra if search else 0)
    if search is not None:  # every factor tried is on the search's grid: within the cap, steps of `step`
        factors = [float(c.split("*")[1]) for c in t.plan["candidates"]]
        assert max(factors) <= search.cap and factors[3:] == sorted(factors[3:])
        assert all(b / a == pytest.approx(search.step, abs=0.01) or b == search.cap
                   for a, b in zip(factors[2:], factors[3:]))
    # the IS draws alone: K on every datapoint, K more on the pilot per further candidate tried
    draws = k * (N + (tried - 1) * PILOT)
    assert model.evals >= draws
    # all forward evaluations (refinement, ELBOs, checks) within the budget of plain IS with K
    assert model.evals <= BUDGET * K * N
    assert t.plan["spent_evals"] * N >= draws and t.plan["planned_evals"] <= BUDGET * K + 1e-9


def test_a_user_list_is_tried_as_given_unless_asked_and_the_default_reserves_the_search():
    refined = Refined(5, 4, elbo_samples=50)
    cands = [Widened(refined, 1.0), Widened(refined, 1.2)]
    t = trusted_evidence(LG.model, LG.mean_field_guide, X, K, candidates=cands, budget=BUDGET, pilot=PILOT,
                         batch_size=N)
    assert t.plan["tried"] == 2 and t.plan["search"] is None and set(t.pilot) == {c.name for c in cands}
    assert ((t.result.log_px - EXACT).abs() < 4.5 * t.result.stderr).all()
    with pytest.raises(ValueError, match="Widened.*same r.*extend=False"):
        trusted_evidence(LG.model, LG.mean_field_guide, X, K, candidates=[refined, Widened(refined, 1.2)],
                         extend=True)
    with pytest.raises(ValueError, match="Widened.*same r"):  # two Refined objects: two q*, not one grid
        trusted_evidence(LG.model, LG.mean_field_guide, X, K, candidates=[Widened(Refined(), 1.2),
                                                                          Widened(Refined(), 1.3)], extend=True)
    with pytest.raises(TypeError, match="extend must be"):
        trusted_evidence(LG.model, LG.mean_field_guide, X, K, candidates=cands, extend="wide")
    # the default candidates are searched: the plan reserves the search's 4 steps on the pilot. Here
    # refining costs 2600 of the 1.5 x 1760 evaluations per datapoint, leaving 40 x 60 for draws:
    # K = 2400 / (60 + 2 x 60) = 13 without the search, 2400 / (60 + 6 x 60) = 5 < 10 with it
    with pytest.raises(ValueError, match="4 search steps.*extend=False"):
        trusted_evidence(LG.model, LG.mean_field_guide, X, 1760, budget=1.5, pilot=N)
    t = trusted_evidence(LG.model, LG.mean_field_guide, X, 1760, budget=1.5, pilot=N, extend=False)
    assert t.result.num_samples == 13 and t.plan["tried"] == 3 and t.plan["search"] is None
    for bad, match in (({"step": 1.0}, "step"), ({"cap": 0.5}, "cap"), ({"extra": 0}, "extra")):
        with pytest.raises(ValueError, match=match):
            WidthSearch(**bad)


class _Fixed(Proposal):
    name = "r"


@pytest.mark.parametrize("start, best, want", [
    ((1.2, 1.3, 1.4), 1.9, [1.61, 1.851, 2.129]),  # outward while the share falls, stops past the best
    ((1.2, 1.3, 1.4), 1.3, []),  # an interior winner: no search
    ((1.0, 1.2), 0.5, [0.87, 0.757, 0.658, 0.572]),  # inward, stopped by `extra`
    ((2.5,), 9.0, [2.875, 3.0]),  # one factor: outward first, stopped by the cap
    ((1.0,), 0.8, [1.15, 0.87, 0.757, 0.658]),  # one factor: outward did not help, then inward
])
def test_the_search_steps(start, best, want):
    """The search's logic alone, on a made-up pilot whose untrusted share is ``|log(f / best)|``."""
    inner = _Fixed()
    tried = [Widened(inner, f) for f in start]
    shares = {c.name: abs(torch.tensor(c.factor / best).log().item()) for c in tried}
    added = []

    def score(c):
        tried.append(c)
        added.append(c.factor)
        shares[c.name] = abs(torch.tensor(c.factor / best).log().item())
        return shares[c.name]

    _extend(inner, tried, shares, score, WidthSearch())
    assert added == pytest.approx(want)
