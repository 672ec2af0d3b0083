import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer.estimators import make_elbo
from ppgen.infer.evidence import (
    iwae_ladder_sizes,
    kish_ess,
    log_evidence,
    per_datapoint_log_weights,
    psis_khat,
)
from ppgen.models.linear_gaussian import LinearGaussian


@pytest.fixture
def lg():
    return LinearGaussian.random(6, 3, noise=0.5, seed=0)


def test_exact_posterior_guide_gives_exact_evidence(lg):
    x = lg.sample(30, seed=1)
    r = log_evidence(lg.model, lg.guide, x, 64, batch_size=7, particle_chunk=20)
    exact = lg.log_evidence(x)
    assert torch.allclose(r.log_px, exact, atol=1e-10, rtol=0)
    assert torch.allclose(r.elbo, exact, atol=1e-10, rtol=0)
    assert r.stderr.max() < 1e-10
    assert torch.allclose(r.ess, torch.full_like(r.ess, 64.0))
    assert (r.khat == -float("inf")).all()  # equal weights: no tail
    for value in r.ladder.values():
        assert value == pytest.approx(float(exact.mean()), abs=1e-10)


def test_is_converges_to_exact_as_k_grows(lg):
    x = lg.sample(50, seed=2)
    exact = lg.log_evidence(x)
    guide = lambda x: lg.mean_field_guide(x, inflate=1.5)  # noqa: E731
    errors = {}
    for k in (1, 10, 1000):
        r = log_evidence(lg.model, guide, x, k, seed=3)
        errors[k] = float((exact - r.log_px).mean())
    # IS underestimates log p(x) in expectation (Jensen) and the bias shrinks like 1/K.
    assert errors[1] > errors[10] > errors[1000] > -0.01
    assert errors[1] > 0.2 and abs(errors[1000]) < 0.02
    # Per-datapoint errors within the reported standard errors.
    z = (r.log_px - exact) / r.stderr
    assert z.abs().mean() < 1.5


def test_iwae_ladder_non_decreasing_in_expectation(lg):
    x = lg.sample(100, seed=4)
    guide = lambda x: lg.mean_field_guide(x, inflate=2.0)  # noqa: E731
    ladders = [log_evidence(lg.model, guide, x, 500, ladder=[1, 5, 50, 500], seed=s).ladder for s in range(4)]
    mean = {k: np.mean([lad[k] for lad in ladders]) for k in (1, 5, 50, 500)}
    assert mean[1] < mean[5] < mean[50] < mean[500] + 0.005
    assert mean[500] <= float(lg.log_evidence(x).mean()) + 0.01
    assert iwae_ladder_sizes(5000) == [1, 5, 50, 500, 5000]
    assert iwae_ladder_sizes(300) == [1, 5, 50, 300]


def test_chunking_over_k_reproduces_unchunked(lg):
    x = lg.sample(16, seed=5)  # 16 datapoints x 3 latents: every chunk draws a multiple of 16 normals
    guide = lambda x: lg.mean_field_guide(x, inflate=1.3)  # noqa: E731
    full = log_evidence(lg.model, guide, x, 120, batch_size=16, particle_chunk=120, seed=7)
    chunked = log_evidence(lg.model, guide, x, 120, batch_size=16, particle_chunk=25, seed=7)
    for a, b in zip(full[:5], chunked[:5]):
        assert torch.equal(a, b)
    assert full.ladder == chunked.ladder


def test_chunking_over_datapoints_matches_statistically(lg):
    x = lg.sample(60, seed=6)
    guide = lambda x: lg.mean_field_guide(x, inflate=1.3)  # noqa: E731
    a = log_evidence(lg.model, guide, x, 400, batch_size=60, seed=1)
    b = log_evidence(lg.model, guide, x, 400, batch_size=7, seed=2)
    se = torch.sqrt(a.stderr**2 + b.stderr**2)
    assert ((a.log_px - b.log_px).abs() < 5 * se + 1e-9).all()


# A model/guide pair written here, not from ppgen: s ~ N(0, 1), x_j | s ~ N(s, 1) for 3 features
# in a nested plate; exact p(x) = N(x; 0, I + 11^T).
def my_model(x):
    with pyro.plate("data", x.shape[0], dim=-2):
        s = pyro.sample("s", dist.Normal(x.new_zeros(1), 1.0))
        with pyro.plate("features", x.shape[1], dim=-1):
            pyro.sample("x", dist.Normal(s, 1.0), obs=x)


def my_guide(x):
    with pyro.plate("data", x.shape[0], dim=-2):
        pyro.sample("s", dist.Normal(0.5 * x.sum(-1, keepdim=True), 0.9))


