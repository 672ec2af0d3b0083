"""The estimator conformance matrix (issue 15): every registered estimator x guide kind x
particles x model layout matches the exact gradient of its own objective, or refuses with a
ValueError that names an alternative. Models, guides, exact references and the z-score rule are
in ``conformance.py`` next to this file; ``python tests/infer/conformance.py --write
docs/conformance.md`` writes the same matrix as a table.

Cells known to be wrong are listed in :data:`KNOWN` and marked ``xfail(strict=True)``: the suite
says they fail, and it fails when one starts to hold (then delete its entry).
"""

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO

import conformance as cf
from ppgen.infer.estimators import ESTIMATORS, Estimator

#: cell name -> why it is known not to hold (reported to the estimator owners). Empty at 8619ca3:
#: analytic-kl on a discrete latent (silently dropped the score term) was the last one.
KNOWN: dict[str, str] = {}


def _cells():
    for est, guide, layout, k in cf.all_cells():
        name = cf.cell_name(est, guide, layout, k)
        marks = []
        na = cf.not_applicable(guide, layout)
        if na:
            marks.append(pytest.mark.skip(reason=f"n/a: {na}"))
        elif name in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[name]))
        yield pytest.param(est, guide, layout, k, id=name, marks=marks)


@pytest.mark.parametrize("estimator,guide,layout,k", list(_cells()))
def test_cell_holds_or_refuses(estimator, guide, layout, k, one_thread):
    cell = cf.run_cell(estimator, guide, layout, k)
    assert cell.status in ("holds", "refuses"), (
        f"{cell.name}: {cell.status} (z per component {cell.z:.2f}, along the gradient "
        f"{cell.z_direction:.2f}, paired {cell.z_paired:.2f}; threshold {cell.threshold:.2f}; "
        f"{cell.draws} draws; reference {cell.reference}): {cell.message}"
    )


#: estimator -> why float64 is known to fail. Empty since 8619ca3 (score-nn-baseline's nets were
#: float32 whatever the data: float64 data crashed deep in torch).
FLOAT64_KNOWN: dict[str, str] = {}


@pytest.mark.parametrize("estimator", [
    pytest.param(e, marks=[pytest.mark.xfail(strict=True, reason=FLOAT64_KNOWN[e])] if e in FLOAT64_KNOWN else [])
    for e in cf.estimators()
])
def test_float64_model_and_guide(estimator, one_thread):
    """A user who writes the model and data in float64 gets the same guarantees (one cell per
    estimator: the encoder guide on the event layout, K = 4)."""
    cell = cf.run_cell(estimator, "encoder", "event", 4, dtype=torch.float64)
    assert cell.status in ("holds", "refuses"), f"{cell.name} float64: {cell.status}: {cell.message}"


# ----------------------------------------------------------------- the harness checks itself
class _HalfGradientELBO(Trace_ELBO):
    """A deliberately wrong estimator: the right loss, half its gradient."""

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        (0.5 * loss).backward()
        return float(loss.detach())


def _tempered_iwae(**kwargs):
    """Pyro's RenyiELBO(alpha=0): the IWAE bound with the minibatch scale N / B applied to each
    log weight inside the logsumexp, a tempered objective (ppgen's iwae scales outside)."""
    return RenyiELBO(alpha=0.0, **kwargs)


@pytest.mark.parametrize("wrong,layout,guide,k", [
    ("half", "event", "encoder", 1),
    ("half", "discrete", "user", 1),
    ("tempered", "plate2", "iaf", 4),  # seen by the paired test only
])
def test_the_harness_finds_a_wrong_estimator(wrong, layout, guide, k, monkeypatch, one_thread):
    elbo_class = {"half": _HalfGradientELBO, "tempered": _tempered_iwae}[wrong]
    monkeypatch.setitem(ESTIMATORS, wrong, Estimator(wrong, elbo_class, True, None, "wrong on purpose"))
    if wrong == "tempered":
        monkeypatch.setattr(cf, "MULTI_SAMPLE", cf.MULTI_SAMPLE | {wrong})
    cell = cf.run_cell(wrong, guide, layout, k)
    assert cell.status == "WRONG", cell


@pytest.mark.parametrize("layout,guide", [("global", "autoguide"), ("plate2", "fullcov"), ("scalar", "user")])
def test_closed_form_reference_agrees_with_the_monte_carlo_one(layout, guide, one_thread):
    """Two independent references of the ELBO gradient: closed form and our own reparameterized
    Monte Carlo (with its standard error)."""
    lay = cf.layout(layout)
    torch.manual_seed(0)
    g = cf.make_guide(guide, lay)
    with torch.no_grad():
        Trace_ELBO().loss(lay.model, g, lay.x)
    params = [p for _, p in cf._params()]
    exact, _, how = cf.reference(lay, g, params, "elbo", 1, seed=1)
    assert how == "closed form"
    mean, se = cf.mc_bound_grads(lay, g, params, 1, seed=2)
    z = (mean - exact).abs() / (se**2 + (1e-5 * (1 + exact.abs())) ** 2).sqrt()
    assert float(z.max()) < cf.threshold(len(z), cf.REF_CHUNKS), float(z.max())
    assert float(exact.abs().max()) > 0.1  # the guide starts away from the optimum


def test_exact_iwae_of_a_discrete_latent_is_the_elbo_at_one_sample_and_grows_with_k():
    """``L_1 = ELBO <= L_4 <= log p(x)`` (Burda et al. 2016, theorem 1), all summed exactly."""
    lay = cf.layout("discrete")
    g = cf.make_guide("user", lay)
    with torch.no_grad():
        bounds = [float(cf.exact_discrete_bound(lay, g, k)) for k in (1, 2, 4)]
        c = lay.consts
        joint = c["probs"].log() + dist.Normal(c["mu"], c["sigma"]).log_prob(lay.x[:, None])
        log_px = float(joint.logsumexp(-1).sum())
        tr = pyro.poutine.trace(g).get_trace(lay.x)
        q = tr.nodes["y"]["fn"].probs
        elbo = float((q * (joint - q.log())).sum())
    assert bounds[0] == pytest.approx(elbo, abs=1e-5)
    assert bounds[0] < bounds[1] < bounds[2] < log_px


def test_the_table_lists_every_registered_estimator():
    """docs/conformance.md is regenerated when an estimator is registered."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "conformance.md").read_text()
    missing = [e for e in ESTIMATORS if f"| `{e}` |" not in doc]
    assert not missing, f"regenerate docs/conformance.md (python tests/infer/conformance.py --write ...): {missing}"
