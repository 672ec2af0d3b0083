"""The newer evidence features against the model shapes Pyro users write, each cell checked
against the exact evidence of one linear-Gaussian model (probabilistic PCA) written seven ways:

========================  ==================================================================
``tensor``                ``model(x)``, ``pyro.plate("data")`` (the reference shape)
``two_args``              ``model(x1, x2)``: the data split into two arguments, a tuple batch
``obs_plate``             the datapoints in ``pyro.plate("obs")``
``dict``                  ``model(*, a, b)``: a dict batch of keyword arguments
``bn_encoder``            a ``BatchNorm1d`` in the guide (evaluation must run it in eval mode)
``bn_decoder``            a ``BatchNorm1d`` on the latent's path in the model, chunks of
                          ``B = D`` rows: a particle plate is read as its channels (silently
                          wrong numbers unless the tools notice and score particle by particle)
``bn_decoder_raises``     the same with chunks of ``B != D`` rows (the plate raises instead)
``particle_chunks``       ``K`` drawn in many particle chunks
========================  ==================================================================

Each proposal (:mod:`ppgen.infer.proposals`), ``trusted_evidence`` with ``inference_gaps`` (the
approximation gap has a closed form: the best diagonal Gaussian's KL) and AIS from the guide and
from a refined proposal either gives the exact ``log p(x)`` within its errors or is refused with
a message that says why and what to use.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppgen.infer.ais import ais_log_evidence, guide_start
from ppgen.infer.evidence import log_evidence
from ppgen.infer.proposals import Defensive, Guide, Refined, StudentT, Widened
from ppgen.infer.trusted import inference_gaps, trusted_evidence
from ppgen.models.linear_gaussian import LinearGaussian

D, d, N, SPLIT = 6, 2, 12, 3
LG = LinearGaussian.random(D, d, noise=0.7, seed=5)
X = LG.sample(N, seed=6)
EXACT = LG.log_evidence(X)


def _q(x):
    """A poor diagonal encoder: shifted means, inflated scales; batch (B,), event (d,)."""
    post = LG.posterior(x)
    scale = 1.6 * torch.linalg.inv(LG.post_cov).diagonal().rsqrt()
    return dist.Normal(post.loc + 0.3, scale.expand(len(x), d)).to_event(1)


def _lik(z, x, cols=slice(None)):
    return dist.Normal(z @ LG.weight[cols].T + LG.bias[cols], LG.noise).to_event(1)


class Cell:
    """One way of writing the model: ``model``, ``guide``, the data in the form they take, the
    options the tools need, and the networks whose state evaluation must leave alone."""

    def __init__(self, name, model, guide, data, batch_size=N, particle_chunk=500, nets=()):
        self.name, self.model, self.guide, self.data = name, model, guide, data
        self.batch_size, self.particle_chunk, self.nets = batch_size, particle_chunk, nets

    def __repr__(self):
        return self.name


def _tensor(plate: str = "data"):
    def model(x):
        with pyro.plate(plate, len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x", _lik(z, x), obs=x)

    def guide(x):
        with pyro.plate(plate, len(x)):
            pyro.sample("z", _q(x))

    return model, guide


def _two_args():
    def model(x1, x2):
        with pyro.plate("data", len(x1)):
            z = pyro.sample("z", dist.Normal(x1.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x1", _lik(z, x1, slice(0, SPLIT)), obs=x1)
            pyro.sample("x2", _lik(z, x2, slice(SPLIT, D)), obs=x2)

    def guide(x1, x2):
        with pyro.plate("data", len(x1)):
            pyro.sample("z", _q(torch.cat([x1, x2], -1)))

    return model, guide


def _dict():
    def model(*, a, b):
        with pyro.plate("docs", len(a)):
            z = pyro.sample("z", dist.Normal(a.new_zeros(d), 1.0).to_event(1))
            pyro.sample("a", _lik(z, a, slice(0, SPLIT)), obs=a)
            pyro.sample("b", _lik(z, b, slice(SPLIT, D)), obs=b)

    def guide(*, a, b):
        with pyro.plate("docs", len(a)):
            pyro.sample("z", _q(torch.cat([a, b], -1)))

    return model, guide


def _bn(features, seed):
    """A BatchNorm1d in train mode with non-trivial running statistics (eval: a known affine map)."""
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(features, affine=False).double()
    bn.running_mean.copy_(torch.randn(features, generator=g, dtype=torch.float64))
    bn.running_var.copy_(torch.rand(features, generator=g, dtype=torch.float64) + 0.5)
    return bn.train()


def _bn_encoder():
    bn = _bn(D, 1)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x", _lik(z, x), obs=x)

    def guide(x):
        q = _q(x)
        with pyro.plate("data", len(x)):
            # the encoder's features pass through BatchNorm: in train mode they would depend on
            # the chunk, and every evaluation would move its running statistics
            pyro.sample("z", dist.Normal(q.base_dist.loc + 0.2 * torch.tanh(bn(x))[:, :d], q.base_dist.scale)
                        .to_event(1))

    return model, guide, (bn,)


def _bn_decoder():
    bn = _bn(D, 2)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            h = z @ LG.weight.T
            # in eval mode bn(h) * sd + mean is h again (up to eps): the same linear-Gaussian model,
            # if and only if BatchNorm normalises the feature axis with its running statistics
            loc = bn(h) * (bn.running_var + bn.eps).sqrt() + bn.running_mean + LG.bias
            pyro.sample("x", dist.Normal(loc, LG.noise).to_event(1), obs=x)

    return model, _tensor()[1], (bn,)


def make_cell(name):
    if name == "tensor":
        return Cell(name, *_tensor(), X)
    if name == "two_args":
        return Cell(name, *_two_args(), (X[:, :SPLIT], X[:, SPLIT:]), batch_size=5)
    if name == "obs_plate":
        return Cell(name, *_tensor("obs"), X)
    if name == "dict":
        return Cell(name, *_dict(), {"a": X[:, :SPLIT], "b": X[:, SPLIT:]}, batch_size=7)
    if name == "bn_encoder":
        model, guide, nets = _bn_encoder()
        return Cell(name, model, guide, X, batch_size=5, nets=nets)
    if name.startswith("bn_decoder"):
        model, guide, nets = _bn_decoder()
        return Cell(name, model, guide, X, batch_size=D if name == "bn_decoder" else 5, nets=nets)
    if name == "particle_chunks":
        return Cell(name, *_tensor(), X, particle_chunk=37)
    raise KeyError(name)


CELLS = ["tensor", "two_args", "obs_plate", "dict", "bn_encoder", "bn_decoder", "bn_decoder_raises", "particle_chunks"]
PROPOSALS = {
    "guide_traces": lambda: None,
    "guide": lambda: Guide(),
    "refined": lambda: Refined(20, 8, elbo_samples=50),
    "widened": lambda: Widened(Refined(20, 8, elbo_samples=50), 1.3),
    "student_t": lambda: StudentT(Refined(20, 8, elbo_samples=50), 5.0),
    "defensive": lambda: Defensive(Widened(Refined(20, 8, elbo_samples=50), 1.2), 0.1),
}


def _state(nets):
    return [(m.training, [b.clone() for b in m.buffers()]) for m in nets]


def _assert_untouched(cell, before):
    for (training, buffers), (training_after, buffers_after) in zip(before, _state(cell.nets)):
        assert training == training_after  # the mode is restored
        assert all(torch.equal(a, b) for a, b in zip(buffers, buffers_after))  # eval mode: stats not moved


def _run(fn, cell):
    """Call ``fn``; the BatchNorm-decoder cell must say (a warning) that it scores particles one by one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    told = [str(w.message) for w in caught if "particle" in str(w.message)]
    assert bool(told) == cell.name.startswith("bn_decoder"), told
    return out


