"""Known-answer tests of ppgen.infer.variance.gradient_stats."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppgen.infer.variance import format_table, gradient_stats, param_groups

B = 8
SEED = 1


def _data(n=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 2 + 1


def nn_model(x):
    """Normal-Normal: z_i ~ N(m, 1), x_i ~ N(z_i, 1), with m a model parameter."""
    m = pyro.param("m", torch.tensor(0.3))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(m, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def nn_guide(x):
    a = pyro.param("a", torch.linspace(-1, 1, x.shape[0]))
    s = pyro.param("s", torch.full((x.shape[0],), 0.6), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(a, s))


def exact_nn_grad(x):
    """Gradient of -ELBO w.r.t. (m, a, log s), from
    ELBO_i = -(x_i-a_i)^2/2 - (a_i-m)^2/2 - s_i^2 + log s_i + const."""
    m, a, s = pyro.param("m").detach(), pyro.param("a").detach(), pyro.param("s").detach()
    return {"m": -(a - m).sum(), "a": -((x - a) - (a - m)), "s": -(1 - 2 * s**2)}


SCORE_LIKE = ["score", "score-naive", "score-baseline", "score-nn-baseline"]


@pytest.fixture(scope="module")
def conjugate_stats():
    pyro.clear_param_store()
    x = _data()
    nn_guide(x), nn_model(x)  # register the parameters
    exact = exact_nn_grad(x)
    stats = gradient_stats(
        nn_model, nn_guide, x, ["reparam", "analytic-kl", "stl", *SCORE_LIKE],
        num_draws=250, reference=exact, warmup=100, seed=SEED,
    )
    return stats, exact


def test_every_estimator_is_unbiased_on_the_conjugate_model(conjugate_stats):
    stats, exact = conjugate_stats
    for est in stats.mean:
        row = stats.row(est)
        assert row["max_z"] < 4.0, (est, row)
        # the exact reference has no error of its own
        assert all(float(v.abs().max()) == 0 for v in stats.reference_se.values())


def test_reparam_beats_score_and_baselines_help(conjugate_stats):
    stats, _ = conjugate_stats
    var = {e: stats.row(e)["variance"] for e in stats.mean}
    assert var["reparam"] < var["score"]
    assert var["score"] / var["score-baseline"] > 1.5
    assert var["score"] / var["score-nn-baseline"] > 1.5
    # Rao-Blackwellization over the plate: naive REINFORCE weights each z_i by the whole batch
    assert var["score-naive"] / var["score"] > 5
    assert var["stl"] < var["reparam"]  # near the posterior, STL's dropped term is mostly noise


def _bias2_se(stats, label, keys=None):
    """Standard error of the debiased squared bias of an unbiased estimator against an exact
    reference: each element's (m_i - g*_i)^2 - v_i/R has variance about 2 (v_i/R)^2."""
    keys = keys or list(stats.var[label])
    return math.sqrt(sum(float((2 * (stats.var[label][k] / stats.num_draws) ** 2).sum()) for k in keys))


def test_every_unbiased_estimator_has_debiased_bias2_near_zero_against_the_exact_gradient(conjugate_stats):
    """Every estimator here is unbiased for the exact gradient: the debiased squared bias sits at 0
    within its noise, while the plug-in sum (m - g*)^2 carries tr Cov / R of noise."""
    stats, _ = conjugate_stats
    for e in stats.mean:
        r = stats.row(e)
        assert abs(r["bias2"]) < 4 * _bias2_se(stats, e), (e, r)
        assert r["bias2_plugin"] == pytest.approx(r["bias2"] + r["variance"] / stats.num_draws, rel=1e-9)


def test_corrected_snr_of_one_element_is_its_exact_snr(conjugate_stats):
    """Group "m" is one element: under reparam g_m = -sum_i (z_i - m), z_i ~ N(a_i, s_i^2), so
    E g_m = -sum(a - m) and sd = sqrt(sum s^2): SNR 2.4 / sqrt(2.88) = 1.414."""
    stats, _ = conjugate_stats
    exact = 2.4 / math.sqrt(2.88)
    r = stats.row("reparam", "m")
    se = math.sqrt((1 + exact**2 / 2) / stats.num_draws)  # delta method for |t| / sqrt(R)
    assert abs(r["snr_corrected"] - exact) < 4 * se


