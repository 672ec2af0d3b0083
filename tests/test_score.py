"""Score matching and Langevin sampling against analytic scores of Gaussian mixtures."""

import math

import pytest
import torch

from ppgen.score import GaussianMixture, annealed_langevin, langevin
from ppgen.score import (
    ScoreNet,
    UNetScore,
    dae_loss,
    dae_score,
    dsm_loss,
    geometric_sigmas,
    ism_loss,
    ncsn_loss,
    ssm_loss,
)

# 0.3 N((-1.5, 0), 0.25 I) + 0.7 N((1.5, 0), 0.25 I); E||grad log p||^2 is about 7.9 on it.
GM = GaussianMixture([0.3, 0.7], [[-1.5, 0.0], [1.5, 0.0]], 0.5)
SIGMA = 0.5  # DSM / DAE noise level (the DAE score divides denoiser errors by sigma^2)


def _fit(loss_fn, net, steps=500, seed=0, lr=3e-3):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr)
    for _ in range(steps):
        loss = loss_fn(net, GM.sample(256, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def held_out():
    return GM.sample(2000, torch.Generator().manual_seed(123))


def _mse(a, b):
    return float((a - b).pow(2).sum(-1).mean())


# Measured MSE over seeds 0-2 (500 steps): ism 0.18-0.28, hutchinson 0.20-0.23, ssm-vr 0.17-0.20;
# thresholds about 2x the worst (E||grad log p||^2 = 7.9, so 0.5 is a 6% relative error).
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, loss_fn, threshold",
    [
        ("ism-exact", lambda n, x: ism_loss(n, x), 0.5),
        ("ism-hutchinson", lambda n, x: ism_loss(n, x, "hutchinson"), 0.5),
        ("ssm-vr", lambda n, x: ssm_loss(n, x), 0.5),
    ],
)
def test_noise_free_objectives_recover_the_analytic_score(held_out, name, loss_fn, threshold):
    net = _fit(loss_fn, ScoreNet(2, (64, 64)))
    with torch.no_grad():
        mse = _mse(net(held_out), GM.score(held_out))
    assert mse < threshold, f"{name}: score MSE {mse:.3f}"


@pytest.mark.slow
def test_dsm_optimum_is_the_noised_score_and_dae_agrees(held_out):
    dsm = _fit(lambda n, x: dsm_loss(n, x, SIGMA), ScoreNet(2, (64, 64)))
    dae = _fit(lambda n, x: dae_loss(n, x, SIGMA), ScoreNet(2, (64, 64)), seed=1)
    with torch.no_grad():
        target = GM.score(held_out, SIGMA)
        s_dsm, s_dae = dsm(held_out), dae_score(dae, SIGMA)(held_out)
        mse_dsm, mse_dae, mse_pair = _mse(s_dsm, target), _mse(s_dae, target), _mse(s_dsm, s_dae)
        # the noised score is a different function from the clean one: DSM must find the noised one
        mse_clean = _mse(s_dsm, GM.score(held_out))
    # measured over seeds 0-2: dsm 0.019-0.038, dae 0.07-0.12 (E||grad log p_sigma||^2 = 1.9)
    assert mse_dsm < 0.1 and mse_dae < 0.25 and mse_pair < 0.3, (mse_dsm, mse_dae, mse_pair)
    assert mse_clean > mse_dsm


@pytest.mark.slow
def test_ncsn_learns_the_score_at_every_level(held_out):
    sigmas = geometric_sigmas(2.0, 0.2, 4)
    net = _fit(lambda n, x: ncsn_loss(n, x, sigmas), ScoreNet(2, (64, 64), conditional=True), steps=500)
    with torch.no_grad():
        for s in sigmas.tolist():
            x = GM.sample(1000, torch.Generator().manual_seed(7), sigma=s)
            ref = GM.score(x, s)
            rel = _mse(net(x, torch.full((1000,), s)), ref) / float(ref.pow(2).sum(-1).mean())
            assert rel < 0.1, f"sigma={s:.3f}: relative score MSE {rel:.3f}"


def test_exact_and_hutchinson_ism_agree_in_expectation():
    torch.manual_seed(0)
    net = ScoreNet(5, (32,))
    x = torch.randn(64, 5)
    exact = float(ism_loss(net, x))
    draws = torch.tensor([float(ism_loss(net, x, "hutchinson")) for _ in range(400)])
    sliced = torch.tensor([float(ssm_loss(net, x, variance_reduced=False)) for _ in range(400)])
    for d in (draws, sliced):
        se = float(d.std()) / 20
        assert abs(float(d.mean()) - exact) < 4 * se + 1e-6, (float(d.mean()), exact, se)
    # the variance-reduced form has the smaller spread
    vr = torch.tensor([float(ssm_loss(net, x)) for _ in range(400)])
    assert vr.std() < sliced.std()


def test_exact_trace_matches_autograd_jacobian():
    torch.manual_seed(0)
    net = ScoreNet(3, (16,))
    x = torch.randn(4, 3)
    jac = torch.stack([torch.autograd.functional.jacobian(net, xi[None])[0, :, 0] for xi in x])
    want = (0.5 * net(x).pow(2).sum(-1) + jac.diagonal(dim1=-2, dim2=-1).sum(-1)).mean()
    assert torch.allclose(ism_loss(net, x), want, atol=1e-5)


FAR = GaussianMixture([0.8, 0.2], [[5.0, 5.0], [-5.0, -5.0]], 1.0)  # Song & Ermon (2019), fig. 3


def test_plain_langevin_gets_mode_weights_wrong_annealed_gets_them_right():
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2000, 2, generator=g) * 16 - 8  # uniform on [-8, 8]^2: half in each basin
    plain = langevin(FAR.score, x0, eta=0.1, steps=1000, generator=g).x
    sigmas = geometric_sigmas(20.0, 1.0, 10)
    annealed = annealed_langevin(FAR.score, x0, sigmas, eta=0.05, steps_per_level=100, generator=g).x
    w_plain, w_ann = FAR.mode_weights(plain)[0], FAR.mode_weights(annealed)[0]
    # measured over seeds: plain 0.48-0.51 (stays where it started), annealed 0.78-0.81
    assert abs(w_plain - 0.5) < 0.05 and abs(w_plain - 0.8) > 0.2, w_plain
    assert abs(w_ann - 0.8) < 0.04, w_ann


