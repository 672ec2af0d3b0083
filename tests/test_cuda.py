"""The device path: the same known answers as the CPU tests, computed with ``--device DEVICE``.

Every test runs once per available device: always on the CPU (so CI, which has no GPU, runs
them), and on ``cuda`` where a CUDA GPU is present. ``PPGEN_TEST_DEVICE=cuda`` (or ``cpu``)
restricts them to that one device; ``cuda`` without a GPU then skips them, saying so.
On the CPU, ``test_svi_on_device_matches_cpu`` compares two runs on the same device: there it
checks that a seeded run repeats exactly.
"""

import os

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppgen.infer.evidence import log_evidence
from ppgen.infer.svi import SVIConfig, train_svi
from ppgen.score import GaussianMixture, langevin
from ppgen.models.linear_gaussian import LinearGaussian
from ppgen.score import ism_loss, ssm_loss


def _devices() -> list:
    wanted = os.environ.get("PPGEN_TEST_DEVICE")
    if wanted is not None:
        missing = wanted == "cuda" and not torch.cuda.is_available()
        return [pytest.param(wanted, marks=pytest.mark.skipif(missing, reason="PPGEN_TEST_DEVICE=cuda but no CUDA GPU"))]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request) -> str:
    return request.param


def test_exact_evidence_of_linear_gaussian_on_device(device):
    lg = LinearGaussian.random(6, 3, noise=0.5, seed=0)
    on = LinearGaussian(lg.weight.to(device), lg.bias.to(device), lg.noise)
    x = lg.sample(40, seed=1)
    r = log_evidence(on.model, on.guide, x.to(device), 64, batch_size=16)
    assert torch.allclose(r.log_px.cpu(), lg.log_evidence(x), atol=1e-8, rtol=0)


def _fit(device: str) -> dict:
    """One run of SVI with a point-mass guide (no sampling noise) on ``device``."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.randn(96, 3) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0], [0.3, 0.0, 1.0]])
    encoder = nn.Linear(3, 2).to(device)

    def model(x):
        w = pyro.param("w", x.new_full((2, 3), 0.1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w, 0.5).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(encoder(x)).to_event(1))

    res = train_svi(model, guide, x, None, SVIConfig(epochs=2, batch_size=16, lr=0.01, device=device), progress=False)
    out = {k: v.detach().cpu() for k, v in pyro.get_param_store().named_parameters()}
    out["loss"] = torch.tensor([h["train_loss"] for h in res.history])
    return out


def test_svi_on_device_matches_cpu(device):
    cpu, dev = _fit("cpu"), _fit(device)
    assert cpu.keys() == dev.keys()
    for k in cpu:
        assert torch.allclose(cpu[k], dev[k], atol=1e-4), k
    assert cpu["loss"][1] < cpu["loss"][0]


def test_score_matching_losses_of_the_true_score_on_device(device):
    # For x ~ N(0, I_d) and s(x) = -x: 0.5 E||s||^2 + tr(ds/dx) = d/2 - d = -d/2, for ISM and
    # (in expectation) for sliced score matching.
    d, n = 3, 200_000
    x = torch.randn(n, d, device=device, generator=torch.Generator(device).manual_seed(123))  # not the global seed: v != x
    assert ism_loss(lambda x: -x, x).item() == pytest.approx(-d / 2, abs=0.02)
    assert ssm_loss(lambda x: -x, x, variance_reduced=False).item() == pytest.approx(-d / 2, abs=0.05)


def test_langevin_on_device_reaches_the_target_moments(device):
    target = GaussianMixture([1.0], [[2.0, -1.0]], std=1.0)
    x0 = torch.zeros(4000, 2, device=device)
    out = langevin(target.score, x0, eta=0.01, steps=1000, generator=torch.Generator(device).manual_seed(0))
    assert out.x.device.type == torch.device(device).type
    # Mean within 4 standard errors (sd 1, 4000 chains); variance 1 up to the O(eta) step bias.
    assert torch.allclose(out.x.mean(0).cpu(), torch.tensor([2.0, -1.0]), atol=4 / 4000**0.5)
    assert torch.allclose(out.x.var(0).cpu(), torch.ones(2), atol=0.08)



@pytest.mark.slow
def test_compiled_step_matches_eager_on_device(device):
    # Same draws (inductor's fallback_random), so compiled and eager steps give the same losses
    # and parameters; on CUDA also with CUDA graphs (mode="reduce-overhead", CUDA only).
    from ppgen.infer.svi import make_svi_step
    from ppgen.models.vae import VAE

    x = torch.bernoulli(torch.full((32, 20), 0.3, device=device), generator=torch.Generator(device).manual_seed(0))
    for mode in [None] + (["reduce-overhead"] if device == "cuda" else []):
        torch.manual_seed(0)
        nets = [VAE(20, 3, (16,)).to(device) for _ in range(2)]
        nets[1].load_state_dict(nets[0].state_dict())
        out = []
        for net, compiled in zip(nets, (True, False)):
            step, _ = make_svi_step(net.model, net.guide, SVIConfig(lr=0.01), x, scale=2.0)
            if compiled:
                step.compile(x, mode=mode)
                assert step.compiled, step.why_eager
            pyro.set_rng_seed(1)
            records = torch.stack([step.on_device(x) for _ in range(5)])
            out.append((records, [p.detach().clone() for p in step.params]))
        torch.testing.assert_close(out[0][0][:, 0], out[1][0][:, 0], rtol=1e-5, atol=1e-4)
        for p, q in zip(out[0][1], out[1][1]):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)
