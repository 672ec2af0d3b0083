"""Sample-quality metrics against known answers."""

import math

import pytest
import torch

from ppgen.data import load_dataset, toy_sample
from ppgen.metrics import (
    choose_parzen_bandwidth,
    classifier_frechet_distance,
    feature_classifier,
    frechet_distance,
    mode_coverage,
    parzen_evaluation,
    parzen_log_likelihood,
    toy_log_likelihood,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mode_coverage_of_true_samples_and_of_a_collapsed_model():
    x = toy_sample("8gaussians", 20000, seed=0)
    modes, quality = mode_coverage(x)
    assert modes == 8
    # Within 3 std of a 2-D isotropic Gaussian: P(chi2_2 < 9) = 1 - exp(-4.5).
    assert quality == pytest.approx(1 - math.exp(-4.5), abs=0.003)
    angle = torch.arange(8) * (2 * math.pi / 8)
    centres = 2 * torch.stack([angle.cos(), angle.sin()], 1)
    collapsed = centres[torch.arange(3000) % 3] + 0.01 * torch.randn(3000, 2)
    assert mode_coverage(collapsed) == (3, 1.0)
    assert mode_coverage(torch.zeros(100, 2)) == (0, 0.0)


def test_toy_log_likelihood_of_true_samples_is_minus_entropy():
    # Well-separated modes: entropy = log 8 + log(2 pi e sigma^2) with sigma = 0.1.
    entropy = math.log(8) + math.log(2 * math.pi * math.e * 0.01)
    assert toy_log_likelihood("8gaussians", toy_sample("8gaussians", 50000, seed=1)) == pytest.approx(-entropy, abs=0.02)
    assert toy_log_likelihood("checkerboard", torch.tensor([[5.0, 5.0]])) == -math.inf


def test_frechet_distance_known_answers():
    torch.manual_seed(0)
    a = torch.randn(500, 6) @ torch.randn(6, 6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8 * float(a.var(0).sum()))
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 0.0, 3.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.pow(2).sum()), rel=1e-6)
    # Scaled copy: covariances S and c^2 S give tr(S)(1 - c)^2 (commuting matrices).
    cov_trace = float(torch.cov(a.T).trace())
    assert frechet_distance(a, 2 * a - a.mean(0)) == pytest.approx(cov_trace, rel=1e-6)


def test_frechet_distance_rejects_bad_input():
    with pytest.raises(ValueError, match=r"b must have shape \(N, 3\)"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 3), float("nan")), torch.zeros(5, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        frechet_distance([[0.0]], torch.zeros(5, 1))


def test_classifier_frechet_distance_orders_noise_behind_real_data(tmp_path):
    data = load_dataset("digits", "none", download=False)
    clf, acc = feature_classifier(data, tmp_path, epochs=30)
    assert acc > 0.85
    again, acc2 = feature_classifier(data, tmp_path, epochs=30)  # from the cache
    assert acc2 == acc and len(list(tmp_path.glob("classifier-digits-*.pt"))) == 1
    assert all(torch.equal(p, q) for p, q in zip(clf.parameters(), again.parameters()))
    same = classifier_frechet_distance(clf, data.test, data.test)
    real = classifier_frechet_distance(clf, data.val, data.test)
    noise = classifier_frechet_distance(clf, torch.rand(270, 64, generator=torch.Generator().manual_seed(0)), data.test)
    assert same == pytest.approx(0.0, abs=1e-6 * max(real, 1.0))
    assert noise > 5 * real


def test_parzen_single_sample_is_a_gaussian_density():
    s, x = torch.randn(1, 5), torch.randn(7, 5)
    expected = torch.distributions.Normal(s, 0.3).log_prob(x).sum(1)
    assert torch.allclose(parzen_log_likelihood(s, x, 0.3).float(), expected, atol=1e-5)


def test_parzen_estimate_approaches_true_likelihood_in_one_dimension():
    g = torch.Generator().manual_seed(0)
    samples, val, test = (torch.randn(n, 1, generator=g) for n in (4000, 1000, 4000))
    sigma = choose_parzen_bandwidth(samples, val)
    assert 0.1 <= sigma <= 0.5  # kernel-density bandwidths of order n^(-1/5)
    mean, se, _ = parzen_evaluation(samples, val, test)
    true = -0.5 * math.log(2 * math.pi * math.e)  # E log N(x; 0, 1)
    assert mean == pytest.approx(true, abs=0.05)
    assert 0 < se < 0.05
    with pytest.raises(ValueError, match=r"x must have shape \(N, 1\)"):
        parzen_log_likelihood(samples, torch.zeros(3, 2), 0.1)
    with pytest.raises(ValueError, match="sigma must be positive"):
        parzen_log_likelihood(samples, test, 0.0)


def test_generator_ais_matches_exact_evidence_of_a_linear_generator():
    # G(z) = W z + b with noise sigma: p(x) = N(b, W W^T + sigma^2 I) exactly (Wu et al. 2017 setup).
    from torch import nn

    from ppgen.adversarial import Generator
    from ppgen.metrics import generator_ais_log_likelihood
    from ppgen.nets import Decoder

    torch.manual_seed(0)
    lin = nn.Linear(2, 4)
    gen = Generator(Decoder(lin, 2, 4), sigmoid=False)
    sigma = 0.5
    w, b = lin.weight.detach(), lin.bias.detach()
    exact_dist = torch.distributions.MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(4))
    x = exact_dist.sample((10,))
    result = generator_ais_log_likelihood(gen, x, sigma, num_chains=16, num_steps=300)
    err = result.log_px - exact_dist.log_prob(x).double()
    assert (err.abs() < 4 * result.stderr + 0.02).all()  # measured: max |err| 0.10, stderr <= 0.06
    assert abs(float(err.mean())) < 0.05
    assert all(p.requires_grad for p in gen.parameters())