@pytest.mark.parametrize("proposal", list(PROPOSALS))
@pytest.mark.parametrize("name", CELLS)
def test_log_evidence_cell_is_exact(name, proposal):
    cell = make_cell(name)
    before = _state(cell.nets)
    r = _run(lambda: log_evidence(cell.model, cell.guide, cell.data, 500, proposal=PROPOSALS[proposal](), seed=3,
                                  batch_size=cell.batch_size, particle_chunk=cell.particle_chunk), cell)
    _assert_untouched(cell, before)
    if proposal not in ("guide_traces", "guide"):  # the path reported is the one the proposal took
        assert r.path == ("sequential" if name.startswith("bn_decoder") else "vectorized"), (name, r.path)
    z = (r.log_px - EXACT) / r.stderr
    assert z.abs().max() < 4.5, (name, proposal, z)
    assert abs(float((r.log_px - EXACT).mean())) < 4 * float(r.stderr.pow(2).sum().sqrt() / N) + 1e-9
    if proposal not in ("guide_traces", "guide"):  # a refined q* improves on the encoder's ELBO
        assert float((r.local["elbo_qstar"] - r.local["elbo_q"]).mean()) > 0


def _best_diag_kl():
    lam = torch.linalg.inv(LG.post_cov)
    return float(0.5 * (torch.logdet(LG.post_cov) + lam.diagonal().log().sum()))


