"""Nested importance sampling of the joint evidence against conjugate models with global latents.

Model: ``mu ~ N(0, s0^2 I_D)``, ``z_n ~ N(mu, I_D)``, ``x_n ~ N(z_n, I_D)``. Each of the D
coordinates of ``X`` is jointly Gaussian with covariance ``s0^2 1 1^T + 2 I_N``, so ``log p(X)``
is closed form; so are ``p(x_n | mu) = N(x_n; mu, 2 I)``, ``p(mu | X)`` and
``p(z_n | x_n, mu) = N((mu + x_n) / 2, I / 2)``.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer.evidence import khat_threshold, log_evidence
from ppgen.infer.nested_evidence import global_point, joint_log_evidence

S0, N, D = 1.5, 20, 3


def make_data(n=N, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = S0 * torch.randn(d, generator=g, dtype=torch.float64)
    return mu + math.sqrt(2.0) * torch.randn(n, d, generator=g, dtype=torch.float64)


def exact_log_px(x):
    n = len(x)
    cov = S0**2 * torch.ones(n, n, dtype=x.dtype) + 2.0 * torch.eye(n, dtype=x.dtype)
    return float(dist.MultivariateNormal(x.new_zeros(n), cov).log_prob(x.T).sum())


def posterior_mu(x):
    """Mean and sd of p(mu | X) (per coordinate)."""
    prec = 1.0 / S0**2 + len(x) / 2.0
    return x.sum(0) / 2.0 / prec, prec**-0.5


def model(x, plate="data"):
    mu = pyro.sample("mu", dist.Normal(x.new_zeros(x.shape[1]), S0).to_event(1))
    with pyro.plate(plate, len(x)):
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def make_guide(x_all, shift=0.0, inflate=1.0, z_shift=0.0, z_inflate=1.0):
    """q(mu) = N(m + shift * sd, (inflate * sd)^2), q(z_n | x_n, mu) = N((mu + x_n)/2 + z_shift,
    z_inflate^2 / 2): the exact posterior at the defaults."""
    m, sd = posterior_mu(x_all)

    def guide(x, plate="data"):
        mu = pyro.sample("mu", dist.Normal(m + shift * sd, inflate * sd).to_event(1))
        with pyro.plate(plate, len(x)):
            pyro.sample("z", dist.Normal((mu + x) / 2 + z_shift, z_inflate * math.sqrt(0.5)).to_event(1))

    return guide


def log_px_given_mu(x, mu):
    return dist.Normal(mu, math.sqrt(2.0)).log_prob(x).sum(-1)


def test_exact_posterior_guide_gives_exact_joint_evidence():
    x = make_data()
    r = joint_log_evidence(
        model, make_guide(x), x, num_outer=40, num_inner=12, batch_size=7, outer_chunk=16, plate="obs", data_plate="obs"
    )
    exact = exact_log_px(x)
    assert r.log_px == pytest.approx(exact, abs=1e-10, rel=0)
    assert r.stderr < 1e-12 and r.inner_stderr < 1e-12
    assert r.khat == -math.inf and r.ess == pytest.approx(40.0)
    assert r.log_w.shape == (40,) and (r.num_outer, r.num_inner) == (40, 12)
    # g* is the guide's mean, the exact posterior mean; the inner estimate is exact there.
    m, _ = posterior_mu(x)
    assert torch.allclose(r.globals_point["mu"], m, atol=1e-12, rtol=0)
    assert torch.allclose(r.log_px_given_globals, log_px_given_mu(x, m), atol=1e-10, rtol=0)


def test_near_posterior_guide_matches_closed_form_with_honest_stderr():
    x = make_data()
    exact = exact_log_px(x)
    guide = make_guide(x, shift=0.3, inflate=1.2, z_shift=0.1, z_inflate=1.2)
    zs = []
    for seed in range(4):
        r = joint_log_evidence(model, guide, x, num_outer=200, num_inner=50, outer_chunk=50, seed=seed)
        zs.append((r.log_px - exact) / r.stderr)
        assert 0.02 < r.stderr < 0.1  # measured 0.044-0.053
        assert r.trusted and r.khat < khat_threshold(200)
        assert 0.2 < r.inner_stderr < 0.4  # measured 0.28: K = 50 keeps the inner noise below a nat
    zs = torch.tensor(zs)
    assert zs.abs().max() < 3.0
    # Spread of the errors matches the reported standard errors (not 10x too small or large).
    assert 0.05 < float(zs.pow(2).mean()) < 4.0


def test_too_few_inner_draws_show_in_bias_and_khat():
    """K = 1 (an ELBO-like inner weight): the outer weights turn heavy-tailed and the estimate
    falls below the closed form; K = 50 fixes both with the same S."""
    x = make_data()
    exact = exact_log_px(x)
    guide = make_guide(x, shift=0.3, inflate=1.2, z_shift=0.1, z_inflate=1.2)
    one = [joint_log_evidence(model, guide, x, num_outer=200, num_inner=1, seed=s) for s in range(3)]
    many = [joint_log_evidence(model, guide, x, num_outer=200, num_inner=50, seed=s) for s in range(3)]
    assert math.isnan(one[0].inner_stderr) and torch.isnan(one[0].log_px_given_globals_stderr).all()
    assert sum(r.khat for r in one) / 3 > sum(r.khat for r in many) / 3 + 0.3
    assert sum(r.stderr for r in one) > 3 * sum(r.stderr for r in many)
    assert sum(r.log_px for r in one) / 3 < exact - 0.05  # Jensen: log of an unbiased p(X)


def test_log_px_given_globals_against_closed_form():
    x = make_data()
    guide = make_guide(x, shift=0.3, inflate=1.2, z_shift=0.1, z_inflate=1.2)
    r = joint_log_evidence(model, guide, x, num_outer=10, num_inner=200, seed=1)
    m, sd = posterior_mu(x)
    mu_star = m + 0.3 * sd  # the guide's mean
    assert torch.allclose(r.globals_point["mu"], mu_star, atol=1e-12, rtol=0)
    assert torch.allclose(global_point(guide, x)["mu"], mu_star, atol=1e-12, rtol=0)
    exact = log_px_given_mu(x, mu_star)
    z = (r.log_px_given_globals - exact) / r.log_px_given_globals_stderr
    assert r.log_px_given_globals.shape == (N,)
    assert z.abs().max() < 4.0 and 0.05 < float(z.pow(2).mean()) < 4.0


def test_scalar_model_without_locals_is_exact_inside():
    """x_n ~ N(mu, 2) directly: same marginal as the two-level model, no inner sampling."""
    x = make_data(d=1)[:, 0]

    def flat_model(x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), S0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, math.sqrt(2.0)), obs=x)

    m, sd = posterior_mu(x[:, None])

    def flat_guide(x, inflate=1.0):
        pyro.sample("mu", dist.Normal(m[0], inflate * sd))

    exact = exact_log_px(x[:, None])
    r = joint_log_evidence(flat_model, flat_guide, x, num_outer=30, num_inner=50)
    assert r.num_inner == 1 and r.inner_stderr == 0.0
    assert r.log_px == pytest.approx(exact, abs=1e-10, rel=0) and r.stderr < 1e-12
    r = joint_log_evidence(flat_model, lambda x: flat_guide(x, 1.5), x, num_outer=400, seed=2)
    assert abs(r.log_px - exact) < 3 * r.stderr and r.stderr < 0.05
    assert torch.allclose(r.log_px_given_globals, log_px_given_mu(x[:, None], m[0]), atol=1e-12, rtol=0)


def test_pyro_autonormal_guide_with_auxiliary_sites():
    """Pyro's AutoNormal draws an auxiliary unconstrained site and a Delta at the latent: both
    are replayed and scored; set to the exact posterior of x_n ~ N(mu, 2) it is exact."""
    from pyro.infer.autoguide import AutoNormal

    x = make_data(n=10, d=1)[:, 0]

    def flat_model(x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(()), S0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, math.sqrt(2.0)), obs=x)

    pyro.clear_param_store()
    guide = AutoNormal(flat_model)
    guide(x)
    m, sd = posterior_mu(x[:, None])
    guide.locs.mu = m[0]
    guide.scales.mu = x.new_tensor(sd)
    r = joint_log_evidence(flat_model, guide, x, num_outer=20)
    assert r.log_px == pytest.approx(exact_log_px(x[:, None]), abs=1e-10, rel=0) and r.stderr < 1e-12
    assert set(r.globals_point) == {"mu"} and float(r.globals_point["mu"]) == pytest.approx(float(m[0]), abs=1e-12)
    pyro.clear_param_store()


def test_discrete_global_sampled_by_the_guide():
    """c ~ Bernoulli(0.3), z_n ~ N(2c, 1), x_n ~ N(z_n, 1): p(X) = sum_c p(c) prod_n N(x_n; 2c, 2)."""
    x = 2.0 + math.sqrt(2.0) * torch.randn(15, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x[:3] -= 2.0

    def mix_model(x):
        c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.3)))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(2.0 * c, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    per_c = torch.stack([dist.Normal(x.new_tensor(2.0 * c), math.sqrt(2.0)).log_prob(x).sum() for c in (0.0, 1.0)])
    log_joint = per_c + torch.tensor([0.7, 0.3], dtype=torch.float64).log()
    exact = float(torch.logsumexp(log_joint, 0))
    post1 = float(torch.softmax(log_joint, 0)[1])

    def mix_guide(x, p1=post1, z_shift=0.0):
        c = pyro.sample("c", dist.Bernoulli(x.new_tensor(p1)))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal((2.0 * c + x) / 2 + z_shift, math.sqrt(0.5)))

    r = joint_log_evidence(mix_model, mix_guide, x, num_outer=20, num_inner=10)
    assert r.log_px == pytest.approx(exact, abs=1e-10, rel=0)
    assert r.globals_point["c"] == (1.0 if post1 > 0.5 else 0.0)  # a discrete site at its mode
    r = joint_log_evidence(mix_model, lambda x: mix_guide(x, 0.5, 0.2), x, num_outer=400, num_inner=30, seed=4)
    assert abs(r.log_px - exact) < 3 * r.stderr and r.stderr < 0.2


def test_refusals():
    x = make_data(n=5)

    def local_model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def local_guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)).to_event(1))

    with pytest.raises(ValueError, match="log_evidence"):
        joint_log_evidence(local_model, local_guide, x, num_outer=2, num_inner=2)
    # ... which log_evidence handles (exact guide: exact per-datapoint evidence).
    exact = dist.Normal(x.new_zeros(()), math.sqrt(2.0)).log_prob(x).sum(-1)
    assert torch.allclose(log_evidence(local_model, local_guide, x, 4).log_px, exact, atol=1e-10, rtol=0)
    guide = make_guide(x)
    # The other way round: per-datapoint evidence refuses a global latent and names this tool.
    with pytest.raises(ValueError, match="joint_log_evidence"):
        log_evidence(model, guide, x, 4)
    with pytest.raises(ValueError, match="data_plate"):
        joint_log_evidence(model, guide, x, num_outer=2, num_inner=2, data_plate="rows")
    with pytest.raises(ValueError, match="num_inner"):
        joint_log_evidence(model, guide, x, num_outer=2, num_inner=0)
    with pytest.raises(TypeError, match="data"):
        joint_log_evidence(model, guide, x.tolist(), num_outer=2, num_inner=2)

    def subsampled_model(x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(x.shape[1]), S0).to_event(1))
        with pyro.plate("data", len(x), subsample_size=2) as idx:
            pyro.sample("x", dist.Normal(mu, 2.0**0.5).to_event(1), obs=x[idx])

    def mu_guide(x):
        pyro.sample("mu", dist.Normal(x.new_zeros(x.shape[1]), 1.0).to_event(1))

    with pytest.raises(ValueError, match="subsample"):
        joint_log_evidence(subsampled_model, mu_guide, x, num_outer=2, num_inner=2)


def test_hyperprior_feature_plate_row_argument_float32():
    """tau ~ LogNormal(0, 0.5); mu_d ~ N(0, tau^2) in a feature plate; z_nd ~ N(mu_d, 1);
    x_nd ~ N(z_nd, w_n^2) with a per-datapoint argument w: float32 draws, data chunked, against
    a quadrature over log tau of the Gaussian evidence given tau."""
    n, d = 12, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) + 1.0
    w = 1.0 + torch.rand(n, generator=g)

    def hier_model(x, w):
        tau = pyro.sample("tau", dist.LogNormal(0.0, 0.5))
        with pyro.plate("features", x.shape[1], dim=-1):
            mu = pyro.sample("mu", dist.Normal(0.0, tau))
        with pyro.plate("data", len(x), dim=-2), pyro.plate("cells", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, w[:, None]), obs=x)

    def hier_guide(x, w):
        tau = pyro.sample("tau", dist.LogNormal(0.0, 0.4))
        with pyro.plate("features", x.shape[1], dim=-1):
            mu = pyro.sample("mu", dist.Normal(0.8 * tau / math.exp(0.08), 0.4))  # q(mu | tau)
        with pyro.plate("data", len(x), dim=-2), pyro.plate("cells", x.shape[1], dim=-1):
            pyro.sample("z", dist.Normal((mu + x) / 2, 0.8))

    log_tau = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    xd, wd = x.double(), w.double()
    given_tau = torch.stack([
        dist.MultivariateNormal(xd.new_zeros(n), t.exp() ** 2 + torch.diag(1 + wd**2)).log_prob(xd.T).sum()
        for t in log_tau
    ])
    prior = dist.Normal(xd.new_zeros(()), 0.5).log_prob(log_tau)  # log tau ~ N(0, 0.5^2)
    exact = float(torch.logsumexp(given_tau + prior, 0) + math.log(float(log_tau[1] - log_tau[0])))
    r = joint_log_evidence(hier_model, hier_guide, x, w, num_outer=300, num_inner=30, batch_size=5, outer_chunk=64)
    assert r.log_w.dtype == torch.float64 and r.trusted
    assert abs(r.log_px - exact) < 3 * r.stderr and r.stderr < 0.15  # measured 0.07
    # g*: the guide's LogNormal mean exp(0.4^2 / 2), then mu's mean given that tau: 0.8.
    assert float(r.globals_point["tau"]) == pytest.approx(math.exp(0.08), rel=1e-6)
    assert torch.allclose(r.globals_point["mu"], torch.full((d,), 0.8))
