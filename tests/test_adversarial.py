"""GAN losses, loop, theory check (optimal discriminator) and bad input."""

import dataclasses
import math

import pytest
import torch

from ppgen.gan import (
    LOSSES,
    GANConfig,
    LoopConfig,
    adversarial_loop,
    get_loss,
    load_gan,
    make_discriminator,
    make_generator,
    optimal_discriminator,
    optimal_discriminator_gap,
    train_gan,
    train_toy_gan,
)
from ppgen.data import DataConfig
from ppgen.metrics import mode_coverage
from ppgen.runs import Run


pytestmark = pytest.mark.usefixtures("one_thread")


def test_losses_known_values_at_indifferent_discriminator():
    zero = torch.zeros(5)
    log2 = math.log(2)
    for name in ("minimax", "ns"):
        assert LOSSES[name].d_loss(zero, zero).item() == pytest.approx(2 * log2)
    assert LOSSES["minimax"].g_loss(zero).item() == pytest.approx(-log2)
    assert LOSSES["ns"].g_loss(zero).item() == pytest.approx(log2)
    assert LOSSES["hinge"].d_loss(zero, zero).item() == pytest.approx(2.0)
    assert LOSSES["hinge"].g_loss(zero).item() == pytest.approx(0.0)


def test_minimax_generator_gradient_saturates_but_ns_does_not():
    # d/dd of log(1 - sigmoid(d)) is -sigmoid(d) (tiny when D rejects fakes); d/dd of
    # -log sigmoid(d) is sigmoid(d) - 1 (about -1): Goodfellow et al. 2014, section 3.
    fake = torch.full((1,), -10.0, requires_grad=True)
    (g_mm,) = torch.autograd.grad(LOSSES["minimax"].g_loss(fake), fake)
    (g_ns,) = torch.autograd.grad(LOSSES["ns"].g_loss(fake), fake)
    assert g_mm.item() == pytest.approx(-torch.sigmoid(torch.tensor(-10.0)).item(), rel=1e-4)
    assert g_ns.item() == pytest.approx(torch.sigmoid(torch.tensor(-10.0)).item() - 1, rel=1e-4)


def test_eight_gaussians_short_run_covers_six_modes():
    config = LoopConfig(loss="ns", epochs=30, batch_size=128, lr_g=1e-3, lr_d=1e-3, seed=0)
    generator, _, result = train_toy_gan("8gaussians", 4000, config)
    modes, quality = mode_coverage(generator.sample(2000, torch.Generator().manual_seed(1)))
    assert modes >= 6
    assert quality > 0.5
    assert len(result.history) == 30


def test_optimal_discriminator_formula():
    lp = torch.tensor([0.0, -1.0, math.log(3.0)])
    assert torch.allclose(optimal_discriminator(lp, lp), torch.full((3,), 0.5))
    d = optimal_discriminator(torch.tensor([math.log(3.0)]), torch.tensor([0.0]))
    assert d.item() == pytest.approx(0.75)


def test_optimal_discriminator_gap_shrinks_on_fixed_generator():
    # p_data = N(0, 1), fixed generator p_g = N(1.5, 1): D*(x) = sigmoid(0.75*... ) known exactly.
    torch.manual_seed(0)
    data = torch.distributions.Normal(0.0, 1.0)
    gen = torch.distributions.Normal(1.5, 1.0)
    disc = make_discriminator(1, (32, 32))
    opt = torch.optim.Adam(disc.parameters(), 1e-2, betas=(0.5, 0.999))
    x_eval = torch.cat([data.sample((1000, 1)), gen.sample((1000, 1))])
    args = (x_eval, data.log_prob(x_eval[:, 0]), gen.log_prob(x_eval[:, 0]))
    gaps = [optimal_discriminator_gap(disc, *args)]
    for step in range(600):
        real, fake = data.sample((256, 1)), gen.sample((256, 1))
        loss = LOSSES["minimax"].d_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 199:
            gaps.append(optimal_discriminator_gap(disc, *args))
    assert gaps[-1] < 0.5 * gaps[0]
    assert gaps[-1] < 0.06
    assert gaps[2] < gaps[0]


