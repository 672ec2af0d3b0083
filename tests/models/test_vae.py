import math

import pyro
import pytest
import torch
from pyro import poutine
from torch.distributions import Bernoulli, Normal

from ppgen.models.vae import VAE, VAEConfig


def test_trace_log_joint_matches_the_vae_formula():
    vae = VAE(x_dim=6, z_dim=3, hidden=(5,))
    x = torch.bernoulli(torch.full((4, 6), 0.4))
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    z = guide_tr.nodes["z"]["value"]
    loc, scale = vae.encoder(x)
    log_q = Normal(loc, scale).log_prob(z).sum()
    log_p = Normal(0.0, 1.0).log_prob(z).sum() + Bernoulli(logits=vae.decoder(z)).log_prob(x).sum()
    assert torch.allclose(model_tr.log_prob_sum(), log_p, atol=1e-5)
    assert torch.allclose(guide_tr.log_prob_sum(), log_q, atol=1e-5)
    # one latent per datapoint, inside the data plate
    frame = guide_tr.nodes["z"]["cond_indep_stack"][0]
    assert frame.name == "data" and frame.size == 4
    assert z.shape == (4, 3)


def test_sample_and_reconstruct_are_probabilities_of_the_right_shape():
    vae = VAE(x_dim=64, z_dim=2, hidden=(8,))
    s = vae.sample(5)
    r = vae.reconstruct(torch.zeros(3, 64))
    assert s.shape == (5, 64) and r.shape == (3, 64)
    assert float(s.min()) > 0 and float(s.max()) < 1
    # reconstruct decodes the posterior mean
    loc, _ = vae.encoder(torch.zeros(3, 64))
    assert torch.allclose(r, torch.sigmoid(vae.decoder(loc)))


def test_conv_vae_on_28x28():
    vae = VAEConfig(latent_dim=4, hidden=(32,), arch="conv").build(784, (1, 28, 28))
    x = torch.bernoulli(torch.full((2, 784), 0.3))
    # A decoder with every weight 0 outputs logits 0: each of the 784 pixels has p(x | z) = 1/2
    # whatever z, so -ELBO with the analytic KL is exactly 2 * 784 log 2 + KL(q(z | x) || N(0, I)).
    with torch.no_grad():
        for p in vae.decoder.parameters():
            p.zero_()
        loc, scale = vae.encoder(x)
        kl = float(0.5 * (scale**2 + loc**2 - 1 - 2 * scale.log()).sum())
    loss = pyro.infer.TraceMeanField_ELBO().loss(vae.model, vae.guide, x)
    assert loss == pytest.approx(2 * 784 * math.log(2) + kl, rel=1e-5)
    assert vae.sample(3).shape == (3, 784)


def test_bad_input_is_named():
    vae = VAE(x_dim=64, z_dim=2, hidden=(8,))
    with pytest.raises(ValueError, match=r"shape \(batch, 64\)"):
        vae.model(torch.zeros(3, 63))
    with pytest.raises(TypeError, match="torch.Tensor"):
        vae.guide([[0.0] * 64])
    with pytest.raises(ValueError, match="binarize"):
        vae.check_data(torch.full((2, 64), 0.5))
    with pytest.raises(ValueError, match=r"range \[-1, 2\]"):
        vae.check_data(torch.tensor([[-1.0, 2.0] * 32]))
    with pytest.raises(ValueError, match="28x28"):
        VAE(64, 2, arch="conv", image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="latent_dim"):
        VAEConfig(latent_dim=0)
    with pytest.raises(ValueError, match="architecture"):
        VAEConfig(arch="transformer")
