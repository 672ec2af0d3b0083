import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer.ais import ais_log_evidence, bdmc, guide_start, sigmoid_schedule
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

    with pytest.raises(ValueError, match=r"real-valued latents.*sum it out.*log_evidence\(model, guide, x\)"):
        ais_log_evidence(discrete, x, num_steps=2)
    with pytest.raises(ValueError, match="num_chains"):
        ais_log_evidence(lg.model, x, num_chains=0)
    with pytest.raises(ValueError, match="num_steps"):
        ais_log_evidence(lg.model, x, num_steps=0)
    with pytest.raises(ValueError, match="target_accept"):
        ais_log_evidence(lg.model, x, target_accept=1.5)


def _shaped_linear_gaussian(shape, x_dim=4, noise=1.0, seed=3):
    """``z ~ N(0, I)`` of event shape ``shape`` (``()``: a scalar per datapoint), ``x = W vec(z) +
    b + noise * eps``: the same linear-Gaussian model as :class:`LinearGaussian`, which gives the
    exact evidence."""
    d = int(torch.tensor(shape).prod()) if shape else 1
    lg = LinearGaussian.random(x_dim, d, noise=noise, seed=seed)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(shape), 1.0).to_event(len(shape)))
            flat = z.reshape(*z.shape[: z.ndim - len(shape)], d)  # (..., d) for every latent shape
            pyro.sample("x", dist.Normal(flat @ lg.weight.T + lg.bias, noise).to_event(1), obs=x)

    return lg, model


@pytest.mark.parametrize("shape", [(), (3,), (2, 2)], ids=["scalar", "vector", "matrix"])
def test_ais_handles_scalar_vector_and_matrix_latents(shape):
    """The docstring promises any real latent in the data plate; a scalar one crashed
    (``flatten(2)`` of a (K, B) tensor) before the fix."""
    lg, model = _shaped_linear_gaussian(shape)
    x = lg.sample(32, seed=1)
    exact = lg.log_evidence(x)
    r = ais_log_evidence(model, x, num_chains=16, num_steps=100, leapfrog=3, step_size=0.3, seed=0)
    assert r.log_px.shape == (32,)
    # Measured over seeds 0-4: mean error within 2.5 standard errors of the mean (0.007 nats for the
    # scalar latent, 0.02 for the vector and matrix ones), every point within 3.7 of its own.
    err, se_mean = r.log_px - exact, float(r.stderr.pow(2).sum().sqrt() / len(x))
    assert abs(float(err.mean())) < 4 * se_mean + 0.03
    assert (err.abs() < 5 * r.stderr + 0.05).all()


# --- AIS from a start distribution q (the encoder, a refined q*): f_t = q^(1-beta) p(x, z)^beta ---


@pytest.fixture
def sharp():
    """A linear-Gaussian model whose posterior is much narrower than the prior (8 observed
    dimensions, noise 0.5), so where the path starts matters."""
    return LinearGaussian.random(8, 3, noise=0.5, seed=0)


def _poor_start(lg, shift=2.0, widen=3.0):
    """A deliberately poor diagonal Gaussian: the exact posterior's mean moved by ``shift``
    posterior standard deviations in every coordinate, its scales ``widen`` times too large."""

    def start(x):
        post = lg.posterior(x)
        sd = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
        return {"z": dist.Normal(post.loc + shift * sd, widen * sd).to_event(1)}

    return start


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_ais_from_exact_posterior_is_exact_with_zero_variance(sharp, steps):
    """Started at p(z | x), every increment is (beta_t - beta_{t-1}) log p(x) and HMC leaves the
    posterior invariant: each chain's weight is p(x) at any number of steps."""
    x = sharp.sample(16, seed=1)
    r = ais_log_evidence(sharp.model, x, num_chains=8, num_steps=steps, leapfrog=3, step_size=0.3, seed=0,
                         start=lambda xb: {"z": sharp.posterior(xb)})
    # Measured: max |error| 4e-15, stderr 9e-16 (float64 rounding).
    assert (r.log_px - sharp.log_evidence(x)).abs().max() < 1e-4
    assert r.stderr.max() < 1e-4


def test_guide_start_reads_the_guide_distributions(sharp):
    """guide_start(guide) starts from the guide's q(z | x): the exact guide gives the exact
    evidence at any T, the mean-field optimum a consistent one."""
    x = sharp.sample(16, seed=2)
    exact = sharp.log_evidence(x)
    r = ais_log_evidence(sharp.model, x, num_chains=8, num_steps=2, leapfrog=3, step_size=0.3, start=guide_start(sharp.guide))
    assert (r.log_px - exact).abs().max() < 1e-4
    r = ais_log_evidence(sharp.model, x, num_chains=16, num_steps=30, leapfrog=3, step_size=0.3,
                         start=guide_start(sharp.mean_field_guide))
    assert ((r.log_px - exact).abs() < 5 * r.stderr + 0.05).all()