def test_unknown_loss_and_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="unknown GAN loss 'wgan'"):
        get_loss("wgan")
    with pytest.raises(ValueError, match="unknown GAN loss"):
        LoopConfig(loss="wgan")
    with pytest.raises(ValueError, match="d_steps"):
        LoopConfig(d_steps=0)
    gen, disc = make_generator(2, 64, (16,)), make_discriminator(64, (16,))
    with pytest.raises(ValueError, match=r"does not match the networks.*\(batch, 64\)"):
        adversarial_loop(gen, disc, torch.rand(10, 784), LoopConfig(epochs=1))
    with pytest.raises(ValueError, match="discriminator takes"):
        adversarial_loop(gen, make_discriminator(32, (16,)), torch.rand(10, 64), LoopConfig(epochs=1))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    gen, disc = make_generator(4, 64, (16,)), make_discriminator(64, (16,))
    run = Run(tmp_path / "run")

    def poison(epoch, _):
        if epoch == 1:  # after epoch 1 was checkpointed, break the generator
            with torch.no_grad():
                next(gen.parameters()).fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"loss_D became nan in epoch 2.*checkpoint.pt \(end of epoch 1\)"):
        adversarial_loop(gen, disc, torch.rand(64, 64), LoopConfig(epochs=3, batch_size=16), run, on_epoch=poison)
    ckpt = run.load_checkpoint()
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values())


def test_weights_follow_the_seed_not_the_global_random_stream():
    # Data order and noise come from streams seeded by config.seed (so every torchrun process draws
    # the same numbers whatever else it did); d_steps=2: one generator step per two D steps.
    data = torch.randn(96, 2)
    config = LoopConfig(epochs=2, batch_size=16, d_steps=2, lr_g=1e-2, lr_d=1e-2, seed=5)
    states = []
    for global_seed in (0, 1):
        torch.manual_seed(7)
        gen, disc = make_generator(2, 2, (8,), sigmoid=False), make_discriminator(2, (8,))
        before = [p.detach().clone() for p in gen.parameters()]
        torch.manual_seed(global_seed)
        result = adversarial_loop(gen, disc, data, config)
        assert [r["g_steps"] for r in result.history] == [3, 3]
        assert all(p.requires_grad for p in disc.parameters())  # unfrozen after each generator step
        assert all(not torch.equal(a, b) for a, b in zip(before, gen.parameters()))  # training moved G
        states.append({**gen.state_dict(), **{f"d.{k}": v for k, v in disc.state_dict().items()}})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    with pytest.raises(ValueError, match=r"batch_size 128 is larger than the training set \(96 datapoints\)"):
        adversarial_loop(gen, disc, data, LoopConfig(batch_size=128))


def _digits_config(epochs):
    return GANConfig(DataConfig("digits", "none"), latent_dim=8, hidden=(64,),
                     loop=LoopConfig(epochs=epochs, batch_size=64, seed=3))


def test_resume_gives_the_same_generator_as_an_uninterrupted_run(tmp_path):
    full, _, _ = train_gan(_digits_config(2), tmp_path / "full", progress=False, download=False)
    train_gan(_digits_config(1), tmp_path / "half", progress=False, download=False)
    resumed, result, run = train_gan(_digits_config(2), tmp_path / "half", resume=True, progress=False, download=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["epoch"] for r in run.metrics()] == [1, 2]
    assert (run.figures / "epoch-002.png").exists()
    loaded, config = load_gan(tmp_path / "half")
    assert config == _digits_config(2)
    z = torch.randn(3, 8)
    assert torch.equal(loaded(z), resumed(z))
    with pytest.raises(ValueError, match="latent_dim"):
        bad = GANConfig(DataConfig("digits", "none"), latent_dim=4, hidden=(64,), loop=LoopConfig(epochs=3, seed=3))
        train_gan(bad, tmp_path / "half", resume=True, progress=False, download=False)