def test_groups_partition_the_total_variance(conjugate_stats):
    stats, _ = conjugate_stats
    for e in stats.mean:
        groups = [r for r in stats.rows if r["estimator"] == e and r["level"] == "group"]
        assert {r["name"] for r in groups} == {"m", "a", "s"}
        assert sum(r["variance"] for r in groups) == pytest.approx(stats.row(e)["variance"], rel=1e-9)
    lines = format_table(stats, relative_to="reparam")
    assert len(lines) == 2 + len(stats.mean) * 4  # header, rule, ("all" + 3 groups) per estimator


def test_sticking_the_landing_has_zero_variance_at_the_exact_posterior():
    """Roeder et al. 2017: with q = p(z | x) the STL guide gradient is exactly 0 for every draw."""
    pyro.clear_param_store()
    x = _data()
    nn_guide(x), nn_model(x)
    store = pyro.get_param_store()
    store["a"] = (x + pyro.param("m").detach()) / 2  # posterior N((x + m)/2, 1/2)
    store["s"] = torch.full((B,), 0.5**0.5)
    exact = exact_nn_grad(x)
    stats = gradient_stats(nn_model, nn_guide, x, ["reparam", "stl"], num_draws=50, reference=exact, warmup=0)
    for group in ("a", "s"):
        assert stats.row("stl", group)["variance"] < 1e-10
        assert stats.row("reparam", group)["variance"] > 1.0
    # the model parameter's gradient is untouched by STL
    assert stats.row("stl", "m")["variance"] == pytest.approx(stats.row("reparam", "m")["variance"])


def _at_posterior(b, seed=0):
    """The Normal-Normal pair at its optimum: q = p(z | x) and m = mean(x), where the gradient of
    the negative ELBO is exactly 0 but one reparameterized draw of it is not."""
    pyro.clear_param_store()
    x = _data(b, seed)
    nn_guide(x), nn_model(x)
    store = pyro.get_param_store()
    store["m"] = x.mean()
    store["a"] = (x + x.mean()) / 2
    store["s"] = torch.full((b,), 0.5**0.5)
    return x


def test_debiased_bias2_does_not_fall_with_draws_where_the_plugin_does():
    """An unbiased estimator against the exact gradient, at R = 50 and 200 draws: the plug-in
    bias^2 is about tr Cov / R (falls 4x), the debiased one is 0 within its standard error. Group
    "a" under reparam: g_a is linear in the Gaussian noise, so the Gaussian SE formula holds
    (score gradients are heavy-tailed: there the debiased value is unbiased but right-skewed)."""
    pyro.clear_param_store()
    x = _data(64, seed=6)
    nn_guide(x), nn_model(x)
    exact = exact_nn_grad(x)
    plugin = {}
    for r in (50, 200):
        stats = gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=r, reference=exact, warmup=0, seed=r)
        row = stats.row("reparam", "a")
        plugin[r] = row["bias2_plugin"]
        assert abs(row["bias2"]) < 4 * _bias2_se(stats, "reparam", ["a"]), row
        assert row["bias2_plugin"] > 4 * _bias2_se(stats, "reparam", ["a"])  # the plug-in is mostly noise
    assert 2.5 < plugin[50] / plugin[200] < 6


def test_debiased_bias2_takes_out_the_estimated_reference_error_too():
    """reparam against a reparam reference from independent draws: both carry noise, the debiased
    bias^2 subtracts both (v/R and se_ref^2) and sits at 0."""
    pyro.clear_param_store()
    x = _data(64, seed=7)
    stats = gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=100, reference_draws=100, warmup=0, seed=2)
    row = stats.row("reparam")
    noise = [(stats.var["reparam"][k] / 100 + stats.reference_se[k] ** 2) for k in stats.var["reparam"]]
    se = math.sqrt(sum(float((2 * n**2).sum()) for n in noise))
    noise_total = sum(float(n.sum()) for n in noise)
    assert abs(row["bias2"]) < 4 * se
    assert row["bias2_plugin"] > noise_total - 4 * se and row["bias2_plugin"] > 5 * se