def test_langevin_trajectory_and_stationary_moments():
    gm = GaussianMixture([1.0], [[1.0, -2.0]], 0.5)
    g = torch.Generator().manual_seed(0)
    res = langevin(gm.score, torch.zeros(4000, 2), eta=0.01, steps=400, keep_every=100, generator=g)
    assert res.trajectory.shape == (5, 4000, 2)
    assert torch.allclose(res.x.mean(0), torch.tensor([1.0, -2.0]), atol=0.03)
    # ULA's stationary variance for N(m, v): v / (1 - eta / (2 v)) = 0.2513 for v = 0.25
    assert abs(float(res.x.var(0).mean()) - 0.2513) < 0.02


def test_unet_shapes_and_sigma_scaling():
    net = UNetScore((1, 8, 8), width=8)
    x = torch.rand(3, 64)
    assert net(x, torch.full((3,), 0.5)).shape == (3, 64)
    with pytest.raises(ValueError, match="sigma"):
        net(x)


def test_bad_inputs_are_named():
    net = ScoreNet(2)
    with pytest.raises(ValueError, match="x must have shape"):
        ism_loss(net, torch.zeros(3))
    with pytest.raises(ValueError, match="trace"):
        ism_loss(net, torch.zeros(3, 2), trace="nope")
    with pytest.raises(ValueError, match="sigma"):
        dsm_loss(net, torch.zeros(3, 2), -1.0)
    with pytest.raises(ValueError, match="sigma_min"):
        geometric_sigmas(0.1, 1.0, 3)
    with pytest.raises(ValueError, match="descending"):
        annealed_langevin(GM.score, torch.zeros(3, 2), [0.1, 1.0], 0.1, 5)
    with pytest.raises(ValueError, match="eta"):
        langevin(GM.score, torch.zeros(3, 2), 0.0, 5)


@pytest.mark.parametrize("objective", ["ism", "ism-hutchinson", "ssm", "dsm"])
def test_given_noise_splits_a_batch_exactly(objective):
    # What data-parallel training rests on: the loss of a batch is the mean of the losses of its
    # halves when each half gets its rows of the batch's noise; and drawing that noise in the loop
    # (ScoreConfig.draw_noise) gives the numbers the objective draws itself from the same seed.
    from ppgen.score import ScoreConfig

    pre = {"sigma_data": 1.0, "data_mean": 0.0} if objective == "dsm" else {}  # what resolve_ladder would set
    config = ScoreConfig(objective=objective, hidden=(16,), projections=3, sigma_max=1.0, n_sigmas=4, **pre)
    torch.manual_seed(0)
    net, x = config.build(), torch.randn(8, 2)
    noise = config.draw_noise(8, 2, torch.Generator().manual_seed(1))
    halves = [config.loss(net, x[i : i + 4], {k: v[i : i + 4] for k, v in noise.items()}) for i in (0, 4)]
    whole = config.loss(net, x, noise)
    assert torch.allclose(whole, (halves[0] + halves[1]) / 2, atol=1e-6)
    if objective != "ism":
        assert not torch.allclose(whole, config.loss(net, x, config.draw_noise(8, 2, torch.Generator())))
    if objective == "dsm":
        torch.manual_seed(2)
        levels, eps = torch.randint(4, (8,)), torch.randn(8, 2)
        torch.manual_seed(2)
        assert torch.equal(ncsn_loss(net, x, config.sigmas), ncsn_loss(net, x, config.sigmas, levels, eps))


def test_noise_of_the_wrong_shape_is_named():
    net = ScoreNet(2)
    with pytest.raises(ValueError, match=r"eps must be a tensor of shape \(3, 2\) \(batch first\), got \(2, 3\)"):
        dsm_loss(net, torch.zeros(3, 2), 0.5, eps=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"projections must be a tensor of shape \(3, 1, 2\)"):
        ssm_loss(net, torch.zeros(3, 2), projections=torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"levels must be a tensor of shape \(3,\)"):
        ncsn_loss(ScoreNet(2, conditional=True), torch.zeros(3, 2), geometric_sigmas(1.0, 0.1, 3), levels=[0, 1, 2])


# --------------------------------------------------------------------------- run directory, CLI


