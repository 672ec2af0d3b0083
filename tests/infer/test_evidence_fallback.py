"""log_evidence on models that cannot take the particle dimension (issue 16).

Two linear-Gaussian models written the way Pyro users write them, whose exact evidence is known:
one with a ``BatchNorm1d`` on the decoder's output (as ProdLDA's decoder has; in eval mode it is an
affine map, so ``x = A z + d + noise`` stays linear-Gaussian), one whose likelihood selects each
datapoint's observed pixels by boolean-mask indexing (as Pyro's CVAE example does). Vectorized
particles break both: the BatchNorm reads a ``(K, B, F)`` input as ``(N, C, L)`` (a shape error,
or silently wrong numbers when ``B == F``), and a ``(B, D)`` mask cannot index ``(K, B, D)``
values. The sequential loop must give the numbers that ``pyro.infer.Importance``, run datapoint by
datapoint, gives (within 3 standard errors) and the exact evidence.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Importance
from torch import nn

from ppgen.infer.evidence import log_evidence
from ppgen.models.linear_gaussian import LinearGaussian

F, Z, SIGMA, INFLATE = 5, 2, 0.5, 1.2


def _posterior(a, d, x, observed=None):
    """Exact posterior ``N(m, S)`` of ``z`` given ``x = A z + d + SIGMA eps`` (rows ``(B, F)``),
    using only the entries where ``observed`` ``(B, F)`` is True."""
    w = torch.ones_like(x) if observed is None else observed.to(x.dtype)
    precision = torch.eye(Z, dtype=x.dtype) + torch.einsum("fi,bf,fj->bij", a, w, a) / SIGMA**2
    cov = torch.linalg.inv(precision)
    mean = torch.einsum("bij,fj,bf->bi", cov, a, w * (x - d)) / SIGMA**2
    return mean, cov


def _exact(a, d, x, observed):
    out = []
    for row, keep in zip(x, observed):
        a_s = a[keep]
        cov = a_s @ a_s.T + SIGMA**2 * torch.eye(len(a_s), dtype=x.dtype)
        out.append(dist.MultivariateNormal(d[keep], cov).log_prob(row[keep]))
    return torch.stack(out)


class BatchNormPair(nn.Module):
    """Decoder ``Linear -> BatchNorm1d`` (ProdLDA's decoder ends so); the guide's encoder is
    ``BatchNorm1d -> Linear`` on ``x``, set to the exact posterior mean, with a mean-field scale
    ``INFLATE`` times the exact marginal standard deviations."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.decoder = nn.Linear(Z, F).double()
        self.bn = nn.BatchNorm1d(F).double()
        self.enc_bn = nn.BatchNorm1d(F).double()
        self.encoder = nn.Linear(F, Z).double()
        with torch.no_grad():
            self.decoder.weight.copy_(torch.randn(F, Z, generator=g, dtype=torch.float64))
            self.decoder.bias.copy_(torch.randn(F, generator=g, dtype=torch.float64))
            self.bn.running_mean.copy_(0.3 * torch.randn(F, generator=g, dtype=torch.float64))
            self.bn.running_var.copy_(torch.rand(F, generator=g, dtype=torch.float64) + 0.5)
            self.bn.weight.copy_(torch.rand(F, generator=g, dtype=torch.float64) + 0.5)
            self.bn.bias.copy_(0.2 * torch.randn(F, generator=g, dtype=torch.float64))
            self.enc_bn.running_var.fill_(1.0 - self.enc_bn.eps)  # an identity map in eval mode
            a, d = self.affine()
            mean_map = torch.linalg.inv(torch.eye(Z, dtype=a.dtype) + a.T @ a / SIGMA**2) @ a.T / SIGMA**2
            self.encoder.weight.copy_(mean_map)
            self.encoder.bias.copy_(-mean_map @ d)
        self.eval()

    def affine(self):
        """``(A, d)`` with ``decoder -> bn`` (eval mode) equal to ``z -> A z + d``."""
        k = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        a = k[:, None] * self.decoder.weight
        d = k * (self.decoder.bias - self.bn.running_mean) + self.bn.bias
        return a.detach(), d.detach()

    def model(self, x):
        pyro.module("pair", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.bn(self.decoder(z)), SIGMA).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("pair", self)
        a, _ = self.affine()
        _, cov = _posterior(a, torch.zeros(F, dtype=x.dtype), x[:1])
        with pyro.plate("data", x.shape[0]):
            loc = self.encoder(self.enc_bn(x))
            pyro.sample("z", dist.Normal(loc, INFLATE * cov[0].diagonal().sqrt()).to_event(1))


def _mask_pair(a, d):
    """A model whose likelihood keeps each datapoint's observed entries by ``loc[mask]`` (three of
    the ``F`` per row, as Pyro's CVAE example selects its unobserved quadrants), and a guide that
    proposes the exact posterior's mean with ``INFLATE`` times its marginal scales."""

    def model(x, mask):
        b = x.shape[0]
        with pyro.plate("data", b):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            loc = z @ a.T + d
            pyro.sample("y", dist.Normal(loc[mask].view(b, -1), SIGMA).to_event(1), obs=x[mask].view(b, -1))

    def guide(x, mask):
        mean, cov = _posterior(a, d, x, mask)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(mean, INFLATE * cov.diagonal(dim1=-2, dim2=-1).sqrt()).to_event(1))

    return model, guide