@pytest.mark.parametrize("name", CELLS)
def test_trusted_evidence_and_gaps_cell(name):
    cell = make_cell(name)
    before = _state(cell.nets)
    refined = Refined(60, 8, elbo_samples=400)
    t = _run(lambda: trusted_evidence(cell.model, cell.guide, cell.data, 1000,
                                      candidates=[Widened(refined, 1.0), Widened(refined, 1.3)], budget=3.0,
                                      pilot=5, batch_size=cell.batch_size, particle_chunk=cell.particle_chunk), cell)
    _assert_untouched(cell, before)
    r = t.result
    assert len(r.log_px) == N and t.plan["planned_evals"] <= t.plan["budget_evals"] + 1e-9
    assert ((r.log_px - EXACT).abs() < 4.5 * r.stderr).all()
    g = inference_gaps(r).summary()
    # closed form: the approximation gap is the best diagonal Gaussian's KL to the posterior
    assert g["approximation"] == pytest.approx(_best_diag_kl(), abs=0.03 + 4 * g["approximation_se"])
    assert g["amortization"] > 0 and g["share_trusted"] == 1.0


@pytest.mark.parametrize("start", ["guide", "refined"])
@pytest.mark.parametrize("name", CELLS)
def test_ais_cell(name, start):
    cell = make_cell(name)
    before = _state(cell.nets)
    begin = guide_start(cell.guide) if start == "guide" else Widened(Refined(30, 8), 1.2).as_start(cell.model,
                                                                                                   cell.guide)

    def ais():
        return ais_log_evidence(cell.model, cell.data, num_chains=8, num_steps=20, start=begin,
                                batch_size=cell.batch_size)

    if name.startswith("bn_decoder"):
        # HMC moves all chains in one pass: a model that mixes the chains' dimension is refused
        with pytest.raises(ValueError, match="cannot take it.*Use log_evidence"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the refined start says it scores particles one by one
                ais()
        _assert_untouched(cell, before)
        return
    a = ais()
    _assert_untouched(cell, before)
    # 20 annealing steps from a poor encoder: within 0.15 nats on average (and an estimate that
    # is a lower bound in expectation: not far above)
    off = (a.log_px.double() - EXACT)
    assert abs(float(off.mean())) < 0.15 and float(off.max()) < 0.5, off


def test_ais_from_the_exact_posterior_is_exact_in_every_form():
    """An exact start gives every chain the weight p(x): no tolerance beyond rounding, whatever the
    data's form and plate name."""
    def post_guide(x1, x2):
        with pyro.plate("data", len(x1)):
            pyro.sample("z", LG.posterior(torch.cat([x1, x2], -1)))

    model, _ = _two_args()
    a = ais_log_evidence(model, (X[:, :SPLIT], X[:, SPLIT:]), num_chains=4, num_steps=3,
                         start=guide_start(post_guide))
    assert torch.allclose(a.log_px.double(), EXACT, atol=1e-6)

    def dict_guide(*, a, b):
        with pyro.plate("docs", len(a)):
            pyro.sample("z", LG.posterior(torch.cat([a, b], -1)))

    model, _ = _dict()
    a = ais_log_evidence(model, {"a": X[:, :SPLIT], "b": X[:, SPLIT:]}, num_chains=4, num_steps=3,
                         start=guide_start(dict_guide))
    assert torch.allclose(a.log_px.double(), EXACT, atol=1e-6)


def test_ais_refusals_name_what_to_use():
    def lognormal_model(x):
        with pyro.plate("data", len(x)):
            s = pyro.sample("s", dist.LogNormal(x.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x", _lik(s, x), obs=x)

    with pytest.raises(ValueError, match="real-valued latents.*unconstrained space.*proposal=Widened"):
        ais_log_evidence(lognormal_model, X, num_chains=2, num_steps=1)
    with pytest.raises(ValueError, match="bdmc simulates one observed tensor"):
        from ppgen.infer.ais import bdmc

        bdmc(_two_args()[0], (X[:, :SPLIT], X[:, SPLIT:]), num_chains=2, num_steps=1)
    assert math.isfinite(_best_diag_kl())


def test_a_global_latent_is_refused_naming_nested_evidence():
    """A latent outside the datapoint plate is shared by all datapoints: neither the proposals nor
    AIS can estimate per-datapoint evidence; both say so and name joint_log_evidence."""
    def model(x):
        g = pyro.sample("g", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ LG.weight.T + g, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("g", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("z", _q(x))

    for proposal in (Guide(), Widened(Refined(2, 2))):
        with pytest.raises(ValueError, match="outside the datapoint plate.*joint_log_evidence"):
            log_evidence(model, guide, X, 20, proposal=proposal)
    with pytest.raises(ValueError, match="not inside pyro.plate.*joint_log_evidence"):
        ais_log_evidence(model, X, num_chains=2, num_steps=1)