def test_sigint_checkpoints_mid_epoch_and_resume_matches(tmp_path, monkeypatch):
    import ppgen.gan.loop as adv
    from conftest import sigint_on_call
    from ppgen.runs import Interrupted

    full, _, _ = train_gan(_digits_config(2), tmp_path / "full", progress=False, download=False)
    ns = adv.get_loss("ns")
    cut = ns._replace(d_loss=sigint_on_call(ns.d_loss, 19 + 5))  # 19 batches per epoch: stop in epoch 2
    monkeypatch.setattr(adv, "get_loss", lambda name: cut)
    with pytest.raises(Interrupted, match="stopped at epoch 2, batch 5.*--resume"):
        train_gan(_digits_config(2), tmp_path / "cut", progress=False, download=False)
    monkeypatch.undo()
    resumed, _, run = train_gan(_digits_config(2), tmp_path / "cut", resume=True, progress=False, download=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [r["epoch"] for r in run.metrics()] == [1, 2]


def test_cli_train_sample_and_metrics(tmp_path, capsys):
    import json

    from ppgen.cli import main

    out = str(tmp_path / "gan")
    assert main(["train", "gan", "--data", "digits", "--no-download", "--hidden", "32", "--latent-dim", "4",
                 "--epochs", "1", "--out", out, "--no-progress", "--loss", "hinge"]) == 0
    loop = json.loads((tmp_path / "gan" / "config.json").read_text())["loop"]
    assert loop["loss"] == "hinge"
    # the defaults: R1 (gamma 1) and the generator EMA on, spectral normalization off
    assert (loop["r1_gamma"], loop["ema_decay"], loop["ema_warmup"], loop["spectral_norm"]) == (1.0, 0.999, True, False)
    assert main(["sample", out, "--n", "16"]) == 0
    assert (tmp_path / "gan" / "figures" / "samples-16.png").exists()
    assert main(["metrics", out, "--n", "500", "--n-val", "100", "--cache-dir", str(tmp_path), "--no-download"]) == 0
    m = json.loads((tmp_path / "gan" / "metrics.json").read_text())
    assert m["family"] == "gan" and m["n_samples"] == 500
    # One epoch of a tiny GAN is far from held-out digits; validation digits are close to test digits.
    assert m["frechet_distance"] > 5 * m["frechet_distance_val_vs_test"]
    with pytest.raises(SystemExit):
        main(["train", "gan", "--data", "digits", "--loss", "wgan", "--out", out])
    assert "invalid choice: 'wgan'" in capsys.readouterr().err


# --------------------------------------------------------------------------- stabilizers


def _sn_layers(disc):
    from torch.nn.utils import parametrize

    return [m for m in disc.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and parametrize.is_parametrized(m, "weight")]


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_spectral_norm_makes_every_discriminator_layer_unit_norm(arch):
    # After training with spectral_norm, a few more power iterations (training-mode forwards, no
    # update) leave every layer's largest singular value (torch.linalg, exact) at 1 within 1e-3.
    torch.manual_seed(0)
    gen, disc = make_generator(4, 784, (32,), arch), make_discriminator(784, (32,), arch)
    config = LoopConfig(epochs=1, batch_size=16, lr_g=1e-3, lr_d=1e-3, spectral_norm=True)
    adversarial_loop(gen, disc, torch.rand(64, 784), config)
    layers = _sn_layers(disc)
    assert len(layers) == (2 if arch == "mlp" else 4)  # trunk layer(s) and the head, all normalized
    with torch.no_grad():
        for _ in range(30):
            disc.train()(torch.rand(8, 784))
        for layer in layers:
            w = layer.weight  # the normalized weight W / sigma(W)
            sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1).double(), ord=2)
            assert abs(sigma.item() - 1) < 1e-3, (layer, sigma)
            raw = layer.parametrizations.weight.original
            assert abs(torch.linalg.matrix_norm(raw.reshape(raw.shape[0], -1), ord=2).item() - 1) > 0.01  # not trivially 1
    # the loop's power-iteration vectors come from the seed, not the global stream
    torch.manual_seed(0)
    gen2, disc2 = make_generator(4, 784, (32,), arch), make_discriminator(784, (32,), arch)
    torch.manual_seed(123)
    adversarial_loop(gen2, disc2, torch.rand(64, 784, generator=torch.Generator().manual_seed(0)),
                     LoopConfig(epochs=1, batch_size=16, spectral_norm=True))
    torch.manual_seed(0)
    gen3, disc3 = make_generator(4, 784, (32,), arch), make_discriminator(784, (32,), arch)
    torch.manual_seed(456)
    adversarial_loop(gen3, disc3, torch.rand(64, 784, generator=torch.Generator().manual_seed(0)),
                     LoopConfig(epochs=1, batch_size=16, spectral_norm=True))
    for a, b in zip(disc2.state_dict().values(), disc3.state_dict().values()):
        assert torch.equal(a, b)