def test_corrected_snr_is_zero_for_a_zero_mean_gradient_where_the_plain_one_reads_the_floor():
    """At the optimum every element's gradient has mean 0: the plain SNR reads the noise floor
    E|N(0,1)| / sqrt(R) = sqrt(2 / (pi R)), the corrected one ~0 (its noise, about
    (4/n)^(1/4) sqrt|N(0,1)| / sqrt(R) with n = 8001 elements, is about a quarter of the floor). The
    scale elements' draws eps^2 - 1 are skewed, which a correction assuming Gaussian draws
    misses (it read 0.48 of the floor here)."""
    x = _at_posterior(4000, seed=8)
    r = 100
    stats = gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=r, reference={
        "m": torch.tensor(0.0), "a": torch.zeros(4000), "s": torch.zeros(4000)}, warmup=0, seed=3)
    row = stats.row("reparam")
    floor = math.sqrt(2 / (math.pi * r))
    assert row["snr"] == pytest.approx(floor, rel=0.1)
    assert abs(row["snr_corrected"]) < 0.5 * floor
    assert stats.row("reparam", "s")["variance"] > 100  # not zero-variance: noise, not absence of it


def test_baselines_are_per_estimator_and_not_left_in_the_store():
    """score-baseline and score-nn-baseline both keep a decaying average in Pyro's param store;
    each must start from the caller's store, so measuring one after the other gives the same
    numbers as measuring it alone, and the store ends as it began."""
    pyro.clear_param_store()
    x = _data(5, seed=4)
    cat_guide(x), cat_model(x)
    store = pyro.get_param_store()
    names = set(store.keys())
    alone = gradient_stats(cat_model, cat_guide, x, ["score-baseline"], num_draws=20, reference_draws=5,
                           warmup=10, seed=5)
    assert set(store.keys()) == names
    after = gradient_stats(cat_model, cat_guide, x, ["score-nn-baseline", "score-baseline"], num_draws=20,
                           reference_draws=5, warmup=10, seed=5)
    assert set(store.keys()) == names
    for k in alone.mean["score-baseline"]:
        torch.testing.assert_close(after.mean["score-baseline"][k], alone.mean["score-baseline"][k], rtol=0, atol=0)
    # a baseline the caller's store already holds (e.g. from training) is the starting point, and stays
    store["__baseline_avg_downstream_cost_z"] = torch.full((5,), 3.0)
    gradient_stats(cat_model, cat_guide, x, ["score-baseline"], num_draws=5, reference_draws=5, warmup=5)
    assert torch.equal(store["__baseline_avg_downstream_cost_z"], torch.full((5,), 3.0))


def test_particles_reach_the_estimator_iwae_is_not_the_elbo():
    """At the optimum the pathwise part of every gradient vanishes and each particle contributes
    an independent zero-mean score term: K particles divide the variance by K, for iwae as for
    reparam. Away from it, iwae's K > 1 gradient is of another bound than the ELBO: its debiased
    bias^2 against the exact ELBO gradient is far from 0, reparam's is not."""
    x = _at_posterior(8, seed=9)
    stats = gradient_stats(nn_model, nn_guide, x, ["reparam", "iwae"], num_draws=200, reference_draws=10,
                           warmup=0, seed=1, particles=[1, 4])
    assert stats.particles == (1, 4)
    assert {(r["estimator"], r["particles"]) for r in stats.rows} == {(e, k) for e in ("reparam", "iwae") for k in (1, 4)}
    for e in ("reparam", "iwae"):
        ratio = stats.row(e, particles=1)["variance"] / stats.row(e, particles=4)["variance"]
        assert 4 * 0.75 < ratio < 4 / 0.75, (e, ratio)
    with pytest.raises(ValueError, match="particles"):
        stats.row("iwae")
    assert stats.row("iwae K=4") is stats.row("iwae", particles=4)

    pyro.clear_param_store()
    x = _data()
    nn_guide(x), nn_model(x)
    exact = exact_nn_grad(x)
    stats = gradient_stats(nn_model, nn_guide, x, ["reparam", "iwae"], num_draws=200, reference=exact,
                           warmup=0, seed=1, particles=4)
    assert abs(stats.row("reparam")["bias2"]) < 4 * _bias2_se(stats, "reparam")
    assert stats.row("iwae")["bias2"] > 10 * _bias2_se(stats, "iwae")