def test_ais_from_poor_start_beats_prior_and_converges(sharp):
    """A poor Gaussian start (mean off by 2 sd, scales x3) is still far closer to the posterior
    than the prior: at 10 steps its error is a third of the prior start's, and at 200 steps it
    lands on the exact evidence."""
    x = sharp.sample(32, seed=1)
    exact = sharp.log_evidence(x)
    kw = dict(num_chains=16, leapfrog=3, step_size=0.3, seed=0)
    prior = ais_log_evidence(sharp.model, x, num_steps=10, **kw)
    poor = ais_log_evidence(sharp.model, x, num_steps=10, start=_poor_start(sharp), **kw)
    err_prior, err_poor = (prior.log_px - exact).abs().mean(), (poor.log_px - exact).abs().mean()
    # Measured over seeds 0-2 at 10 steps: mean |error| 1.37 (prior) vs 0.45 (poor start) nats.
    assert err_poor < err_prior / 2
    long = ais_log_evidence(sharp.model, x, num_steps=200, start=_poor_start(sharp), **kw)
    err = long.log_px - exact
    se_mean = float(long.stderr.pow(2).sum().sqrt() / len(x))
    # Measured over seeds 0-2 at 200 steps: mean error -0.04, mean |error| 0.12 (prior start 0.23).
    assert abs(float(err.mean())) < 4 * se_mean + 0.03
    assert (err.abs() < 5 * long.stderr + 0.05).all()
    assert float(err.abs().mean()) < float(err_poor) / 2


def test_bdmc_with_start_sandwiches_exact_evidence(sharp):
    """The forward chain starts at q(z | x*), the reverse one ends there: lower <= log p(x) <=
    upper on simulated data, a narrower sandwich than from the prior at the same steps, and no
    gap at all from the exact posterior."""
    like = torch.zeros(32, 8, dtype=torch.float64)
    kw = dict(num_chains=8, num_steps=10, leapfrog=3, step_size=0.3, seed=1)
    q = bdmc(sharp.model, like, start=_poor_start(sharp), **kw)
    p = bdmc(sharp.model, like, **kw)
    assert torch.equal(q.data, p.data)  # the same simulated data (same seed)
    exact = float(sharp.log_evidence(q.data).mean())
    # Measured (seeds 1-3, 10 steps): poor start lower -0.08..-0.50, upper +0.64..+0.84 from the
    # exact mean, gap 0.81-1.32; prior start gap 2.82-2.88.
    assert float(q.lower.mean()) < exact + 0.05
    assert float(q.upper.mean()) > exact - 0.05
    assert 0 < q.gap < p.gap / 1.5
    e = bdmc(sharp.model, like, start=lambda xb: {"z": sharp.posterior(xb)}, **kw)
    assert abs(e.gap) < 1e-4 and abs(float(e.lower.mean()) - exact) < 1e-4


def test_ais_start_errors(lg):
    x = lg.sample(4, seed=0)
    ok = lambda xb: {"z": dist.Normal(xb.new_zeros(len(xb), 2), 1.0).to_event(1)}  # noqa: E731
    ais_log_evidence(lg.model, x, num_chains=2, num_steps=1, start=ok)
    cases = [
        ("not callable", TypeError, "start must be None"),
        (lambda xb: [ok(xb)["z"]], TypeError, "must return a dict"),
        (lambda xb: {"w": ok(xb)["z"]}, ValueError, r"one distribution per latent site \['z'\]"),
        (lambda xb: {"z": 1.0}, TypeError, "must be a torch Distribution"),
        (lambda xb: {"z": dist.Normal(xb.new_zeros(2), 1.0).to_event(1)}, ValueError, r"batch shape \(4,\)"),
        (lambda xb: {"z": dist.Normal(xb.new_zeros(len(xb), 2), 1.0)}, ValueError, r"event shape \(2,\)"),
        (lambda xb: {"z": dist.Gamma(xb.new_ones(len(xb), 2), 1.0).to_event(1)}, ValueError, "on the reals"),
    ]
    for start, error, match in cases:
        with pytest.raises(error, match=match):
            ais_log_evidence(lg.model, x, num_chains=2, num_steps=1, start=start)
    with pytest.raises(TypeError, match="guide must be callable"):
        guide_start(None)


@pytest.mark.slow
@pytest.mark.parametrize("posterior", ["fullcov", "iaf"])
def test_ais_from_vae_guide_agrees_with_prior_start(posterior):
    """guide_start on a VAE whose q(z|x) is a full-covariance Normal or an inverse autoregressive
    flow (a TransformedDistribution: log q is differentiated through the flow's inverse): the
    two paths end at the same evidence."""
    from ppgen.models.vae import VAE

    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((6, 30), 0.3))
    vae = VAE(30, 3, (16,), posterior=posterior)
    kw = dict(num_chains=16, num_steps=50, batch_size=6, seed=0)
    enc = ais_log_evidence(vae.model, x, start=guide_start(vae.guide), **kw)
    prior = ais_log_evidence(vae.model, x, **kw)
    # Measured: means differ by 0.014 (fullcov) and 0.005 (iaf) nats; per point within 0.05.
    assert abs(float((enc.log_px - prior.log_px).mean())) < 0.1
    assert ((enc.log_px - prior.log_px).abs() < 4 * (enc.stderr.pow(2) + prior.stderr.pow(2)).sqrt() + 0.05).all()