def test_r1_penalty_on_a_linear_discriminator_is_gamma_half_norm_squared():
    from ppgen.gan import r1_penalty

    w = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 3, dtype=torch.float64).requires_grad_(True)
    gamma = 3.0
    penalty = r1_penalty(x @ w + 0.3, x, gamma)
    assert penalty.item() == pytest.approx(gamma / 2 * w.detach().pow(2).sum().item(), rel=1e-12)
    (grad_w,) = torch.autograd.grad(penalty, w)  # d/dw gamma/2 ||w||^2 = gamma w: the double backward
    assert torch.allclose(grad_w, gamma * w.detach())
    # a quadratic d(x) = ||x||^2 / 2 has gradient x: penalty gamma/2 * mean ||x||^2
    x2 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert r1_penalty(0.5 * x2.pow(2).sum(1), x2, 2.0).item() == pytest.approx(x2.detach().pow(2).sum(1).mean().item())
    with pytest.raises(ValueError, match="requires_grad=True"):
        r1_penalty(torch.zeros(7), torch.zeros(7, 3), 1.0)
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        r1_penalty((x @ w).unsqueeze(1), x, 1.0)


def test_r1_in_the_loop_logs_the_penalty_of_the_discriminator_it_trains():
    # gamma only scales the logged penalty at the first step; a larger gamma keeps D flatter on the
    # data (smaller mean squared gradient norm, r1 / gamma) over an epoch.
    data = torch.randn(256, 2)
    logs = {}
    for gamma in (0.1, 10.0):
        torch.manual_seed(0)
        gen, disc = make_generator(2, 2, (16,), sigmoid=False), make_discriminator(2, (16,))
        result = adversarial_loop(gen, disc, data, LoopConfig(epochs=3, batch_size=32, lr_d=1e-2, r1_gamma=gamma))
        logs[gamma] = [r["r1"] / gamma for r in result.history]
        assert all(math.isfinite(v) and v > 0 for v in logs[gamma])
    assert logs[10.0][-1] < logs[0.1][-1]
    plain = adversarial_loop(make_generator(2, 2, (16,), sigmoid=False), make_discriminator(2, (16,)), data,
                             LoopConfig(epochs=1, batch_size=32, r1_gamma=0.0))
    assert "r1" not in plain.history[0]


@pytest.mark.parametrize("warmup", [False, True])
def test_loop_ema_equals_the_closed_form_of_the_recorded_generator_weights(warmup):
    # One batch per epoch: on_epoch sees the generator after every generator step, so the EMA the
    # loop keeps must equal prod_t d_t w_0 + sum_i (1 - d_{i-1}) prod_{t >= i} d_t w_i.
    from torch.nn.utils import parameters_to_vector as flat

    torch.manual_seed(0)
    gen, disc = make_generator(2, 2, (8,), sigmoid=False), make_discriminator(2, (8,))
    ws = [flat(gen.parameters()).detach().double().clone()]
    record = lambda epoch, _: ws.append(flat(gen.parameters()).detach().double().clone())
    d, n = 0.8, 25
    config = LoopConfig(epochs=n, batch_size=32, lr_g=1e-2, lr_d=1e-2, ema_decay=d, ema_warmup=warmup)
    result = adversarial_loop(gen, disc, torch.randn(32, 2), config, on_epoch=record)
    ds = [min(d, (1 + t) / (10 + t)) if warmup else d for t in range(n)]
    keep = lambda lo: math.prod(ds[lo:])
    exact = keep(0) * ws[0] + sum((1 - ds[i - 1]) * keep(i) * ws[i] for i in range(1, n + 1))
    assert torch.allclose(flat(result.ema.parameters()).double(), exact, atol=1e-6, rtol=0)
    assert not torch.allclose(exact, ws[-1], atol=1e-3)  # the average is not the last iterate
    assert result.sampler(gen) is result.ema and not result.ema.training


