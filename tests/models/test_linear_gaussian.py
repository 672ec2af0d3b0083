import pytest
import torch

from ppgen.models.linear_gaussian import LinearGaussian


def test_bayes_rule_links_exact_posterior_and_evidence():
    lg = LinearGaussian.random(5, 3, noise=0.7, seed=0)
    x = lg.sample(10, seed=1)
    z = torch.randn(10, 3, dtype=torch.float64)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    lik = torch.distributions.Normal(z @ lg.weight.T + lg.bias, lg.noise).log_prob(x).sum(-1)
    # log p(z | x) = log p(z) + log p(x | z) - log p(x) at any z.
    assert torch.allclose(lg.posterior(x).log_prob(z), prior + lik - lg.log_evidence(x), atol=1e-10)


def test_samples_have_the_model_covariance():
    lg = LinearGaussian.random(4, 2, noise=0.5, seed=2)
    x = lg.sample(20000, seed=3)
    cov = lg.weight @ lg.weight.T + 0.25 * torch.eye(4, dtype=torch.float64)
    assert torch.allclose(x.mean(0), lg.bias, atol=0.1)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.15 * float(cov.abs().max()))


def test_mean_field_guide_is_the_kl_optimum_of_diagonal_normals():
    lg = LinearGaussian.random(5, 3, noise=0.7, seed=0)
    x = lg.sample(1, seed=1)
    post = lg.posterior(x)
    prec = torch.linalg.inv(lg.post_cov)

    def kl(scale):  # KL(N(mean, diag scale^2) || posterior), up to a constant
        return 0.5 * (prec.diagonal() * scale**2).sum() - scale.log().sum()

    best = prec.diagonal().rsqrt()
    for factor in (0.9, 1.1):
        assert kl(best) < kl(best * factor)
    assert post.loc.shape == (1, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise"):
        LinearGaussian(torch.ones(3, 2), torch.zeros(3), 0.0)
    with pytest.raises(ValueError, match="bias"):
        LinearGaussian(torch.ones(3, 2), torch.zeros(2), 1.0)
    lg = LinearGaussian.random(3, 2)
    with pytest.raises(ValueError, match="shape"):
        lg.log_evidence(torch.zeros(4, 5, dtype=torch.float64))
