"""Known answers for the categorical-latent VAE: exact ELBO and evidence, estimator gradients."""

import pyro
import pytest
import torch

from ppgen.data import binarize, load_dataset
from ppgen.infer.estimators import make_elbo, prepare_guide
from ppgen.infer.variance import gradient_stats
from ppgen.models.discrete import DiscreteVAE, DiscreteVAEConfig


@pytest.fixture
def setup():
    torch.manual_seed(0)
    data = load_dataset("digits", download=False)
    x = binarize(data.val[:16], torch.Generator().manual_seed(0))
    vae = DiscreteVAEConfig(num_classes=4, hidden=(16,)).build(data.dim)
    return vae, x


def test_enumerated_elbo_is_the_exact_sum(setup):
    vae, x = setup
    loss = make_elbo("enum").loss(vae.model, prepare_guide("enum", vae.guide), x)
    assert loss == pytest.approx(-vae.exact_elbo(x).sum().item(), rel=1e-5)


def test_evidence_bounds_and_gap_is_the_exact_kl(setup):
    vae, x = setup
    with torch.no_grad():
        log_px, elbo = vae.log_evidence(x), vae.exact_elbo(x)
        logq = torch.log_softmax(vae.encoder(x), -1)
        log_post = vae.joint_log_prob(x) - log_px[:, None]
        kl = (logq.exp() * (logq - log_post)).sum(-1)
    assert (elbo <= log_px + 1e-5).all()
    torch.testing.assert_close(log_px - elbo, kl, atol=1e-4, rtol=1e-4)


def test_enum_is_exact_and_score_estimators_are_unbiased(setup):
    vae, x = setup
    pyro.clear_param_store()
    pyro.module("encoder", vae.encoder)
    pyro.module("decoder", vae.decoder)
    loss = -vae.exact_elbo(x).sum()
    grads = torch.autograd.grad(loss, list(vae.encoder.parameters()) + list(vae.decoder.parameters()))
    names = [f"encoder$$${n}" for n, _ in vae.encoder.named_parameters()]
    names += [f"decoder$$${n}" for n, _ in vae.decoder.named_parameters()]
    exact = dict(zip(names, grads))
    enum = gradient_stats(vae.model, vae.guide, x, ["enum"], num_draws=5, reference=exact, warmup=0)
    assert enum.row("enum")["variance"] == 0.0
    assert enum.row("enum")["max_z"] == 0.0 or enum.row("enum")["bias2"] < 1e-8
    stats = gradient_stats(vae.model, vae.guide, x, ["score", "score-baseline"],
                           num_draws=100, reference=exact, warmup=30, seed=1)
    for est in ("score", "score-baseline"):
        assert stats.row(est, "encoder")["max_z"] < 4.5, est
        assert stats.row(est, "encoder")["variance"] > 0.0
    # a baseline lowers the encoder's score-function variance
    assert stats.row("score", "encoder")["variance"] > stats.row("score-baseline", "encoder")["variance"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="num_classes"):
        DiscreteVAE(64, num_classes=1)
    vae = DiscreteVAE(64, 3, (8,))
    with pytest.raises(ValueError, match=r"shape \(batch, 64\)"):
        vae.model(torch.zeros(2, 10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vae.guide([[0.0] * 64])
