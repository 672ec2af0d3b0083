import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer.ais import ais_log_evidence, bdmc, sigmoid_schedule
from ppgen.models.linear_gaussian import LinearGaussian


@pytest.fixture
def lg():
    return LinearGaussian.random(4, 2, noise=1.0, seed=0)


def test_sigmoid_schedule_runs_from_zero_to_one():
    b = sigmoid_schedule(50)
    assert len(b) == 51 and b[0] == 0 and b[-1] == 1
    assert (b[1:] > b[:-1]).all()


def test_ais_lands_on_exact_evidence(lg):
    x = lg.sample(32, seed=1)
    exact = lg.log_evidence(x)
    r = ais_log_evidence(lg.model, x, num_chains=16, num_steps=100, leapfrog=3, step_size=0.3, seed=0)
    # Measured over seeds: mean error within +-0.03 nats (per-point stderr ~0.13, 32 points).
    assert float((r.log_px - exact).mean()) == pytest.approx(0.0, abs=0.06)
    assert ((r.log_px - exact).abs() < 5 * r.stderr + 0.05).all()
    assert 0.5 < float(r.accept.mean()) < 0.95  # adapted toward the 0.65 target


@pytest.mark.slow
def test_bdmc_sandwiches_exact_evidence(lg):
    b = bdmc(lg.model, torch.zeros(32, 4, dtype=torch.float64), num_chains=8, num_steps=60, leapfrog=3, step_size=0.3, seed=1)
    exact = lg.log_evidence(b.data)
    assert b.data.shape == (32, 4) and not torch.equal(b.data, torch.zeros_like(b.data))
    lower, upper = float(b.lower.mean()), float(b.upper.mean())
    assert lower < float(exact.mean()) + 0.05
    assert upper > float(exact.mean()) - 0.05
    assert 0 < b.gap < 1.0


def test_ais_errors(lg):
    x = lg.sample(4, seed=0)

    def discrete(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(x.new_full((), 0.5)))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1).expand(x.shape), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="real-valued latents"):
        ais_log_evidence(discrete, x, num_steps=2)
    with pytest.raises(ValueError, match="num_chains"):
        ais_log_evidence(lg.model, x, num_chains=0)
    with pytest.raises(ValueError, match="num_steps"):
        ais_log_evidence(lg.model, x, num_steps=0)
    with pytest.raises(ValueError, match="target_accept"):
        ais_log_evidence(lg.model, x, target_accept=1.5)