def test_bad_particles_are_named():
    pyro.clear_param_store()
    x = _data()
    for bad in (0, [], [2, 0], [3, 3], True):
        with pytest.raises(ValueError, match="particles"):
            gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=3, reference_draws=3, particles=bad)
    with pytest.raises(TypeError, match="particles"):
        gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=3, reference_draws=3, particles="4")


def chain_model(x):
    """z1 ~ N(0,1), z2 ~ N(z1,1), x ~ N(z2,1), per datapoint."""
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("x", dist.Normal(z2, 1.0), obs=x)


def chain_guide(x):
    a1 = pyro.param("a1", torch.ones(x.shape[0]))
    a2 = pyro.param("a2", torch.zeros(x.shape[0]))
    with pyro.plate("data", x.shape[0]):
        z1 = pyro.sample("z1", dist.Normal(a1, 0.5))
        pyro.sample("z2", dist.Normal(z1 + a2, 0.7))


@pytest.mark.parametrize("n", [1, 4])
def test_rao_blackwellization_beats_naive_reinforce(n):
    pyro.clear_param_store()
    x = _data(n, seed=2)
    stats = gradient_stats(chain_model, chain_guide, x, ["score", "score-naive"], num_draws=200,
                           reference_draws=200, warmup=0, seed=3)
    # z1's cost is the whole chain either way; z2's downstream cost drops log p(z1) - log q(z1)
    ratio = stats.row("score-naive", "a2")["variance"] / stats.row("score", "a2")["variance"]
    assert ratio > 1.2
    assert stats.row("score-naive")["variance"] > stats.row("score")["variance"]
    for e in ("score", "score-naive"):
        assert stats.row(e)["max_z"] < 4.0


K = 3


