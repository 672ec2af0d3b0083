"""Sample-quality metrics against known answers."""

import math

import pytest
import torch

from ppgen.data import load_dataset, toy_sample
from ppgen.metrics import (
    FeatureClassifier,
    choose_parzen_bandwidth,
    classifier_frechet_distance,
    classifier_metrics,
    feature_classifier,
    frechet_distance,
    mode_coverage,
    parzen_evaluation,
    parzen_log_likelihood,
    toy_log_likelihood,
)
from ppgen.metrics_pr import (
    knn_radii,
    label_histogram,
    plot_label_balance,
    precision_recall,
    total_variation,
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

    from ppgen.gan import Generator
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


# --------------------------------------------------------------------------- precision and recall


def _mode_of(points):
    """Index 0..7 of the nearest 8-Gaussians mode (modes at angles 2 pi m / 8)."""
    angle = torch.atan2(points[:, 1], points[:, 0])
    return torch.round(angle / (2 * math.pi / 8)).long() % 8


def test_precision_recall_hand_computed_case():
    # Points on a line, k = 1. Real {0, 1, 3, 7}: 1-NN radii 1, 1, 2, 4. Fake {0.5, 0.7, 20}:
    # radii 0.2, 0.2, 19.3. Precision: 0.5 and 0.7 lie in the ball of 0 (|d| <= 1), 20 is 13 from
    # 7 (> 4): 2/3. Recall: 0 is 0.5, 0.7 and 20 from the fakes (> 0.2, 0.2, 19.3): out; 1, 3 and 7
    # are within 19.3 of 20: in; 3/4.
    real = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    fake = torch.tensor([[0.5], [0.7], [20.0]], dtype=torch.float64)
    assert knn_radii(real, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(real, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    pr = precision_recall(real, fake, k=1)
    assert (pr.precision, pr.recall, pr.k) == (2 / 3, 3 / 4, 1)
    # k = 2: real radii 3, 2, 3, 6 (20 is still 13 from 7 > 6: 2/3); fake radii 19.5, 19.3, 19.5:
    # 0 is 19.5 <= 19.5 from 0.5 (the boundary counts), so every real point is covered.
    pr = precision_recall(real, fake, k=2)
    assert (pr.precision, pr.recall) == (2 / 3, 1.0)


def test_precision_recall_matches_a_brute_force_reference_for_every_chunk():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(57, 4, generator=g, dtype=torch.float64), 1.3 * torch.randn(41, 4, generator=g, dtype=torch.float64)

    def inside(y, x, k):  # the definition, with the whole distance matrix
        r = torch.cdist(x, x).sort(1).values[:, k]  # column 0 is the point itself
        return ((torch.cdist(y, x) <= r).any(1)).double().mean().item()

    want = (inside(fake, real, 3), inside(real, fake, 3))
    assert 0.2 < want[0] < 1 and 0.2 < want[1] < 1  # a case where both are informative
    for chunk in (1, 7, 1000):
        pr = precision_recall(real, fake, 3, chunk)
        assert (pr.precision, pr.recall) == pytest.approx(want, abs=1e-12)


def test_precision_recall_on_the_8_gaussians():
    real = toy_sample("8gaussians", 4000, seed=0)
    other = toy_sample("8gaussians", 8000, seed=1)
    # the same set: every point lies in its own ball (distance 0): exactly 1 and 1
    assert precision_recall(real, real)[:2] == (1.0, 1.0)
    # an independent draw of the same distribution: 1 up to the k-NN manifolds' holes (measured 0.978)
    same = precision_recall(real, other[:4000])
    assert same.precision > 0.95 and same.recall > 0.95
    # a generator that covers 4 of the 8 modes exactly: precision 1 and recall 1/2, up to those holes
    half = other[_mode_of(other) % 2 == 0][:4000]
    assert len(half) == 4000
    pr = precision_recall(real, half)
    assert pr.precision > 0.95
    assert pr.recall == pytest.approx(0.5 * same.recall, abs=0.03)  # measured 0.482 vs 0.489
    assert abs(pr.recall - 0.5) < 0.04
    # disjoint supports: nothing of either lies in the other's manifold
    assert precision_recall(real, real + 100.0)[:2] == (0.0, 0.0)


def test_precision_recall_rejects_bad_input():
    x = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="k must be an integer in"):
        precision_recall(x, x, k=5)
    with pytest.raises(ValueError, match=r"fake must have shape \(N, 2\)"):
        precision_recall(x, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        precision_recall(x, x, chunk=0)
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(x, torch.full((5, 2), math.nan))


# --------------------------------------------------------------------------- label balance


def test_label_balance_hand_made_case(tmp_path):
    # samples read as classes (0, 0, 0, 1), data as (0, 1, 2, 3): p = (3/4, 1/4, 0, 0),
    # q = (1/4, 1/4, 1/4, 1/4), TV = 1/2 (1/2 + 0 + 1/4 + 1/4) = 1/2
    p = label_histogram(torch.tensor([0, 0, 0, 1]), 4)
    q = label_histogram(torch.tensor([0, 1, 2, 3]), 4)
    assert p.tolist() == [0.75, 0.25, 0.0, 0.0]
    assert total_variation(p, q) == 0.5
    assert total_variation(q, q) == 0.0
    assert total_variation(label_histogram(torch.tensor([0, 0]), 2), label_histogram(torch.tensor([1]), 2)) == 1.0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        label_histogram(torch.tensor([4]), 4)
    with pytest.raises(TypeError, match="integer"):
        label_histogram(torch.tensor([0.0]), 4)
    png = plot_label_balance({"data": q, "samples": p}, tmp_path / "balance.png")
    assert png.stat().st_size > 1000


def test_classifier_metrics_label_balance_through_a_hand_set_classifier():
    # features = relu(x) (identity layers), logits = features: the class is the largest coordinate
    clf = FeatureClassifier(3, classes=3, hidden=(3,))
    with torch.no_grad():
        for layer in (clf.body[0][0], clf.head):
            layer.weight.copy_(torch.eye(3))
            layer.bias.zero_()
    eye = torch.eye(3)
    samples = eye[[0, 0, 0, 0, 1, 1]] + 0.01 * torch.arange(6.0)[:, None]  # classes 0,0,0,0,1,1
    reference = eye[[0, 1, 2, 0, 1, 2]] * 2  # classes 0,1,2 twice
    m = classifier_metrics(clf, samples, reference, k=1)
    assert m["label_hist_samples"] == pytest.approx([4 / 6, 2 / 6, 0.0])
    assert m["label_hist_data"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])
    assert m["label_tv"] == pytest.approx(1 / 3)  # 1/2 (1/3 + 0 + 1/3)


def test_classifier_metrics_real_data_against_noise(tmp_path):
    data = load_dataset("digits", "none", download=False)
    clf, _ = feature_classifier(data, tmp_path, epochs=30)
    real = classifier_metrics(clf, data.val, data.test)
    noise = classifier_metrics(clf, torch.rand(270, 64, generator=torch.Generator().manual_seed(0)), data.test)
    threes = classifier_metrics(clf, data.train[data.train_labels == 3][:270], data.test)
    same = classifier_metrics(clf, data.test, data.test)
    assert (same["precision"], same["recall"], same["label_tv"]) == (1.0, 1.0, 0.0)
    # measured: val 0.93 / 0.92 / TV 0.14 (270 images a side); noise recall 0.05 (its precision
    # 0.53: real outliers' wide balls, the metric's known weakness); threes 0.93 / 0.13 / 0.87
    assert real["precision"] > 0.85 and real["recall"] > 0.85 and real["label_tv"] < 0.2
    assert noise["recall"] < 0.1 and noise["frechet_distance"] > 5 * real["frechet_distance"]
    # a model that draws only real "3"s: sharp (precision as high as real data), one class of ten
    # covered (recall about a tenth), label TV near 1 - share of 3s in the test set
    assert threes["precision"] > 0.85 and threes["recall"] < 0.25
    assert threes["label_tv"] == pytest.approx(1 - threes["label_hist_data"][3], abs=0.03)