def _mask_data(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(F, Z, generator=g, dtype=torch.float64)
    d = torch.randn(F, generator=g, dtype=torch.float64)
    x = torch.randn(n, Z, generator=g, dtype=torch.float64) @ a.T + d
    x = x + SIGMA * torch.randn(n, F, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, F, dtype=torch.bool)
    for i in range(n):
        mask[i, torch.randperm(F, generator=g)[:3]] = True
    return a, d, x, mask


def _bn_data(pair, n, seed=5):
    g = torch.Generator().manual_seed(seed)
    a, d = pair.affine()
    return torch.randn(n, Z, generator=g, dtype=torch.float64) @ a.T + d + SIGMA * torch.randn(
        n, F, generator=g, dtype=torch.float64)


def _importance(model, guide, rows, num_samples):
    """``pyro.infer.Importance`` on each datapoint alone: ``(log Z, delta-method stderr)`` per row."""
    pyro.set_rng_seed(11)
    est, err = [], []
    for n in range(len(rows[0])):
        imp = Importance(model, guide, num_samples=num_samples).run(*(r[n : n + 1] for r in rows))
        lw = torch.stack([torch.as_tensor(w) for w in imp.log_weights]).double()
        w = torch.exp(lw - lw.max())
        est.append(float(imp.get_log_normalizer()))
        err.append(float(w.std(unbiased=False) / w.mean() / math.sqrt(num_samples)))
    return torch.tensor(est, dtype=torch.float64), torch.tensor(err, dtype=torch.float64)


def _agree(ours, theirs, k=3.0):
    (a, sa), (b, sb) = ours, theirs
    return (a - b).abs() <= k * torch.sqrt(sa**2 + sb**2) + 1e-9


def test_both_paths_give_the_exact_evidence_of_linear_gaussian():
    lg = LinearGaussian.random(6, 4, noise=0.5, seed=0)
    x = lg.sample(16, seed=1)
    exact = lg.log_evidence(x)
    guide = lambda x: lg.mean_field_guide(x, inflate=1.3)  # noqa: E731
    vec = log_evidence(lg.model, guide, x, 200, batch_size=8, vectorize=True)
    seq = log_evidence(lg.model, guide, x, 200, batch_size=8, vectorize=False)
    assert (vec.path, seq.path) == ("vectorized", "sequential")
    for r in (vec, seq):
        # IS is biased low by about var(w) / (2 K mean(w)^2) = stderr^2 / 2, on top of its noise
        bias = r.stderr**2 / 2
        assert ((r.log_px - exact + bias).abs() <= 4 * r.stderr).all()
        assert abs(float((r.log_px - exact + bias).mean())) <= 3 * r.summary()["log_px_stderr"]
    # On CPU the loop draws particle by particle from the same stream (B * z_dim = 32, a multiple
    # of 16): the same draws as the vectorized pass. Measured difference: 0.
    torch.testing.assert_close(seq.log_px, vec.log_px, rtol=1e-12, atol=1e-12)
    # The default checks the chunk, finds the model vectorizes, and takes that path, same numbers.
    auto = log_evidence(lg.model, guide, x, 200, batch_size=8)
    assert auto.path == "vectorized" and auto.note is None and torch.equal(auto.log_px, vec.log_px)


def test_batchnorm_decoder_falls_back_and_agrees_with_importance_and_the_exact_evidence():
    pair = BatchNormPair()
    x = _bn_data(pair, 4)
    with pytest.warns(UserWarning, match="running_mean"):
        r = log_evidence(pair.model, pair.guide, x, 200, batch_size=4)
    assert r.path == "sequential" and "running_mean" in r.note
    forced = log_evidence(pair.model, pair.guide, x, 200, batch_size=4, vectorize=False)
    assert torch.equal(forced.log_px, r.log_px)  # the failed attempt gave the random state back
    imp = _importance(pair.model, pair.guide, (x,), 200)
    assert _agree((r.log_px, r.stderr), imp).all()
    a, d = pair.affine()
    exact = _exact(a, d, x, torch.ones_like(x, dtype=torch.bool))
    assert ((r.log_px - exact).abs() <= 3 * r.stderr + r.stderr**2).all()
    with pytest.raises(RuntimeError, match="running_mean") as info:
        log_evidence(pair.model, pair.guide, x, 10, batch_size=4, vectorize=True)
    assert "vectorize=False" in "".join(getattr(info.value, "__notes__", []))


def test_batchnorm_that_silently_accepts_the_particle_dim_is_caught_by_the_check():
    # With B == F = 5 the BatchNorm takes (K, 5, 5) as (N, C, L) without complaint: each
    # datapoint's features get one channel's statistics. Forced vectorized, the numbers are wrong;
    # the default's check scores one draw both ways, sees them differ and falls back.
    pair = BatchNormPair()
    x = _bn_data(pair, 10)
    a, d = pair.affine()
    exact = _exact(a, d, x, torch.ones_like(x, dtype=torch.bool))
    wrong = log_evidence(pair.model, pair.guide, x, 200, batch_size=F, vectorize=True)
    assert wrong.path == "vectorized" and (wrong.log_px - exact).abs().max() > 1.0
    with pytest.warns(UserWarning, match="particle dimension"):
        r = log_evidence(pair.model, pair.guide, x, 200, batch_size=F)
    assert r.path == "sequential" and "datapoints 0..4" in r.note
    assert ((r.log_px - exact).abs() <= 3 * r.stderr + r.stderr**2).all()
    assert torch.equal(r.log_px, log_evidence(pair.model, pair.guide, x, 200, batch_size=F, vectorize=False).log_px)


def test_boolean_mask_likelihood_falls_back_and_agrees_with_importance_and_the_exact_evidence():
    a, d, x, mask = _mask_data(4)
    model, guide = _mask_pair(a, d)
    with pytest.warns(UserWarning, match="IndexError"):
        r = log_evidence(model, guide, (x, mask), 200, batch_size=2)
    assert r.path == "sequential" and r.log_px.shape == (4,)
    imp = _importance(model, guide, (x, mask), 200)
    assert _agree((r.log_px, r.stderr), imp).all()
    exact = _exact(a, d, x, mask)
    assert ((r.log_px - exact).abs() <= 3 * r.stderr + r.stderr**2).all()


def test_vectorize_must_be_none_or_a_bool():
    lg = LinearGaussian.random(3, 2, seed=0)
    with pytest.raises(TypeError, match="vectorize must be None"):
        log_evidence(lg.model, lg.guide, lg.sample(4, seed=0), 10, vectorize="yes")
