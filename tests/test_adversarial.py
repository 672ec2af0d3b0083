"""GAN losses, loop, theory check (optimal discriminator) and bad input."""

import math

import pytest
import torch

from ppgen.adversarial import (
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
    import ppgen.adversarial as adv
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
    assert json.loads((tmp_path / "gan" / "config.json").read_text())["loop"]["loss"] == "hinge"
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
