"""Proposals for per-datapoint IS, refined q* and the inference gaps, checked against the exact
posterior and evidence of a linear-Gaussian model (Cremer et al. 2018's split, in closed form)."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer.evidence import log_evidence
from ppgen.infer.proposals import Defensive, DefensiveMixture, Guide, Refined, StudentT, Widened, local_pair
from ppgen.infer.refine import refine_local
from ppgen.infer.trusted import inference_gaps, trusted_evidence
from ppgen.models.linear_gaussian import LinearGaussian

D, d, N = 8, 3, 24


@pytest.fixture(scope="module")
def lg():
    m = LinearGaussian.random(D, d, noise=0.7, seed=1)
    return m, m.sample(N, seed=2)


def diag_encoder(m, shift=0.3, inflate=2.0):
    """A deliberately poor amortized diagonal guide: shifted means, inflated scales."""

    def guide(x):
        post = m.posterior(x)
        scale = inflate * torch.linalg.inv(m.post_cov).diagonal().rsqrt()
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(post.loc + shift, scale).to_event(1))

    return guide


def fullcov_encoder(m, shift=0.3):
    def guide(x):
        post = m.posterior(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(post.loc + shift, scale_tril=1.5 * m.post_scale_tril))

    return guide


def kl_to_posterior(m, x, q):
    """Exact KL(q || p(z | x)) for a Gaussian q, shape (B,)."""
    post = m.posterior(x)
    cov = q.covariance_matrix if isinstance(q, dist.MultivariateNormal) else torch.diag_embed(q.base_dist.scale ** 2)
    loc = q.mean
    lam = torch.linalg.inv(m.post_cov)
    diff = loc - post.loc
    return 0.5 * ((lam * cov).sum((-1, -2)) + ((diff @ lam) * diff).sum(-1) - d
                  + torch.logdet(m.post_cov) - torch.logdet(cov))


def best_diag_kl(m):
    """min over diagonal Gaussians of KL(q || p(z|x)) = 0.5 (log det S + sum log Lambda_ii)."""
    lam = torch.linalg.inv(m.post_cov)
    return 0.5 * (torch.logdet(m.post_cov) + lam.diagonal().log().sum())


def test_refined_diag_reaches_best_in_family_and_gaps_match_closed_form(lg):
    m, x = lg
    guide = diag_encoder(m)
    exact = m.log_evidence(x)
    refined = Refined(100, 16, 0.05, elbo_samples=2000)
    with refined.keep():
        r = log_evidence(m.model, guide, x, 1000, proposal=Widened(refined, 1.2), seed=3, batch_size=N)
        # q* itself (the same chunk's, kept by the Refined object): its exact KL to the posterior
        # is the best diagonal one's within 0.01 nats
        pair = local_pair(m.model, guide, (x,), {}, "data", 1)
        qstar = refined.prepare(pair, (x,), {}).distributions["z"]
    q0 = dist.Normal(m.posterior(x).loc + 0.3, 2.0 * torch.linalg.inv(m.post_cov).diagonal().rsqrt()).to_event(1)
    excess = kl_to_posterior(m, x, qstar) - best_diag_kl(m)
    assert excess.min() >= -1e-9 and excess.max() < 0.01
    g = inference_gaps(r)
    best_elbo = exact - best_diag_kl(m)
    # the MC estimate of L[q*] is the best-in-family ELBO within 0.01 nats plus 4 standard errors
    assert ((g.elbo_qstar - best_elbo).abs() < 0.01 + 4 * g.elbo_qstar_se).all()
    assert float((g.elbo_qstar - best_elbo).mean().abs()) < 0.01
    # closed forms: approximation gap = best diagonal KL, amortization gap = KL(q) - best KL
    amort_exact = kl_to_posterior(m, x, q0) - best_diag_kl(m)
    assert ((g.approximation - best_diag_kl(m)).abs() < 0.01 + 4 * g.approximation_se).all()
    assert ((g.amortization - amort_exact).abs() < 0.01 + 4 * g.amortization_se).all()
    s = g.summary()
    assert abs(s["approximation"] - float(best_diag_kl(m))) < 0.01 + 4 * s["approximation_se"]
    assert abs(s["amortization"] - float(amort_exact.mean())) < 0.01 + 4 * s["amortization_se"]
    assert s["share_trusted"] == 1.0


def test_refined_fullcov_reaches_exact_posterior(lg):
    m, x = lg
    q0 = dist.MultivariateNormal(m.posterior(x).loc + 0.3, scale_tril=1.5 * m.post_scale_tril)
    torch.manual_seed(0)
    r = refine_local(m.model, (x,), {}, "z", q0, 1, "data", 100, 16, 0.05, 1000)
    assert r.family == "fullcov"
    assert kl_to_posterior(m, x, r.q).max() < 0.01  # the family holds the posterior: no approximation gap
    assert ((r.elbo_qstar - m.log_evidence(x)).abs() < 0.01 + 4 * r.elbo_qstar_se).all()
    assert (r.elbo_qstar > r.elbo_q).all()


SHARED = {"diag_encoder": Refined(30, 8, elbo_samples=20), "fullcov_encoder": Refined(30, 8, elbo_samples=20)}


@pytest.fixture(scope="module", autouse=True)
def _keep_shared_refinements():
    with SHARED["diag_encoder"].keep(), SHARED["fullcov_encoder"].keep():
        yield


@pytest.mark.parametrize("make", [
    lambda q: Guide(),
    lambda q: q,
    lambda q: Widened(q, 1.3),
    lambda q: StudentT(q, 5.0),
    lambda q: Defensive(Widened(q, 1.2), 0.1),
])
@pytest.mark.parametrize("encoder", [diag_encoder, fullcov_encoder])
def test_every_proposal_is_unbiased_for_the_exact_evidence(lg, make, encoder):
    m, x = lg
    exact = m.log_evidence(x)
    # one q* per encoder (the Refined object keeps it for the same chunk), several proposals on it
    r = log_evidence(m.model, encoder(m), x, 1000, proposal=make(SHARED[encoder.__name__]), seed=4)
    z = (r.log_px - exact) / r.stderr
    assert z.abs().max() < 4.5, (r.proposal, z)
    # and the run mean within its error (the per-datapoint errors are independent)
    assert abs(float((r.log_px - exact).mean())) < 4 * float(r.stderr.pow(2).sum().sqrt() / N) + 1e-6


def test_as_start_gives_distributions_for_ais(lg):
    m, x = lg
    for p in (Guide(), Widened(Refined(10, 4), 1.3), Defensive(Refined(10, 4), 0.2)):
        start = p.as_start(m.model, diag_encoder(m))(x[:5])
        (site, q), = start.items()
        assert site == "z" and q.batch_shape == (5,) and q.event_shape == (d,)
        z = q.rsample((7,))
        assert z.shape == (7, 5, d) and q.log_prob(z).shape == (7, 5)


def test_defensive_mixture_density_is_exact():
    prior = dist.Normal(torch.zeros(2, 1), torch.ones(2, 1)).to_event(1)
    q = dist.Normal(torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.3], [0.5]])).to_event(1)
    mix = DefensiveMixture(prior, q, 0.25)
    grid = torch.linspace(-8, 8, 4001).reshape(-1, 1, 1).expand(-1, 2, 1)
    mass = mix.log_prob(grid).exp().sum(0) * (16 / 4000)
    assert torch.allclose(mass, torch.ones(2), atol=1e-4)
    torch.manual_seed(0)
    draws = mix.sample((40000,))
    assert torch.allclose(draws.mean(0).squeeze(-1), torch.tensor([1.5, -0.75]), atol=0.03)


def test_trusted_evidence_states_its_choice_and_budget(lg):
    m, x = lg
    cands = [Widened(Refined(20, 8), 1.0), Widened(Refined(20, 8), 1.3)]
    t = trusted_evidence(m.model, diag_encoder(m), x, 1000, candidates=cands, budget=1.5, pilot=8)
    assert t.chosen in (c.name for c in cands) and set(t.pilot) == {c.name for c in cands}
    assert t.plan["planned_evals"] <= t.plan["budget_evals"] + 1e-9
    assert len(t.result.log_px) == N and len(t.result.local["elbo_qstar"]) == N
    assert ((t.result.log_px - m.log_evidence(x)).abs() < 4.5 * t.result.stderr).all()
    with pytest.raises(ValueError, match="budget"):
        trusted_evidence(m.model, diag_encoder(m), x, 100, candidates=[Refined(100, 16)], budget=1.0)


def test_refusals(lg):
    m, x = lg

    def two_sites_model(x):
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(a, 1.0))
            pyro.sample("x", dist.Normal(b.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def two_sites_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("a", dist.Normal(0.0, 1.0))
            pyro.sample("b", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="proposal='guide'"):
        log_evidence(two_sites_model, two_sites_guide, x, 20, proposal=Refined(2, 2))

    def gamma_model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Normal(0.0, s.unsqueeze(-1)).to_event(1), obs=x)

    def gamma_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("s", dist.Gamma(2.0 * torch.ones(x.shape[0]), 1.0))

    with pytest.raises(ValueError, match="Gaussian guide"):
        log_evidence(gamma_model, gamma_guide, x, 20, proposal=Refined(2, 2))
    with pytest.raises(ValueError, match="vectorize=False"):
        log_evidence(m.model, m.guide, x, 20, proposal=Refined(2, 2), vectorize=False)
    with pytest.raises(TypeError, match="proposal must be"):
        log_evidence(m.model, m.guide, x, 20, proposal="refined")
    with pytest.raises(ValueError, match="L\\[q\\*\\]"):
        inference_gaps(log_evidence(m.model, m.guide, x, 20))
    with pytest.raises(ValueError, match="factor"):
        Widened(Refined(), 0.0)
    # a transform that is not a bijection (HalfNormal = |Normal|) has no change-of-variables density
    def half_model(x):
        with pyro.plate("data", x.shape[0]):
            s = pyro.sample("s", dist.HalfNormal(torch.ones(x.shape[0], 2)).to_event(1))
            pyro.sample("x", dist.Normal(0.0, s.sum(-1, keepdim=True)).to_event(1), obs=x)

    def half_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("s", dist.HalfNormal(torch.ones(x.shape[0], 2)).to_event(1))

    with pytest.raises(ValueError, match="not a bijection.*proposal='guide'"):
        log_evidence(half_model, half_guide, x, 20, proposal=Refined(2, 2))


def test_refined_is_recomputed_outside_keep(lg):
    """A kept q* must not outlive its block: the model may change in between (further training)."""
    m, x = lg
    refined = Refined(5, 2)
    pair = local_pair(m.model, diag_encoder(m), (x,), {}, "data", 1)
    with refined.keep():
        a = refined.prepare(pair, (x,), {})
        assert refined.prepare(pair, (x,), {}) is a
    assert refined.prepare(pair, (x,), {}) is not a


@pytest.mark.slow
def test_evidence_report_with_gaps_matches_closed_form(lg, tmp_path):
    import json

    from ppgen.infer.evidence_report import EvidenceConfig, evidence_report, format_report

    m, x = lg
    guide = diag_encoder(m)
    config = EvidenceConfig(samples=1000, gaps=True, proposal="auto", budget=3.0, refine_steps=60, refine_samples=8, pilot=8)
    report = evidence_report(m.model, guide, x, config, tmp_path)
    stored = json.loads((tmp_path / "evidence.json").read_text())
    g = stored["gaps"]
    assert g["approximation"] == pytest.approx(float(best_diag_kl(m)), abs=0.02 + 4 * g["approximation_se"])
    assert stored["choice"]["chosen"] in stored["choice"]["pilot_share_untrusted"]
    assert stored["choice"]["planned_evals"] <= stored["choice"]["budget_evals"]
    assert len(stored["datapoints"]["trusted"]) == N and all(stored["datapoints"]["trusted"])
    assert stored["log_px"] == pytest.approx(float(m.log_evidence(x).mean()), abs=4 * stored["log_px_stderr"])
    assert (tmp_path / "figures" / "gaps.png").read_bytes()[:4] == b"\x89PNG"
    assert "amortization gap" in format_report(report)
    with pytest.raises(ValueError, match="proposal='auto'"):
        EvidenceConfig(gaps=True, proposal="guide")


@pytest.mark.slow
def test_cli_evidence_gaps_on_a_vae_run(tmp_path, capsys):
    import json

    from ppgen.cli import main
    from ppgen.data import DataConfig
    from ppgen.infer.svi import SVIConfig
    from ppgen.models.vae import VAEConfig
    from ppgen.train import VAERunConfig, train_vae

    cfg = VAERunConfig(DataConfig("digits"), VAEConfig(latent_dim=2, hidden=(32,)), SVIConfig(epochs=1, batch_size=128))
    train_vae(cfg, tmp_path / "vae", progress=False, download=False)
    assert main(["evidence", str(tmp_path / "vae"), "--gaps", "--samples", "500", "--limit", "40", "--pilot", "10",
                 "--refine-steps", "20", "--refine-samples", "8", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "approximation gap" in out and "proposal (fewest k-hat > threshold)" in out
    stored = json.loads((tmp_path / "vae" / "evidence.json").read_text())
    g = stored["gaps"]
    # relations that hold for any model: L[q*] >= L[q] on average (refined from q), and the IS
    # estimate is above L[q*] (Jensen) up to their errors
    assert g["amortization"] > -4 * g["amortization_se"]
    assert g["approximation"] > -4 * g["approximation_se"]
    assert stored["proposal"] == stored["choice"]["chosen"]


def test_ais_starts_from_a_proposal(lg):
    """The agreed interface: AIS takes ``proposal.as_start(model, guide)``; from the exact posterior
    every AIS weight is p(x), and from a widened q* a short AIS run agrees with the exact evidence."""
    from ppgen.infer.ais import ais_log_evidence

    m, x = lg
    exact = m.log_evidence(x)
    a = ais_log_evidence(m.model, x, 4, 5, start=Guide().as_start(m.model, m.guide))
    assert torch.allclose(a.log_px.double(), exact, atol=1e-6)
    b = ais_log_evidence(m.model, x, 8, 20, start=Widened(Refined(30, 8), 1.2).as_start(m.model, diag_encoder(m)))
    prior = ais_log_evidence(m.model, x, 8, 20)
    off_q, off_prior = (float((r.log_px.double() - exact).mean().abs()) for r in (b, prior))
    assert off_q < 0.15 and off_q < off_prior  # 20 steps: 0.06 nats from q*, more from the prior


@pytest.mark.parametrize("posterior", ["diag", "fullcov", "iaf"])
def test_vae_refined_proposals_agree_with_guide_is(posterior):
    """On a small VAE (no closed form) two unbiased estimates agree within their errors, and the
    refined q* is a better ELBO than the encoder's (the IAF's: its Gaussian base refined under its
    fixed flow)."""
    from ppgen.models.vae import VAE

    torch.manual_seed(0)
    vae = VAE(12, 2, (8,), posterior=posterior)
    xb = torch.bernoulli(torch.full((8, 12), 0.4))
    plain = log_evidence(vae.model, vae.guide, xb, 4000, seed=1)
    ours = log_evidence(vae.model, vae.guide, xb, 2000, proposal=Widened(Refined(40, 8), 1.2), seed=2)
    z = (ours.log_px - plain.log_px) / (ours.stderr.pow(2) + plain.stderr.pow(2)).sqrt()
    assert z.abs().max() < 4.5
    gain = ours.local["elbo_qstar"] - ours.local["elbo_q"]
    assert float(gain.mean()) > 0 and (ours.log_px > ours.local["elbo_qstar"] - 4 * ours.local["elbo_qstar_se"]).all()