def test_hand_written_pair_matches_hand_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64) * 1.5
    k = 3000
    r = log_evidence(my_model, my_guide, x, k, seed=0)
    hand = []
    for n in range(len(x)):  # plain loop over datapoints and samples
        q = torch.distributions.Normal(0.5 * x[n].sum(), 0.9)
        s = q.sample((k,))
        lw = torch.distributions.Normal(0.0, 1.0).log_prob(s) - q.log_prob(s)
        lw = lw + sum(torch.distributions.Normal(s, 1.0).log_prob(x[n, j]) for j in range(3))
        hand.append(torch.logsumexp(lw, 0) - math.log(k))
    hand = torch.stack(hand)
    exact = torch.distributions.MultivariateNormal(
        torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64) + 1.0
    ).log_prob(x)
    # Mean over 8 points: sd ~0.005 nats per estimate (measured over seeds), so 0.03 is ~4 sd.
    assert float(r.log_px.mean()) == pytest.approx(float(hand.mean()), abs=0.03)
    assert float(hand.mean()) == pytest.approx(float(exact.mean()), abs=0.03)
    assert torch.allclose(r.log_px, exact, atol=5 * float(r.stderr.max()) + 1e-4)


def test_psis_khat_recovers_generalized_pareto_shape():
    rng = np.random.default_rng(0)
    for shape in (0.3, 0.9):
        u = rng.uniform(size=(20, 4000))
        w = ((u ** -shape) - 1.0) / shape  # generalized Pareto(shape, scale 1) by inversion
        khat = psis_khat(torch.as_tensor(np.log(w)))
        assert float(khat.mean()) == pytest.approx(shape, abs=0.08)


def test_kish_ess_known_values():
    lw = torch.log(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(kish_ess(lw), torch.tensor([4.0, 1.0, 16.0 / 6.0]))


def test_iwae_estimator_equals_iwae_bound(lg):
    x = lg.sample(20, seed=8)
    loc = lg.posterior(x).loc
    scale = 1.4 * torch.ones(3, dtype=x.dtype)
    k = 7

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    torch.manual_seed(0)
    loss = make_elbo("iwae", k).loss(lg.model, guide, x)
    torch.manual_seed(0)  # the same draws, by hand: z = loc + scale * eps, eps of shape (K, B, d)
    z = torch.distributions.Normal(loc, scale).rsample((k,))
    lw = (
        torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + torch.distributions.Normal(z @ lg.weight.T + lg.bias, lg.noise).log_prob(x).sum(-1)
        - torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
    )
    bound = float((torch.logsumexp(lw, 0) - math.log(k)).sum())
    assert -loss == pytest.approx(bound, rel=1e-12)
    # K = 1 is the ELBO; the exact posterior makes the bound exact for every K.
    torch.manual_seed(1)
    one = make_elbo("iwae", 1).loss(lg.model, guide, x)
    torch.manual_seed(1)
    assert one == pytest.approx(pyro.infer.Trace_ELBO().loss(lg.model, guide, x), rel=1e-12)
    exact = -float(lg.log_evidence(x).sum())
    assert make_elbo("iwae", 5).loss(lg.model, lg.guide, x) == pytest.approx(exact, rel=1e-12)


def test_iwae_gradient_trains_a_guide(lg):
    x = lg.sample(64, seed=9)
    mean = lg.posterior(x).loc
    log_scale = torch.zeros(3, dtype=x.dtype, requires_grad=True)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, log_scale.exp()).to_event(1))

    elbo = make_elbo("iwae", 10)
    opt = torch.optim.Adam([log_scale], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        elbo.loss_and_grads(lg.model, guide, x)
        opt.step()
    # The optimal mean-field scale for KL(q||p) is 1/sqrt(Lambda_ii); IWAE widens q beyond it.
    mf = torch.linalg.inv(lg.post_cov).diagonal().rsqrt()
    assert (log_scale.exp() > mf).all()
    assert (log_scale.exp() < 2 * lg.post_cov.diagonal().sqrt()).all()


def test_clear_errors(lg):
    x = lg.sample(4, seed=0)

    def no_plate_model(x):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 3), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z @ lg.weight.T, 1.0).to_event(2), obs=x)

    def no_plate_guide(x):
        pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 3), 1.0).to_event(2))

    with pytest.raises(ValueError, match="'data'"):
        log_evidence(no_plate_model, no_plate_guide, x, 4)

    def other_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(x.new_zeros(3), 1.0).to_event(1))

    with pytest.raises(ValueError, match="same latent sites.*model only: \\['z'\\].*guide only: \\['w'\\]"):
        log_evidence(lg.model, other_guide, x, 4)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            log_evidence(lg.model, lg.guide, x, bad)
    with pytest.raises(ValueError, match="num_particles"):
        per_datapoint_log_weights(lg.model, lg.guide, x, 0)
    with pytest.raises(TypeError, match="data"):
        log_evidence(lg.model, lg.guide, x.tolist(), 4)


