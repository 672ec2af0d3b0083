"""KL warm-up and free bits change the objective exactly as specified; likelihood families;
collapse diagnostics; the default VAE keeps its sites and parameter names."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ppgen.models.collapse import collapse_report
from ppgen.models.likelihoods import make_likelihood
from ppgen.models.vae import VAE, VAEConfig, diagonal_normal_kl, warmup_weight
from ppgen.runs import config_from_dict


@torch.no_grad()
def _terms(vae: VAE, x: torch.Tensor, seed: int):
    """Unscaled per-datapoint log p(x|z), log p(z), log q(z|x) for the z drawn under ``seed``."""
    torch.manual_seed(seed)
    g = poutine.trace(vae.guide).get_trace(x)
    m = poutine.trace(poutine.replay(vae.model, trace=g)).get_trace(x)
    z = g.nodes["z"]["value"]
    logq = g.nodes["z"]["fn"].log_prob(z)
    logpz = m.nodes["z"]["fn"].log_prob(z)
    logpx = m.nodes["x"]["fn"].log_prob(x)
    return logpx, logpz, logq


def _loss(vae, x, seed, **objective):
    torch.manual_seed(seed)
    with vae.objective(**objective):
        return Trace_ELBO().loss(vae.model, vae.guide, x)


@pytest.fixture
def vae_and_x():
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(10, 3, (16,))
    x = (torch.rand(6, 10) > 0.5).float()
    return vae, x


def test_warmup_schedule_values():
    assert [warmup_weight(e, 4) for e in range(1, 7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_weight(1, 0) == 1.0 and warmup_weight(3, 1) == 1.0
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_weight(1, -1)


def test_kl_warmup_scales_the_latent_terms_only(vae_and_x):
    vae, x = vae_and_x
    logpx, logpz, logq = _terms(vae, x, seed=3)
    for beta in (0.25, 1.0):
        want = -float((logpx + beta * (logpz - logq)).sum())
        assert _loss(vae, x, 3, kl_weight=beta) == pytest.approx(want, rel=1e-5)
    # epoch-driven: vae.kl_warmup = 4 gives beta = 0.5 at epoch 2.
    vae.kl_warmup = 4
    assert _loss(vae, x, 3, epoch=2) == pytest.approx(-float((logpx + 0.5 * (logpz - logq)).sum()), rel=1e-5)
    # Outside the block the plain ELBO is back.
    torch.manual_seed(3)
    assert Trace_ELBO().loss(vae.model, vae.guide, x) == pytest.approx(-float((logpx + logpz - logq).sum()), rel=1e-5)


def test_free_bits_objective_value(vae_and_x):
    vae, x = vae_and_x
    logpx, logpz, logq = _terms(vae, x, seed=5)
    with torch.no_grad():
        loc, scale = vae.encoder(x)
    kl = diagonal_normal_kl(loc, scale)  # (B, d)
    # The analytic per-dimension KL is the torch KL of the Normals.
    want_kl = torch.distributions.kl_divergence(dist.Normal(loc, scale), dist.Normal(0.0, 1.0))
    assert torch.allclose(kl, want_kl, atol=1e-6)
    kl_bar = kl.mean(0)
    lam = float(kl_bar.median())  # some dimensions below lambda, some above
    assert (kl_bar < lam).any() and (kl_bar >= lam).any()
    B = len(x)
    factor = B * (kl_bar - kl_bar.clamp(min=lam)).sum()
    want = -float((logpx + logpz - logq).sum() + factor)
    assert _loss(vae, x, 5, free_bits=lam) == pytest.approx(want, rel=1e-5)
    # In expectation over z (analytic KL in place of log q - log p) the loss is Kingma et al.'s
    # -E log p(x|z) + B sum_j max(lambda, KL_j): the factor turns -KL into -max(lambda, KL).
    analytic = -(logpx.sum() - B * kl_bar.sum() + factor)
    assert float(analytic) == pytest.approx(float(-logpx.sum() + B * kl_bar.clamp(min=lam).sum()), rel=1e-6)
    # lambda = 0 is the plain ELBO; with warm-up beta scales the free-bits term too.
    assert _loss(vae, x, 5, free_bits=0.0) == pytest.approx(-float((logpx + logpz - logq).sum()), rel=1e-5)
    want_beta = -float(logpx.sum() + 0.5 * ((logpz - logq).sum() + factor))
    assert _loss(vae, x, 5, free_bits=lam, kl_weight=0.5) == pytest.approx(want_beta, rel=1e-5)


def test_free_bits_refused_without_per_dimension_kl():
    with pytest.raises(ValueError, match="diag"):
        VAEConfig(posterior="iaf", free_bits=0.5)
    with pytest.raises(ValueError, match="kl_weight"):
        with VAE(4, 2, (8,)).objective(kl_weight=0.0):
            pass


def test_default_vae_keeps_sites_and_parameter_names_and_old_configs_load():
    pyro.clear_param_store()
    vae = VAE(10, 3, (16,))
    x = (torch.rand(4, 10) > 0.5).float()
    tr = poutine.trace(vae.guide).get_trace(x)
    mt = poutine.trace(poutine.replay(vae.model, trace=tr)).get_trace(x)
    assert {n for n, s in tr.nodes.items() if s["type"] == "sample"} == {"data", "z"}
    assert {n for n, s in mt.nodes.items() if s["type"] == "sample"} == {"data", "z", "x"}
    assert {k.split("$$$")[0] for k in pyro.get_param_store().keys()} == {"encoder", "decoder"}
    assert isinstance(tr.nodes["z"]["fn"], dist.Independent)
    old = {"latent_dim": 20, "hidden": [400], "arch": "mlp"}  # a config.json written before this issue
    cfg = config_from_dict(VAEConfig, old)
    assert (cfg.posterior, cfg.likelihood, cfg.kl_warmup, cfg.free_bits) == ("diag", "bernoulli", 0, 0.0)


def test_likelihood_densities():
    out = torch.tensor([[-1.0, 0.0, 2.0]])
    x = torch.tensor([[0.2, 0.5, 0.9]])
    fixed = make_likelihood("gaussian", 3, 0.3)
    want = sum(-0.5 * ((xi - oi) / 0.3) ** 2 - math.log(0.3 * math.sqrt(2 * math.pi)) for xi, oi in zip(x[0].tolist(), out[0].tolist()))
    assert float(fixed.dist(out).log_prob(x)) == pytest.approx(want, rel=1e-5)
    learned = make_likelihood("gaussian", 3)
    assert [p.shape for p in learned.parameters()] == [torch.Size([3])]
    # Continuous Bernoulli: a proper density on [0, 1] (integrates to 1), unlike Bernoulli on grey levels.
    cb = make_likelihood("cb", 1)
    grid = torch.linspace(0, 1, 20001)[:, None]
    for logit in (-3.0, 0.4, 2.5):
        dens = cb.dist(torch.full((len(grid), 1), logit)).log_prob(grid).exp()
        assert float(torch.trapezoid(dens, grid[:, 0])) == pytest.approx(1.0, abs=1e-4)
        bern = dist.Bernoulli(logits=torch.full((len(grid), 1), logit), validate_args=False).log_prob(grid).exp()
        assert float(torch.trapezoid(bern[:, 0], grid[:, 0])) < 0.99
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cb.check_data(torch.tensor([[1.5]]))
    with pytest.raises(ValueError):
        make_likelihood("bernoulli", 1).check_data(torch.tensor([[0.5]]))


def test_collapse_report_counts_active_units():
    torch.manual_seed(0)
    vae = VAE(6, 4, (8,))
    x = torch.rand(400, 6)
    with torch.no_grad():  # make units 2 and 3 ignore x: constant mean 0, scale 1 (the prior)
        vae.encoder.loc.weight[2:] = 0
        vae.encoder.loc.bias[2:] = 0
        vae.encoder.scale.weight[2:] = 0
        vae.encoder.scale.bias[2:] = math.log(math.e - 1)  # softplus -> 1
        vae.encoder.loc.weight[:2] *= 10
    rep = collapse_report(vae, x)
    assert rep.active_units == 2
    assert rep.kl[2:].abs().max() < 1e-3  # collapsed onto the prior (scale 1 + 1e-4)
    loc, scale = vae.encoder(x)
    assert torch.allclose(rep.activity[:2], loc[:, :2].double().var(0), rtol=1e-6)
    assert torch.allclose(rep.kl, diagonal_normal_kl(loc, scale).double().mean(0), rtol=1e-5)


def test_svi_loop_enters_the_objective_once_per_training_step_and_never_for_validation():
    import contextlib

    from ppgen.infer.svi import SVIConfig, train_svi

    torch.manual_seed(0)
    vae = VAE(10, 2, (8,), kl_warmup=2)
    x = (torch.rand(64, 10) > 0.5).float()
    seen = []

    @contextlib.contextmanager
    def record(epoch):
        with vae.objective(epoch):
            seen.append((epoch, vae._kl_weight))
            yield

    train_svi(vae.model, vae.guide, x, x[:16], SVIConfig(epochs=3, batch_size=16), progress=False,
              step_context=record)
    assert seen == [(1, 0.5)] * 4 + [(2, 1.0)] * 4 + [(3, 1.0)] * 4
    assert vae._kl_weight == 1.0  # restored after each step (validation saw the plain ELBO)