def _stabilized_config(epochs):
    return GANConfig(DataConfig("digits", "none"), latent_dim=8, hidden=(64,),
                     loop=LoopConfig(epochs=epochs, batch_size=64, seed=3, spectral_norm=True, r1_gamma=1.0,
                                     ema_decay=0.95))


def test_resume_with_stabilizers_restores_ema_and_discriminator_exactly(tmp_path):
    full, full_result, full_run = train_gan(_stabilized_config(2), tmp_path / "full", progress=False, download=False)
    train_gan(_stabilized_config(1), tmp_path / "half", progress=False, download=False)
    resumed, result, run = train_gan(_stabilized_config(2), tmp_path / "half", resume=True, progress=False,
                                     download=False)
    assert full is full_result.ema and resumed is result.ema  # train_gan returns the EMA generator
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    ck_full, ck_half = full_run.load_checkpoint(), run.load_checkpoint()
    assert ck_half["ema"]["num_updates"] == ck_full["ema"]["num_updates"] == 2 * 19
    for part in ("generator", "discriminator"):  # D with its spectral-norm vectors, G's trained weights
        for k, v in ck_full[part].items():
            assert torch.equal(v, ck_half[part][k]), (part, k)
    assert any(k.endswith("_u") for k in ck_full["discriminator"])
    assert [r["epoch"] for r in run.metrics()] == [1, 2] and all(r["r1"] > 0 for r in run.metrics())
    loaded, config = load_gan(tmp_path / "half")  # ppgen sample / ppgen metrics get the EMA generator
    z = torch.randn(3, 8)
    assert torch.equal(loaded(z), resumed(z))
    trained, _ = load_gan(tmp_path / "half", averaged=False)
    assert not torch.allclose(trained(z), loaded(z))
    with pytest.raises(ValueError, match="loop.ema_decay: 0.95 -> 0.9"):
        changed = dataclasses.replace(_stabilized_config(3), loop=dataclasses.replace(_stabilized_config(3).loop,
                                                                                     ema_decay=0.9))
        train_gan(changed, tmp_path / "half", resume=True, progress=False, download=False)


def test_runs_made_before_the_stabilizers_load_and_resume_as_plain(tmp_path):
    import json

    plain = dataclasses.replace(_digits_config(1), loop=dataclasses.replace(
        _digits_config(1).loop, spectral_norm=False, r1_gamma=0.0, ema_decay=0.0))
    gen, _, run = train_gan(plain, tmp_path / "old", progress=False, download=False)
    stored = run.load_config()
    for key in ("spectral_norm", "r1_gamma", "ema_decay", "ema_warmup"):
        del stored["loop"][key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(stored))
    loaded, config = load_gan(tmp_path / "old")
    assert config.loop.ema_decay == 0 and not config.loop.spectral_norm
    z = torch.randn(2, 8)
    assert torch.equal(loaded(z), gen(z))
    more = dataclasses.replace(plain, loop=dataclasses.replace(plain.loop, epochs=2))
    train_gan(more, tmp_path / "old", resume=True, progress=False, download=False)


def test_stabilizer_settings_are_checked():
    with pytest.raises(ValueError, match="r1_gamma must be a finite number >= 0"):
        LoopConfig(r1_gamma=-1.0)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        LoopConfig(ema_decay=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stabilized_gan_on_cuda(tmp_path):
    config = dataclasses.replace(_stabilized_config(1), loop=dataclasses.replace(_stabilized_config(1).loop,
                                                                                device="cuda"))
    gen, result, _ = train_gan(config, tmp_path / "cuda", progress=False, download=False)
    assert next(gen.parameters()).is_cuda and math.isfinite(result.history[-1]["r1"])
    loaded, _ = load_gan(tmp_path / "cuda", "cuda")
    z = torch.randn(4, 8, device="cuda")
    assert torch.equal(loaded(z), gen(z))
    from ppgen.gan import r1_penalty

    w = torch.randn(5, device="cuda", requires_grad=True)
    x = torch.randn(6, 5, device="cuda", requires_grad=True)
    assert r1_penalty(x @ w, x, 2.0).item() == pytest.approx(w.detach().pow(2).sum().item(), rel=1e-5)
