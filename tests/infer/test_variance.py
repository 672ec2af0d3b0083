"""Known-answer tests of ppgen.infer.variance.gradient_stats."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppgen.infer.variance import format_table, gradient_stats, param_groups

B = 8
SEED = 1


def _data(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 2 + 1


def nn_model(x):
    """Normal-Normal: z_i ~ N(m, 1), x_i ~ N(z_i, 1), with m a model parameter."""
    m = pyro.param("m", torch.tensor(0.3))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(m, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def nn_guide(x):
    a = pyro.param("a", torch.linspace(-1, 1, x.shape[0]))
    s = pyro.param("s", torch.full((x.shape[0],), 0.6), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a, s))


def exact_nn_grad(x):
    """Gradient of -ELBO w.r.t. (m, a, log s), from
    ELBO_i = -(x_i-a_i)^2/2 - (a_i-m)^2/2 - s_i^2 + log s_i + const."""
    m, a, s = pyro.param("m").detach(), pyro.param("a").detach(), pyro.param("s").detach()
    return {"m": -(a - m).sum(), "a": -((x - a) - (a - m)), "s": -(1 - 2 * s**2)}


SCORE_LIKE = ["score", "score-naive", "score-baseline", "score-nn-baseline"]


@pytest.fixture(scope="module")
def conjugate_stats():
    pyro.clear_param_store()
    x = _data()
    nn_guide(x), nn_model(x)  # register the parameters
    exact = exact_nn_grad(x)
    stats = gradient_stats(
        nn_model, nn_guide, x, ["reparam", "analytic-kl", "stl", *SCORE_LIKE],
        num_draws=250, reference=exact, warmup=100, seed=SEED,
    )
    return stats, exact


def test_every_estimator_is_unbiased_on_the_conjugate_model(conjugate_stats):
    stats, exact = conjugate_stats
    for est in stats.mean:
        row = stats.row(est)
        assert row["max_z"] < 4.0, (est, row)
        # the exact reference has no error of its own
        assert all(float(v.abs().max()) == 0 for v in stats.reference_se.values())


def test_reparam_beats_score_and_baselines_help(conjugate_stats):
    stats, _ = conjugate_stats
    var = {e: stats.row(e)["variance"] for e in stats.mean}
    assert var["reparam"] < var["score"]
    assert var["score"] / var["score-baseline"] > 1.5
    assert var["score"] / var["score-nn-baseline"] > 1.5
    # Rao-Blackwellization over the plate: naive REINFORCE weights each z_i by the whole batch
    assert var["score-naive"] / var["score"] > 5
    assert var["stl"] < var["reparam"]  # near the posterior, STL's dropped term is mostly noise
    # the MSE against the exact gradient is variance + bias^2, up to sampling noise
    for e in stats.mean:
        r = stats.row(e)
        assert r["mse"] == pytest.approx(r["variance"] * (stats.num_draws - 1) / stats.num_draws + r["bias2"], rel=1e-6)


def test_groups_partition_the_total_variance(conjugate_stats):
    stats, _ = conjugate_stats
    for e in stats.mean:
        groups = [r for r in stats.rows if r["estimator"] == e and r["level"] == "group"]
        assert {r["name"] for r in groups} == {"m", "a", "s"}
        assert sum(r["variance"] for r in groups) == pytest.approx(stats.row(e)["variance"], rel=1e-9)
    lines = format_table(stats, relative_to="reparam")
    assert len(lines) == 2 + len(stats.mean) * 4  # header, rule, ("all" + 3 groups) per estimator


def test_sticking_the_landing_has_zero_variance_at_the_exact_posterior():
    """Roeder et al. 2017: with q = p(z | x) the STL guide gradient is exactly 0 for every draw."""
    pyro.clear_param_store()
    x = _data()
    nn_guide(x), nn_model(x)
    store = pyro.get_param_store()
    store["a"] = (x + pyro.param("m").detach()) / 2  # posterior N((x + m)/2, 1/2)
    store["s"] = torch.full((B,), 0.5**0.5)
    exact = exact_nn_grad(x)
    stats = gradient_stats(nn_model, nn_guide, x, ["reparam", "stl"], num_draws=50, reference=exact, warmup=0)
    for group in ("a", "s"):
        assert stats.row("stl", group)["variance"] < 1e-10
        assert stats.row("reparam", group)["variance"] > 1.0
    # the model parameter's gradient is untouched by STL
    assert stats.row("stl", "m")["variance"] == pytest.approx(stats.row("reparam", "m")["variance"])


def chain_model(x):
    """z1 ~ N(0,1), z2 ~ N(z1,1), x ~ N(z2,1), per datapoint."""
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("x", dist.Normal(z2, 1.0), obs=x)


def chain_guide(x):
    a1 = pyro.param("a1", torch.ones(x.shape[0]))
    a2 = pyro.param("a2", torch.zeros(x.shape[0]))
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(a1, 0.5))
        pyro.sample("z2", dist.Normal(z1 + a2, 0.7))


@pytest.mark.parametrize("n", [1, 4])
def test_rao_blackwellization_beats_naive_reinforce(n):
    pyro.clear_param_store()
    x = _data(n, seed=2)
    stats = gradient_stats(chain_model, chain_guide, x, ["score", "score-naive"], num_draws=200,
                           reference_draws=200, warmup=0, seed=3)
    # z1's cost is the whole chain either way; z2's downstream cost drops log p(z1) - log q(z1)
    ratio = stats.row("score-naive", "a2")["variance"] / stats.row("score", "a2")["variance"]
    assert ratio > 1.2
    assert stats.row("score-naive")["variance"] > stats.row("score")["variance"]
    for e in ("score", "score-naive"):
        assert stats.row(e)["max_z"] < 4.0


K = 3


def cat_model(x):
    mu = pyro.param("mu", torch.tensor([-2.0, 0.0, 2.5]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def cat_guide(x):
    logits = pyro.param("logits", torch.linspace(-1, 1, x.shape[0] * K).reshape(x.shape[0], K))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Categorical(logits=logits))


def exact_cat_grad(x):
    mu = pyro.param("mu").detach().requires_grad_()
    logits = pyro.param("logits").detach().requires_grad_()
    logq = torch.log_softmax(logits, -1)
    logp = torch.log(torch.tensor([0.2, 0.5, 0.3])) + dist.Normal(mu, 1.0).log_prob(x[:, None])
    loss = -(logq.exp() * (logp - logq)).sum()
    gm, gl = torch.autograd.grad(loss, [mu, logits])
    return {"mu": gm, "logits": gl}


def test_enumeration_is_exact_with_zero_variance():
    pyro.clear_param_store()
    x = _data(5, seed=4)
    cat_guide(x), cat_model(x)
    exact = exact_cat_grad(x)
    stats = gradient_stats(cat_model, cat_guide, x, ["enum"], num_draws=10, reference=exact, seed=5)
    score = gradient_stats(cat_model, cat_guide, x, ["score", "score-baseline"], num_draws=120,
                           reference=exact, warmup=30, seed=5)
    for name, g in exact.items():
        assert float(stats.var["enum"][name].abs().max()) == 0.0
        torch.testing.assert_close(stats.mean["enum"][name], g.double(), atol=1e-5, rtol=1e-5)
    assert stats.row("enum")["variance"] == 0.0
    assert stats.row("enum")["mse"] < 1e-9
    assert score.row("score")["max_z"] < 4.0 and score.row("score-baseline")["max_z"] < 4.0
    assert score.row("score")["variance"] > 0.0


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def test_user_written_amortized_pair_with_estimated_reference():
    """A pair written here, with a pyro.module encoder: groups, layers and the reparam reference."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    enc = TinyEncoder()
    w = torch.tensor([0.5, -1.0])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("y", dist.Normal((z * w).sum(-1), 1.0), obs=x[:, 0])

    def guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("data", x.shape[0]):
            out = enc(x)
            pyro.sample("z", dist.Normal(out, 0.8).to_event(1))

    x = torch.randn(6, 3)
    stats = gradient_stats(model, guide, x, ["reparam", "score"], num_draws=200, reference_draws=800, seed=0)
    assert param_groups("encoder$$$hidden.weight") == ("encoder", "encoder.hidden")
    layers = {r["name"] for r in stats.rows if r["level"] == "layer"}
    assert layers == {"encoder.hidden", "encoder.out"}
    # the reference is itself a reparam average: reparam's mean sits within its SE of it
    assert stats.row("reparam")["max_z"] < 4.0 and stats.row("score")["max_z"] < 4.0
    assert all(float(v.max()) > 0 for v in stats.reference_se.values())
    assert stats.row("score", "encoder")["snr"] < stats.row("reparam", "encoder")["snr"]


def test_bad_arguments_are_named():
    pyro.clear_param_store()
    x = _data()
    with pytest.raises(ValueError, match="unknown estimator"):
        gradient_stats(nn_model, nn_guide, x, ["nope"])
    with pytest.raises(ValueError, match="num_draws"):
        gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=1)
    with pytest.raises(ValueError, match="reference lacks"):
        gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=5, reference={"m": torch.tensor(0.0)})
    assert math.isfinite(gradient_stats(nn_model, nn_guide, x, "reparam", num_draws=3, reference_draws=3,
                                        warmup=0).row("reparam")["variance"])


def test_equal_time_budget_is_the_shortest_run():
    from ppgen.infer.variance_runs import elbo_at_equal_time

    hist = {
        "fast": [{"wall": 1.0, "val_elbo": -9.0}, {"wall": 2.0, "val_elbo": -8.0}, {"wall": 3.0, "val_elbo": -7.0}],
        "slow": [{"wall": 2.5, "val_elbo": -8.5}],
    }
    budget, at = elbo_at_equal_time(hist)
    assert budget == 2.5 and at == {"fast": -8.0, "slow": -8.5}