def test_iwae_bound_scales_with_the_data_plate_scale(lg):
    from ppgen.infer.svi import DataScale

    x = lg.sample(10, seed=3)
    elbo = make_elbo("iwae", 4)
    torch.manual_seed(0)
    plain = elbo.loss(lg.model, lg.mean_field_guide, x)
    torch.manual_seed(0)
    scaled = elbo.loss(DataScale(3.0)(lg.model), DataScale(3.0)(lg.mean_field_guide), x)
    assert scaled == pytest.approx(3.0 * plain, rel=1e-12)


def test_report_writes_exact_numbers_and_figures(lg, tmp_path):
    import json

    from ppgen.infer.evidence_report import EvidenceConfig, evidence_report, format_report

    x = lg.sample(40, seed=10)
    report = evidence_report(lg.model, lg.guide, x, EvidenceConfig(samples=50, limit=30), tmp_path)
    stored = json.loads((tmp_path / "evidence.json").read_text())
    exact = float(lg.log_evidence(x[:30]).mean())
    assert stored["n"] == 30 and stored["log_px"] == pytest.approx(exact, abs=1e-10)
    assert stored["ladder"]["50"] == pytest.approx(exact, abs=1e-10) and stored["gap"] == pytest.approx(0, abs=1e-10)
    assert stored["khat_share_untrusted"] == 0.0 and stored["median_ess"] == pytest.approx(50.0)
    for png in ("iwae_ladder.png", "khat.png"):
        assert (tmp_path / "figures" / png).read_bytes()[:4] == b"\x89PNG"
    assert f"{exact:.3f}" in format_report(report)
    with pytest.raises(ValueError, match="split"):
        EvidenceConfig(split="train")


@pytest.mark.parametrize("start", ["encoder", "prior"])
def test_report_ais_from_the_exact_posterior_guide_is_exact(lg, start):
    # The guide is the exact posterior: AIS started there has every weight equal to p(x) (and BDMC
    # a zero gap) at any number of steps; from the prior, 3 steps leave a clear error.
    from ppgen.infer.evidence_report import EvidenceConfig, evidence_report

    x = lg.sample(12, seed=11)
    config = EvidenceConfig(samples=20, ais_steps=3, ais_chains=4, ais_limit=12, ais_start=start)
    report = evidence_report(lg.model, lg.guide, x, config)
    error = abs(report["ais"]["log_px"] - float(lg.log_evidence(x).mean()))
    assert report["ais"]["start"] == start
    if start == "encoder":
        assert error < 1e-4 and abs(report["bdmc"]["gap"]) < 1e-4
    else:
        assert error > 0.05 and report["bdmc"]["gap"] > 0.05
    with pytest.raises(ValueError, match="ais_start"):
        EvidenceConfig(ais_start="posterior")


def test_cli_reports_a_missing_run(tmp_path, capsys):
    from ppgen.cli import main

    assert main(["evidence", str(tmp_path / "nope"), "--samples", "5"]) == 2
    assert "ppgen: error" in capsys.readouterr().err


def test_pyro_renyi_alpha0_agrees_unscaled_but_not_under_minibatch_scaling(lg):
    # Why `iwae` is our own class: Pyro's RenyiELBO(alpha=0) gives the same per-datapoint bound on
    # an unscaled batch, but it scales the log weights *inside* the logsumexp, so under the SVI
    # loop's N/B data-plate scale it optimizes a different, tempered objective. Ours scales outside.
    from ppgen.infer.svi import DataScale

    x = lg.sample(20, seed=11)
    guide = lambda x: lg.mean_field_guide(x, inflate=1.5)  # noqa: E731
    k = 8
    ours = make_elbo("iwae", k, max_plate_nesting=1)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    values = {}
    for name, elbo in (("ours", ours), ("renyi", renyi)):
        for scale in (1.0, 3.0):
            torch.manual_seed(0)
            values[name, scale] = -elbo.loss(DataScale(scale)(lg.model), DataScale(scale)(guide), x)
    assert values["renyi", 1.0] == pytest.approx(values["ours", 1.0], rel=1e-10)
    assert values["ours", 3.0] == pytest.approx(3 * values["ours", 1.0], rel=1e-10)
    assert abs(values["renyi", 3.0] - 3 * values["renyi", 1.0]) > 1.0