def cat_model(x):
    mu = pyro.param("mu", torch.tensor([-2.0, 0.0, 2.5]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def cat_guide(x):
    logits = pyro.param("logits", torch.linspace(-1, 1, x.shape[0] * K).reshape(x.shape[0], K))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Categorical(logits=logits))


def exact_cat_grad(x):
    mu = pyro.param("mu").detach().requires_grad_()
    logits = pyro.param("logits").detach().requires_grad_()
    logq = torch.log_softmax(logits, -1)
    logp = torch.log(torch.tensor([0.2, 0.5, 0.3])) + dist.Normal(mu, 1.0).log_prob(x[:, None])
    loss = -(logq.exp() * (logp - logq)).sum()
    gm, gl = torch.autograd.grad(loss, [mu, logits])
    return {"mu": gm, "logits": gl}


def test_enumeration_is_exact_with_zero_variance():
    pyro.clear_param_store()
    x = _data(5, seed=4)
    cat_guide(x), cat_model(x)
    exact = exact_cat_grad(x)
    stats = gradient_stats(cat_model, cat_guide, x, ["enum"], num_draws=10, reference=exact, seed=5)
    score = gradient_stats(cat_model, cat_guide, x, ["score", "score-baseline"], num_draws=120,
                           reference=exact, warmup=30, seed=5)
    for name, g in exact.items():
        assert float(stats.var["enum"][name].abs().max()) == 0.0
        torch.testing.assert_close(stats.mean["enum"][name], g.double(), atol=1e-5, rtol=1e-5)
    assert stats.row("enum")["variance"] == 0.0
    assert stats.row("enum")["mse"] < 1e-9
    assert score.row("score")["max_z"] < 4.0 and score.row("score-baseline")["max_z"] < 4.0
    assert score.row("score")["variance"] > 0.0


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def test_user_written_amortized_pair_with_estimated_reference():
    """A pair written here, with a pyro.module encoder: groups, layers and the reparam reference."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    enc = TinyEncoder()
    w = torch.tensor([0.5, -1.0])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("y", dist.Normal((z * w).sum(-1), 1.0), obs=x[:, 0])

    def guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("data", x.shape[0]):
            out = enc(x)
            pyro.sample("z", dist.Normal(out, 0.8).to_event(1))

    x = torch.randn(6, 3)
    stats = gradient_stats(model, guide, x, ["reparam", "score"], num_draws=200, reference_draws=800, seed=0)
    assert param_groups("encoder$$$hidden.weight") == ("encoder", "encoder.hidden")
    layers = {r["name"] for r in stats.rows if r["level"] == "layer"}
    assert layers == {"encoder.hidden", "encoder.out"}
    # the reference is itself a reparam average: reparam's mean sits within its SE of it
    assert stats.row("reparam")["max_z"] < 4.0 and stats.row("score")["max_z"] < 4.0
    assert all(float(v.max()) > 0 for v in stats.reference_se.values())
    assert stats.row("score", "encoder")["snr"] < stats.row("reparam", "encoder")["snr"]


def test_bad_arguments_are_named():
    pyro.clear_param_store()
    x = _data()
    with pytest.raises(ValueError, match="unknown estimator"):
        gradient_stats(nn_model, nn_guide, x, ["nope"])
    with pytest.raises(ValueError, match="num_draws"):
        gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=1)
    with pytest.raises(ValueError, match="reference lacks"):
        gradient_stats(nn_model, nn_guide, x, ["reparam"], num_draws=5, reference={"m": torch.tensor(0.0)})
    assert math.isfinite(gradient_stats(nn_model, nn_guide, x, "reparam", num_draws=3, reference_draws=3,
                                        warmup=0).row("reparam")["variance"])


def test_equal_time_budget_is_the_shortest_run():
    from ppgen.infer.variance_runs import elbo_at_equal_time

    hist = {
        "fast": [{"wall": 1.0, "val_elbo": -9.0}, {"wall": 2.0, "val_elbo": -8.0}, {"wall": 3.0, "val_elbo": -7.0}],
        "slow": [{"wall": 2.5, "val_elbo": -8.5}],
    }
    budget, at = elbo_at_equal_time(hist)
    assert budget == 2.5 and at == {"fast": -8.0, "slow": -8.5}


@pytest.fixture(scope="module")
def iaf_gaussian_run(tmp_path_factory):
    """A VAE trained one epoch with an IAF posterior and a learned per-pixel Gaussian scale: its
    checkpoint holds posterior$$$ and likelihood$$$ parameters besides encoder and decoder."""
    from ppgen.cli import main

    out = tmp_path_factory.mktemp("variance") / "run"
    assert main(["train", "vae", "--data", "digits", "--binarize", "none", "--likelihood", "gaussian",
                 "--posterior", "iaf", "--flows", "1", "--epochs", "1", "--latent-dim", "3", "--hidden", "16",
                 "--lr", "0.01", "--out", str(out), "--no-progress"]) == 0
    return out


def test_measure_run_loads_every_trained_parameter(iaf_gaussian_run):
    """measure_run must measure the trained model: every parameter the pair registers (IAF flow,
    learned likelihood scale) equals the checkpoint's, and the gradient equals the one measured on
    the model ppgen.train.load_vae rebuilds (the old loader left posterior/likelihood at init)."""
    from ppgen.infer.variance_runs import measure_run
    from ppgen.runs import Run, load_checkpoint
    from ppgen.train import load_vae

    ckpt = load_checkpoint(Run(iaf_gaussian_run, resume=True).checkpoint_path)["params"]
    owners = {k.split("$$$")[0] for k in ckpt}
    assert {"posterior", "likelihood"} <= owners
    [(point, stats)] = measure_run(iaf_gaussian_run, ["reparam"], "last", num_draws=10, batch_size=16,
                                   reference_draws=2, warmup=0, seed=4)
    assert point.epoch == 1
    store = pyro.get_param_store()
    for name in ("posterior", "likelihood"):
        loaded = [k for k in store.keys() if k.startswith(name + "$$$")]
        assert loaded
        for k in loaded:
            assert torch.equal(store._params[k].detach(), ckpt[k]), k
    [(_, fresh)] = measure_run(iaf_gaussian_run, ["reparam"], "init", num_draws=10, batch_size=16,
                               reference_draws=2, warmup=0, seed=4)
    trained_away = [k for k in ckpt if k.startswith(("posterior", "likelihood"))
                    and not torch.equal(store._params[k].detach(), ckpt[k])]
    assert trained_away  # training moved them, so loading them matters

    vae, config, _ = load_vae(iaf_gaussian_run)
    x = config.data.load(False).val[:16]
    again = gradient_stats(vae.model, vae.guide, x, ["reparam"], num_draws=10, reference_draws=2, warmup=0, seed=4)
    for k, g in again.mean["reparam"].items():
        torch.testing.assert_close(stats.mean["reparam"][k], g, rtol=1e-6, atol=1e-9)
    assert any(not torch.allclose(fresh.mean["reparam"][k], g) for k, g in again.mean["reparam"].items())


def test_variance_cli_sweeps_particles(iaf_gaussian_run, capsys):
    """`ppgen variance --particles 1,4`: rows and table carry K and the corrected SNR, and the
    reparam gradient averaged over 4 particles has a quarter of the one-particle variance."""
    import json

    from ppgen.cli import main

    assert main(["variance", str(iaf_gaussian_run), "--estimators", "reparam,iwae", "--particles", "1,4",
                 "--checkpoints", "last", "--draws", "60", "--batch-size", "16", "--reference-draws", "20",
                 "--warmup", "0"]) == 0
    table = (iaf_gaussian_run / "variance" / "table.md").read_text()
    assert "| estimator | K | group |" in table and "SNR*" in table
    rows = [json.loads(line) for line in (iaf_gaussian_run / "variance" / "rows.jsonl").read_text().splitlines()]
    total = {(r["estimator"], r["particles"]): r for r in rows if r["level"] == "all"}
    assert set(total) == {(e, k) for e in ("reparam", "iwae") for k in (1, 4)}
    assert 2.5 < total["reparam", 1]["variance"] / total["reparam", 4]["variance"] < 6
    # iwae with one particle is the ELBO's reparameterized gradient, draw for draw (same seed)
    assert total["iwae", 1]["variance"] == pytest.approx(total["reparam", 1]["variance"], rel=1e-4)
    assert all("snr_corrected" in r and "bias2_plugin" in r for r in rows)
    assert (iaf_gaussian_run / "variance" / "variance.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["variance", str(iaf_gaussian_run), "--particles", "0"])


def test_measure_run_refuses_a_checkpoint_without_a_registered_parameter(iaf_gaussian_run, tmp_path):
    """A checkpoint lacking the learned likelihood scale would be measured half at init: refused."""
    import shutil

    from ppgen.infer.variance_runs import measure_run
    from ppgen.runs import Run, load_checkpoint

    run = tmp_path / "run"
    shutil.copytree(iaf_gaussian_run, run)
    saved = Run(run, resume=True)
    ckpt = load_checkpoint(saved.checkpoint_path)
    dropped = [k for k in ckpt["params"] if k.startswith("likelihood$$$")]
    assert dropped
    for k in dropped:
        del ckpt["params"][k]
    saved.save_checkpoint(ckpt)
    with pytest.raises(ValueError, match="lacks parameters.*likelihood"):
        measure_run(run, ["reparam"], "last", num_draws=3, batch_size=4, reference_draws=2, warmup=0)