def _toy_config(**kw):
    from ppgen.score import ScoreConfig

    base = dict(data="8gaussians", toy_n=1000, objective="dsm", hidden=(32,), sigma_max=2.0, sigma_min=0.1,
                n_sigmas=4, epochs=3, batch_size=250, lr=3e-3, langevin_steps=5)
    return ScoreConfig(**{**base, **kw})


def test_resume_continues_the_same_run(tmp_path):
    from ppgen.score import load_score, train_score

    full = train_score(_toy_config(), tmp_path / "full", progress=False, figures=False)
    train_score(_toy_config(epochs=2), tmp_path / "part", progress=False, figures=False)
    resumed = train_score(_toy_config(), tmp_path / "part", resume=True, progress=False, figures=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["val_loss"] == pytest.approx(full.history[-1]["val_loss"], rel=1e-5)
    x, s = torch.randn(5, 2), torch.full((5,), 0.1)
    for averaged, want in ((False, full.net), (True, full.sampler)):  # live weights, and the EMA that samples
        net, config, _ = load_score(tmp_path / "part", averaged=averaged)
        assert torch.allclose(net(x, s), want(x, s), atol=1e-6)
    with pytest.raises(ValueError, match="cannot resume"):
        train_score(_toy_config(lr=1e-2), tmp_path / "part", resume=True, progress=False, figures=False)


def test_sigint_checkpoints_mid_epoch_and_resume_matches(tmp_path, monkeypatch):
    from conftest import sigint_on_call
    from ppgen.runs import Interrupted
    from ppgen.score import ScoreConfig, train_score

    full = train_score(_toy_config(), tmp_path / "full", progress=False, figures=False)
    monkeypatch.setattr(ScoreConfig, "loss", sigint_on_call(ScoreConfig.loss, 4 + 1 + 2))  # 4 batches + val
    with pytest.raises(Interrupted, match="stopped in epoch 2.*--resume"):
        train_score(_toy_config(), tmp_path / "cut", progress=False, figures=False)
    monkeypatch.undo()
    resumed = train_score(_toy_config(), tmp_path / "cut", resume=True, progress=False, figures=False)
    x, s = torch.randn(5, 2), torch.full((5,), 0.1)
    assert torch.equal(resumed.net(x, s), full.net(x, s))
    assert torch.equal(resumed.sampler(x, s), full.sampler(x, s))  # the EMA continues exactly too
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["val_loss_ema"] == full.history[-1]["val_loss_ema"]


def test_non_finite_loss_stops_at_the_end_of_the_epoch_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from ppgen.runs import Run
    from ppgen.score import ScoreConfig, train_score

    calls = {"n": 0}
    loss = ScoreConfig.loss

    def poisoned(self, net, x, noise=None):
        calls["n"] += 1
        value = loss(self, net, x, noise)
        return value * float("nan") if calls["n"] == 4 + 1 + 2 else value  # epoch 2, batch 2

    monkeypatch.setattr(ScoreConfig, "loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"score loss became nan in epoch 2.*checkpoint.pt \(end of epoch 1\)"):
        train_score(_toy_config(), tmp_path / "run", progress=False, figures=False)
    run = Run(tmp_path / "run", resume=True)
    assert run.load_checkpoint()["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in run.load_checkpoint()["net"].values())
    assert [r["epoch"] for r in run.metrics()] == [1]


def test_batch_larger_than_the_data_is_refused(tmp_path):
    from ppgen.score import train_score

    with pytest.raises(ValueError, match="batch_size 2000 is larger than the training set \\(1000 points\\)"):
        train_score(_toy_config(batch_size=2000), tmp_path / "run", progress=False, figures=False)


def test_cli_trains_and_samples_a_toy_and_rejects_bad_flags(tmp_path, capsys):
    from ppgen.cli import main

    out = tmp_path / "run"
    args = ["train", "score", "--data", "8gaussians", "--toy-n", "500", "--hidden", "16", "--epochs", "1",
            "--sigma-max", "2", "--sigma-min", "0.1", "--n-sigmas", "3", "--langevin-steps", "3",
            "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert main(["sample", str(out), "--n", "100", "--langevin-steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    import json

    flags = ["--ema-decay", "0.5", "--no-ema-warmup", "--no-denoise", "--init", "uniform", "--eta", "0.3",
             "--ladder-subsample", "100"]
    assert main([*args[:-1], str(tmp_path / "flags"), *flags]) == 0  # each flag lands in its field
    stored = json.loads((tmp_path / "flags" / "config.json").read_text())
    assert {k: stored[k] for k in ("ema_decay", "ema_warmup", "denoise", "init", "eta", "ladder_subsample")} == {
        "ema_decay": 0.5, "ema_warmup": False, "denoise": False, "init": "uniform", "eta": 0.3, "ladder_subsample": 100}
    assert main([*args[:2], "--data", "8gaussians", "--toy-n", "300", "--hidden", "8", "--epochs", "1", "--no-progress",
                 "--langevin-steps", "1", "--out", str(tmp_path / "auto")]) == 0  # the ladder from the data: 20 levels in 2-D
    stored = json.loads((tmp_path / "auto" / "config.json").read_text())
    ladder = json.loads((tmp_path / "auto" / "ladder.json").read_text())
    assert stored["n_sigmas"] == ladder["n_sigmas"] == 20 and stored["sigma_max"] == ladder["sigma_max"] > 3.5
    assert (tmp_path / "s.png").stat().st_size > 1000
    capsys.readouterr()
    assert main([*args[:-1], str(tmp_path / "bad"), "--arch", "unet"]) == 2
    assert "unet" in capsys.readouterr().err
    with pytest.raises(ValueError, match="objective"):
        _toy_config(objective="nope")


# --------------------------------------------------------------------------- Song & Ermon (2020) stabilizers


def test_technique_1_is_the_largest_pairwise_distance():
    from ppgen.score import max_pairwise_distance

    # points inside the cube [0, 0.5]^16 plus two opposite corners: the largest distance is 0.5 * sqrt(16) = 2
    x = torch.cat([torch.zeros(1, 16), torch.full((1, 16), 0.5), 0.5 * torch.rand(300, 16, generator=torch.Generator().manual_seed(0))])
    assert max_pairwise_distance(x) == pytest.approx(2.0, abs=1e-12)
    sub = max_pairwise_distance(x, subsample=50, seed=3)  # a subsample gives a lower bound
    assert sub <= 2.0 and sub == max_pairwise_distance(x, subsample=50, seed=3)
    with pytest.raises(ValueError, match="subsample must be an integer >= 2"):
        max_pairwise_distance(x, subsample=1)


def test_technique_2_overlap_rule_and_the_papers_ladders():
    from ppgen.score import level_overlap, overlap_ratio

    for dim in (64, 784, 3072):
        g = overlap_ratio(dim)
        assert level_overlap(g, dim) == pytest.approx(0.5, abs=1e-9) and level_overlap(g * 1.001, dim) < 0.5
        # closed form: the lower argument sqrt(2D)(g - 1) - 3g is 0 where the upper, 6g, is past 6
        assert g == pytest.approx((2 * dim) ** 0.5 / ((2 * dim) ** 0.5 - 3), abs=1e-8)
    # Independent check of the rule's meaning: draws of N(0, I) land in the 3-sd shell of ||N(0, gamma^2 I)||
    # (norm taken as normal: mean gamma sqrt(D), sd gamma / sqrt(2)) half the time; measured 0.478 at D = 64
    # and 0.494 at D = 784 (the normal approximation of the chi distribution, exact as D grows).
    for d, n, tol in ((64, 200_000, 0.03), (784, 20_000, 0.015)):
        g = overlap_ratio(d)
        r = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).norm(dim=1)
        inside = ((r > g * (d**0.5 - 3 / 2**0.5)) & (r < g * (d**0.5 + 3 / 2**0.5))).double().mean()
        assert abs(float(inside) - 0.5) < tol, (d, float(inside))
    # Song & Ermon (2020), Table: CIFAR-10 (D 3072, sigma 50 -> 0.01, L 232), CelebA 64 (12288, 90, 500):
    # the paper's ladders overlap by 0.567, and the rule at 0.5 asks for 5% fewer levels (220, 473).
    import math

    for dim, smax, levels in ((3072, 50.0, 232), (12288, 90.0, 500)):
        assert 0.5 < level_overlap((smax / 0.01) ** (1 / (levels - 1)), dim) < 0.6
        ours = math.ceil(math.log(smax / 0.01) / math.log(overlap_ratio(dim))) + 1
        assert 0.9 * levels < ours <= levels, ours
    assert math.isinf(overlap_ratio(2))  # in D <= 4 no ratio is too large by this rule


def test_data_ladder_closed_form_on_data_with_a_known_largest_distance():
    import math

    from ppgen.score import data_noise_ladder, overlap_ratio

    x = torch.cat([torch.zeros(1, 64), torch.full((1, 64), 0.5), 0.5 * torch.rand(100, 64, generator=torch.Generator().manual_seed(1))])
    ladder = data_noise_ladder(x, sigma_min=0.01)  # sigma_max = 0.5 * 8 = 4
    g = overlap_ratio(64)
    want = math.ceil(math.log(4 / 0.01) / math.log(g)) + 1
    assert ladder.sigma_max == pytest.approx(4.0, abs=1e-12) and ladder.n_sigmas == want == 21
    assert ladder.gamma == pytest.approx(400 ** (1 / 20)) and ladder.gamma <= g < 400 ** (1 / 19)
    assert ladder.overlap >= 0.5
    assert data_noise_ladder(x[:, :2], 0.01).n_sigmas == 20  # D = 2: the rule sets no bound
    given = data_noise_ladder(x, 0.01, sigma_max=2.0, n_sigmas=5)
    assert given[:2] == (2.0, 5) and given.gamma == pytest.approx(200**0.25)
    assert data_noise_ladder(x, 0.5, sigma_max=0.5)[1:3] == (1, 1.0)  # single-level DSM stays possible
    with pytest.raises(ValueError, match="the largest distance between two training points"):
        data_noise_ladder(x, sigma_min=5.0)


def test_technique_4_step_size_reproduces_the_paper_and_the_variance_it_promises():
    from ppgen.score import langevin_step_size, langevin_variance_ratio

    # Song & Ermon (2020): CIFAR-10 gamma 1.0376 (L 232), T 5 -> eps 6.2e-6; CelebA 64 (L 500) -> 3.3e-6
    assert langevin_step_size(0.01, (50 / 0.01) ** (1 / 231), 5) == pytest.approx(6.2e-6, rel=0.01)
    assert langevin_step_size(0.01, (90 / 0.01) ** (1 / 499), 5) == pytest.approx(3.3e-6, rel=0.02)
    # the rule's promise, by simulation: a chain started at N(0, gamma^2 s^2) and run T steps of
    # size a s^2 on the exact score of N(0, s^2) has variance ratio f(a)
    gamma, steps, s = 1.36, 5, 0.3
    eps = langevin_step_size(s, gamma, steps)
    a = eps / s**2
    target = GaussianMixture([1.0], [[0.0, 0.0]], 1e-4)
    g = torch.Generator().manual_seed(0)
    x0 = gamma * s * torch.randn(100_000, 2, generator=g)
    x = annealed_langevin(target.score, x0, [s], eps, steps, generator=g).x
    f = langevin_variance_ratio(a, gamma, steps)
    assert float(x.var(0).mean()) / s**2 == pytest.approx(f, rel=0.02)
    assert f < langevin_variance_ratio(0.5 * a, gamma, steps) and f < langevin_variance_ratio(2 * a, gamma, steps)
    with pytest.raises(ValueError, match="gamma"):
        langevin_step_size(0.01, 1.0, 5)


def test_final_denoising_step_is_the_posterior_mean_of_a_gaussian():
    from ppgen.score import denoise_step

    # x0 ~ N(0, s^2 I), x = x0 + sigma z: E[x0 | x] = x s^2 / (s^2 + sigma^2) (Tweedie, exactly)
    s, sigma = 0.7, 0.4
    gauss = GaussianMixture([1.0], [[0.0, 0.0, 0.0]], s)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(denoise_step(gauss.score, x, sigma), x * s**2 / (s**2 + sigma**2), atol=1e-6)
    # annealed Langevin's denoise=True is that step after the last level
    sigmas = torch.tensor([1.0, 0.4])
    plain = annealed_langevin(gauss.score, x, sigmas, 0.01, 3, generator=torch.Generator().manual_seed(1)).x
    done = annealed_langevin(gauss.score, x, sigmas, 0.01, 3, denoise=True, generator=torch.Generator().manual_seed(1)).x
    assert torch.allclose(done, plain * s**2 / (s**2 + sigma**2), atol=1e-6)


class _ExactScore(torch.nn.Module):
    """A mixture's exact noised score with the calling convention of a noise-conditional score net."""

    def __init__(self, gm):
        super().__init__()
        self.gm, self.dummy = gm, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma):
        return self.gm.score(x, sigma)


def test_data_ladder_sampler_recovers_the_weights_of_a_2d_mixture():
    # the whole default sampling path of a dsm run (ladder from the data, technique-4 step, Gaussian
    # start at sigma_max, final denoising) on exact scores, so only the sampler is judged
    from ppgen.score import ScoreConfig, resolve_ladder, sample_score

    gm = GaussianMixture([0.2, 0.5, 0.3], [[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], 0.5)
    data = gm.sample(2000, torch.Generator().manual_seed(0))  # <= ladder_subsample: the exact maximum
    config, ladder = resolve_ladder(ScoreConfig(sigma_min=0.05, langevin_steps=20), data)
    assert config.sigma_max == pytest.approx(float(torch.cdist(data, data).max()), rel=1e-6) and config.n_sigmas == 20
    lo, hi, mean = data.min(0).values, data.max(0).values, data.mean(0)
    x = torch.cat([sample_score(_ExactScore(gm), config, 2000, lo, hi, seed=s, mean=mean).x for s in range(3)])
    w = gm.mode_weights(x)
    # measured (seeds 0-2 together): 0.215, 0.474, 0.310; 10 levels gave 0.233, 0.463, 0.305
    assert torch.allclose(w, gm.weights, atol=0.035), w
    near = (x[:, None] - gm.means).pow(2).sum(-1).min(1).values  # squared distance to the nearest mean
    assert float(near.mean()) < 2 * 0.5**2 * 1.3, float(near.mean())  # exact draws: 2 std^2 = 0.5; measured 0.594


def test_ema_in_the_loop_is_the_closed_form_average(tmp_path, monkeypatch):
    import ppgen.score.loop as loop
    from ppgen.score import train_score

    seen = []

    def recording_adam(params, lr):
        opt = torch.optim.Adam(params, lr)
        seen.append([p.detach().clone() for p in params])  # w_0
        step = opt.step

        def stepped(*a, **k):
            out = step(*a, **k)
            seen.append([p.detach().clone() for p in params])
            return out

        opt.step = stepped
        return opt

    monkeypatch.setattr(loop, "adam", recording_adam)
    for warmup in (False, True):
        seen.clear()
        d = 0.9
        done = train_score(_toy_config(epochs=1, toy_n=500, batch_size=100, ema_decay=d, ema_warmup=warmup),
                           tmp_path / f"w{warmup}", progress=False, figures=False)
        n = len(seen) - 1
        assert n == 5
        decays = [min(d, (1 + t) / (10 + t)) if warmup else d for t in range(n)]
        for k, got in enumerate(done.sampler.parameters()):
            # a_n = prod_t d_t w_0 + sum_i (1 - d_{i-1}) prod_{t >= i} d_t w_i (d constant: (1-d) d^(n-i))
            want = torch.tensor(decays).prod() * seen[0][k]
            for i in range(1, n + 1):
                want = want + (1 - decays[i - 1]) * torch.tensor(decays[i:]).prod() * seen[i][k]
            assert torch.allclose(got, want, atol=1e-6), (warmup, k)
        ckpt = loop.Run(tmp_path / f"w{warmup}", resume=True).load_checkpoint()
        assert ckpt["ema"]["num_updates"] == 5 and "val_loss_ema" in done.history[-1]


def test_score_config_refuses_what_it_cannot_do():
    from ppgen.score import ScoreConfig

    with pytest.raises(ValueError, match="init 'gaussian' starts at the top noise level"):
        ScoreConfig(objective="ssm", init="gaussian")
    with pytest.raises(ValueError, match="technique 4, which needs n_sigmas >= 2"):
        ScoreConfig(n_sigmas=1)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        ScoreConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="resolve_ladder"):
        ScoreConfig().sigmas
    assert ScoreConfig(objective="ssm").steps == 100 and ScoreConfig().steps == 5
    assert ScoreConfig(n_sigmas=1, eta=0.1, sigma_max=1.0).step_size() == pytest.approx(0.1 * 0.01**2)


# --------------------------------------------------------------------------- EDM preconditioning


def _zero_output(net):
    out = net.out if isinstance(net.out, torch.nn.Module) else None
    with torch.no_grad():
        out.weight.zero_(), out.bias.zero_()
    return net


@pytest.mark.parametrize("make", [lambda sd, mu: ScoreNet(64, (32, 32), True, sd, mu),
                                  lambda sd, mu: UNetScore((1, 8, 8), 8, sd, mu)], ids=["mlp", "unet"])
def test_preconditioned_net_with_zero_output_is_the_noised_gaussian_score(make):
    # F = 0: D = mu + c_skip (x - mu) is E[x0 | x] for x0 ~ N(mu, sd^2 I), x = x0 + sigma z, and
    # (D - x) / sigma^2 = -(x - mu) / (sigma^2 + sd^2) = grad log N(x; mu, (sigma^2 + sd^2) I)
    sd, mu = 0.4, 0.3
    gauss = GaussianMixture([1.0], [[mu] * 64], sd)  # the independent reference: its exact noised score
    net = _zero_output(make(sd, mu))
    x = torch.randn(6, 64) * 3
    for sigma in (0.01, 0.3, 20.0):
        s = net(x, torch.full((6,), sigma))
        torch.testing.assert_close(s, ref := gauss.score(x, sigma), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s, -(x - mu) / (sigma**2 + sd**2), rtol=1e-5, atol=1e-6)
        # Tweedie: x + sigma^2 s is the posterior mean mu + sd^2 / (sd^2 + sigma^2) (x - mu)
        torch.testing.assert_close(x + sigma**2 * ref, mu + sd**2 / (sd**2 + sigma**2) * (x - mu), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [lambda r: ScoreNet(64, (32, 32), True, 0.4, 0.3, r),
                                  lambda r: UNetScore((1, 8, 8), 8, 0.4, 0.3, r)], ids=["mlp", "unet"])
def test_data_range_clamps_the_denoiser_and_only_there(make):
    # D = x + sigma^2 s is clamped to the data's range [0, 1], where E[x0 | x] lies; inside it the
    # score is the unclamped one, and far outside it the score points back into the box
    torch.manual_seed(0)
    free, boxed = make(None), make((0.0, 1.0))
    boxed.load_state_dict(free.state_dict())
    x = torch.randn(6, 64) * 3
    for sigma in (0.01, 0.3, 20.0):
        sg = torch.full((6,), sigma)
        d_free, d_box = x + sigma**2 * free(x, sg), x + sigma**2 * boxed(x, sg)
        torch.testing.assert_close(d_box, d_free.clamp(0, 1), rtol=1e-4, atol=1e-4 * max(1.0, sigma**2))
        inside = (d_free > 0) & (d_free < 1)
        torch.testing.assert_close(boxed(x, sg)[inside], free(x, sg)[inside])
    far = torch.full((2, 64), 50.0)
    assert (boxed(far, torch.full((2,), 0.5)) < 0).all() and (boxed(-far, torch.full((2,), 0.5)) > 0).all()


def test_edm_target_has_unit_scale_and_dsm_is_edm_loss_times_a_level_weight():
    from ppgen.score.networks import edm_coefficients

    sd, mu, d = 0.5, 0.2, 16
    g = torch.Generator().manual_seed(0)
    x0 = mu + sd * torch.randn(20000, d, generator=g)
    net = ScoreNet(d, (32,), True, sd, mu)
    for sigma in (0.01, 0.5, 20.0):
        s = torch.tensor([sigma])
        c_in, c_skip, c_out, _ = edm_coefficients(s, sd)
        eps = torch.randn(x0.shape, generator=g)
        x = x0 + sigma * eps
        target = (x0 - mu - c_skip * (x - mu)) / c_out  # what F must output for D = E[x0 | x]
        assert abs(float(target.var()) - 1.0) < 0.03, (sigma, float(target.var()))  # exactly 1 for Gaussian data
        assert abs(float(((x - mu) * c_in).var()) - 1.0) < 0.03  # and the input has unit scale
        # DSM's 0.5 ||sigma s + eps||^2 = 0.5 ||D - x0||^2 / sigma^2 = 0.5 sd^2 / (sigma^2 + sd^2) ||F - target||^2
        xb, eb, tb = x[:256], eps[:256], target[:256]
        with torch.no_grad():
            sc = net(xb, s.expand(256))
            f = (sc + (xb - mu) / (sigma**2 + sd**2)) * sigma**2 / c_out
            dsm = ncsn_loss(net, x0[:256], s, torch.zeros(256, dtype=torch.long), eb)
            weighted = ncsn_loss(net, x0[:256], s, torch.zeros(256, dtype=torch.long), eb, sigma_data=sd)
        edm = (f - tb).pow(2).sum(-1).mean()
        assert float(dsm) == pytest.approx(0.5 * sd**2 / (sigma**2 + sd**2) * float(edm), rel=1e-4)
        assert float(weighted) == pytest.approx(0.5 * float(edm), rel=1e-4)  # the EDM weight: 0.5 ||F - F*||^2


def test_edm_weight_makes_every_levels_irreducible_loss_equal():
    # x0 ~ N(mu, sd^2 I_d): F = 0 is the optimum (zero-output test above), and the loss left there is
    # 0.5 E||sigma s + eps||^2 = 0.5 d sd^2 / (sigma^2 + sd^2) under lambda = sigma^2 (shrinking as 1 / sigma^2
    # above sd), and 0.5 d at every level with the EDM weight (sigma^2 + sd^2) / sd^2
    sd, mu, d, n = 0.35, 0.3, 8, 40000
    g = torch.Generator().manual_seed(1)
    x0 = mu + sd * torch.randn(n, d, generator=g)
    net = _zero_output(ScoreNet(d, (16,), True, sd, mu))
    sigmas = geometric_sigmas(20.0, 0.01, 5)
    for i, sigma in enumerate(sigmas.tolist()):
        levels, eps = torch.full((n,), i), torch.randn(n, d, generator=g)
        with torch.no_grad():
            plain, weighted = (float(ncsn_loss(net, x0, sigmas, levels, eps, w)) for w in (None, sd))
        # Monte Carlo: 0.5 ||.||^2 is 0.5 (sd^2 / v) chi^2_d per point, relative std sqrt(2 / (d n)) = 0.0025
        assert plain == pytest.approx(0.5 * d * sd**2 / (sigma**2 + sd**2), rel=0.015), (sigma, plain)
        assert weighted == pytest.approx(0.5 * d, rel=0.015), (sigma, weighted)
    with pytest.raises(ValueError, match="sigma_data"):
        ncsn_loss(net, x0[:4], sigmas, sigma_data=0.0)


def test_noise_embedding_frequencies():
    from ppgen.score.networks import NoiseEmbedding

    assert NoiseEmbedding(8).freq.max() == pytest.approx(math.pi * 2**5.5)  # the first runs': 142 rad
    five = NoiseEmbedding(8, 5)
    torch.testing.assert_close(five.freq, math.pi * torch.tensor([1, 2**0.5, 2, 2**1.5, 4]))
    assert five.net[0].in_features == 11 and five(torch.zeros(3, 1)).shape == (3, 8)
    assert NoiseEmbedding(8, 0)(torch.zeros(3, 1)).shape == (3, 8)  # c_noise alone
    assert UNetScore((1, 8, 8), 8, 0.4, 0.3, noise_freqs=3).embed.freq.numel() == 3
    with pytest.raises(ValueError, match="n_freq"):
        NoiseEmbedding(8, -1)


@pytest.mark.slow
def test_preconditioned_ncsn_learns_the_score_at_every_level(held_out):
    # the legacy net's test above, same budget (500 steps). Measured relative MSE per level
    # (sigma 2.0, 0.93, 0.43, 0.2), seeds 0-2: preconditioned 0.001-0.002, 0.007-0.009, 0.033-0.036,
    # 0.056-0.063 (mean 0.023-0.026); legacy 0.005-0.007, 0.013-0.015, 0.036-0.050, 0.081-0.110 (mean 0.035-0.043)
    sigmas = geometric_sigmas(2.0, 0.2, 4)
    data = GM.sample(20000, torch.Generator().manual_seed(5))
    sd, mu = float(data.std()), float(data.mean())
    torch.manual_seed(0)
    net = _fit(lambda n, x: ncsn_loss(n, x, sigmas), ScoreNet(2, (64, 64), True, sd, mu), steps=500)
    rels = []
    with torch.no_grad():
        for s in sigmas.tolist():
            x = GM.sample(1000, torch.Generator().manual_seed(7), sigma=s)
            ref = GM.score(x, s)
            rels.append(_mse(net(x, torch.full((1000,), s)), ref) / float(ref.pow(2).sum(-1).mean()))
    assert max(rels) < 0.1 and sum(rels) / 4 < 0.033, rels


def test_preconditioning_is_resolved_stored_and_old_runs_still_load(tmp_path):
    import json

    from ppgen.score import ScoreConfig, load_score, train_score
    from ppgen.score.ladder import data_moments

    done = train_score(_toy_config(epochs=1), tmp_path / "new", progress=False, figures=False)
    mean, std = data_moments(done.train)
    assert done.config.sigma_data == pytest.approx(std) and done.config.data_mean == pytest.approx(mean)
    assert float(done.train.double().std(unbiased=False)) == pytest.approx(std, rel=1e-9)
    ladder = json.loads((tmp_path / "new" / "ladder.json").read_text())
    assert ladder["sigma_data"] == pytest.approx(std)
    net, config, _ = load_score(tmp_path / "new", averaged=False)
    x, s = torch.randn(5, 2), torch.full((5,), 0.3)
    assert net.sigma_data == pytest.approx(std) and torch.allclose(net(x, s), done.net(x, s), atol=1e-6)
    # a run from before preconditioning: config.json without the new fields loads as the legacy net
    old = train_score(_toy_config(epochs=1, precondition=False), tmp_path / "old", progress=False, figures=False)
    path = tmp_path / "old" / "config.json"
    stored = json.loads(path.read_text())
    for k in ("precondition", "sigma_data", "data_mean", "data_range", "loss_weight", "noise_freqs"):
        del stored[k]
    path.write_text(json.dumps(stored))
    net, config, _ = load_score(tmp_path / "old", averaged=False)
    assert not config.precondition and net.sigma_data is None
    assert torch.allclose(net(x, s), old.net(x, s), atol=1e-6)
    with pytest.raises(ValueError, match="without preconditioning"):
        train_score(_toy_config(epochs=2), tmp_path / "old", resume=True, progress=False, figures=False)
    resumed = train_score(_toy_config(epochs=2, precondition=False), tmp_path / "old", resume=True, progress=False,
                          figures=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert done.config.data_range is None  # a 2-D toy is not bounded: no clamp
    from ppgen.score import load_data, resolve_ladder

    digits = ScoreConfig(data="digits")
    train = load_data(digits, download=False)[0]
    assert resolve_ladder(digits, train)[0].data_range == (float(train.min()), float(train.max())) == (0.0, 1.0)
    with pytest.raises(ValueError, match="sigma_data/data_mean/data_range set the preconditioning"):
        ScoreConfig(objective="ssm", sigma_data=0.5)
    with pytest.raises(ValueError, match="data_range must be"):
        ScoreConfig(data_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="sigma_data must be a positive"):
        ScoreNet(2, conditional=True, sigma_data=0.0)
    with pytest.raises(ValueError, match="resolve_ladder"):  # a preconditioned net needs the data's moments
        ScoreConfig(sigma_max=1.0, n_sigmas=4).build()


def test_loss_weight_and_noise_freqs_are_resolved_stored_and_kept_on_resume(tmp_path):
    import json

    from ppgen.score import ScoreConfig, load_score, train_score

    new = train_score(_toy_config(epochs=1, noise_freqs=4), tmp_path / "new", progress=False, figures=False)
    assert new.config.loss_weight == "edm" and new.net.embed.freq.numel() == 4
    assert json.loads((tmp_path / "new" / "config.json").read_text())["loss_weight"] == "edm"
    assert train_score(_toy_config(epochs=1, precondition=False), tmp_path / "plain", progress=False,
                       figures=False).config.loss_weight == "sigma2"
    # a preconditioned run from before loss_weight/noise_freqs: lambda = sigma^2 and 12 frequencies, kept on resume
    old = train_score(_toy_config(epochs=1, loss_weight="sigma2"), tmp_path / "old", progress=False, figures=False)
    path = tmp_path / "old" / "config.json"
    stored = json.loads(path.read_text())
    del stored["loss_weight"], stored["noise_freqs"]
    path.write_text(json.dumps(stored))
    net, config, _ = load_score(tmp_path / "old", averaged=False)
    assert config.loss_weight == "sigma2" and config.noise_freqs == 12 and net.embed.freq.numel() == 12
    x, s = torch.randn(5, 2), torch.full((5,), 0.3)
    assert torch.allclose(net(x, s), old.net(x, s), atol=1e-6)
    resumed = train_score(_toy_config(epochs=2), tmp_path / "old", resume=True, progress=False, figures=False)
    assert resumed.config.loss_weight == "sigma2" and [r["epoch"] for r in resumed.history] == [1, 2]
    with pytest.raises(ValueError, match="loss_weight"):  # an explicit other weighting is a different run
        train_score(_toy_config(epochs=3, loss_weight="edm"), tmp_path / "old", resume=True, progress=False,
                    figures=False)
    with pytest.raises(ValueError, match="loss_weight 'edm' weights the preconditioned"):
        ScoreConfig(precondition=False, loss_weight="edm")
    with pytest.raises(ValueError, match="objective 'ssm' has none"):
        ScoreConfig(objective="ssm", loss_weight="sigma2")
    with pytest.raises(ValueError, match="loss_weight must be"):
        ScoreConfig(loss_weight="uniform")
    with pytest.raises(ValueError, match="noise_freqs must be"):
        ScoreConfig(noise_freqs=-1)


def test_cli_flags_map_onto_the_score_config(tmp_path):
    import argparse

    from ppgen.cli.train import add_train_score

    parser = argparse.ArgumentParser()
    add_train_score(parser.add_subparsers())
    args = parser.parse_args(["score", "--out", str(tmp_path), "--no-precondition", "--sigma-data", "0.4",
                              "--loss-weight", "sigma2", "--noise-freqs", "5"])
    assert (args.precondition, args.sigma_data, args.loss_weight, args.noise_freqs) == (False, 0.4, "sigma2", 5)
    args = parser.parse_args(["score", "--out", str(tmp_path)])
    assert (args.precondition, args.sigma_data, args.loss_weight) == (True, None, None)
