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
from pyro.infer import Trace_ELBO

import conformance as cf
from ppgen.infer.estimators import ESTIMATORS, Estimator

#: cell name -> why it is known not to hold (reported to the estimator owners).
_ANALYTIC_KL_DISCRETE = (
    "analytic-kl (TraceMeanField_ELBO) adds no score-function term for a non-reparameterized guide "
    "site: d E_q[log p(x|y)] / d q(y) is dropped and only the analytic KL is differentiated; it should "
    "refuse discrete latents and point to enum / score-discrete"
)
KNOWN: dict[str, str] = {
    cf.cell_name("analytic-kl", guide, "discrete", k): _ANALYTIC_KL_DISCRETE
    for guide in ("user", "encoder", "autoguide")
    for k in cf.PARTICLES
}


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
        f"{cell.name}: {cell.status} (max z {cell.z:.2f}, threshold {cell.threshold:.2f}, "
        f"reference {cell.reference}): {cell.message}"
    )


# ----------------------------------------------------------------- the harness checks itself
class _HalfScoreELBO(Trace_ELBO):
    """A deliberately wrong estimator: the right loss, half its gradient."""

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        (0.5 * loss).backward()
        return float(loss.detach())


@pytest.mark.parametrize("layout,guide", [("event", "encoder"), ("discrete", "user")])
def test_the_harness_finds_a_wrong_estimator(layout, guide, one_thread):
    ESTIMATORS["half"] = Estimator("half", _HalfScoreELBO, True, None, "wrong on purpose")
    try:
        cell = cf.run_cell("half", guide, layout, 1)
    finally:
        del ESTIMATORS["half"]
    assert cell.status == "WRONG" and cell.z > 2 * cell.threshold, cell


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
