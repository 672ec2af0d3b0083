import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from ppgen.data import binarize, load_dataset
from ppgen.infer.estimators import ESTIMATORS, get_estimator, make_elbo, prepare_guide
from ppgen.infer.svi import DataScale, SVIConfig, evaluate_elbo, train_svi
from ppgen.models.vae import VAE

SIGMA = 0.5


def _ppca_data(n=600):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(n, 1, generator=g)
    return z @ torch.tensor([[2.0, 1.0]]) + torch.tensor([1.0, -1.0]) + SIGMA * torch.randn(n, 2, generator=g)


def _ppca_max_loglik(x):
    """Exact maximum of the mean log-likelihood of probabilistic PCA with noise SIGMA
    (Tipping & Bishop 1999): W = u1 sqrt(lambda1 - sigma^2), b = mean."""
    b = x.mean(0)
    cov = ((x - b).T @ (x - b)) / len(x)
    lam, u = torch.linalg.eigh(cov)
    w = u[:, -1:] * (lam[-1] - SIGMA**2).sqrt()
    c = w @ w.T + SIGMA**2 * torch.eye(2)
    return float(torch.distributions.MultivariateNormal(b, c).log_prob(x).mean())


def test_user_written_pair_trains_to_the_exact_maximum_likelihood():
    # A model/guide pair written here, not imported from ppgen: probabilistic PCA with a linear
    # amortized encoder. Its exact posterior is in the guide family, so the ELBO can reach the
    # exact maximum log-likelihood but never pass it.
    x = _ppca_data()
    encoder = nn.Linear(2, 1)

    def model(x):
        w = pyro.param("w", torch.tensor([[0.1, 0.1]]))
        b = pyro.param("b", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w + b, SIGMA).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        log_scale = pyro.param("log_scale", torch.zeros(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(encoder(x), log_scale.exp()).to_event(1))

    config = SVIConfig(epochs=60, batch_size=50, lr=0.05, seed=1)
    result = train_svi(model, guide, x, x, config, progress=False)
    first, last = result.history[0]["val_elbo"], evaluate_elbo(model, guide, x, num_particles=50)
    best = _ppca_max_loglik(x)
    assert last > first + 0.5
    assert last <= best + 0.01  # ELBO is a lower bound (0.01: Monte Carlo error of the estimate)
    assert last >= best - 0.05  # measured gap 0.02 nats (optimizer noise at the end)


def test_data_scale_makes_minibatch_log_joint_unbiased():
    # Global latent mu, local z_i. With latents fixed, averaging the N/B-scaled log joint over a
    # partition of the data into batches gives the full-data log joint exactly; mu is counted once.
    n, b = 40, 8
    x = torch.randn(n)
    z = torch.randn(n)

    def model(x, z):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            zi = pyro.sample("z", dist.Normal(mu, 1.0), obs=z)
            pyro.sample("x", dist.Normal(zi, 1.0), obs=x)

    fixed = poutine.condition(model, {"mu": torch.tensor(0.3)})
    full = poutine.trace(fixed).get_trace(x, z).log_prob_sum()
    perm = torch.randperm(n)
    scaled = []
    for i in range(0, n, b):
        idx = perm[i : i + b]
        with DataScale(n / b):
            scaled.append(poutine.trace(fixed).get_trace(x[idx], z[idx]).log_prob_sum())
    assert torch.allclose(torch.stack(scaled).mean(), full, atol=1e-4)
    with DataScale(n / b):
        tr = poutine.trace(fixed).get_trace(x[:b], z[:b])
    tr.compute_log_prob()
    assert tr.nodes["mu"]["scale"] == 1.0 and tr.nodes["z"]["scale"] == n / b


def test_data_scale_leaves_self_subsampled_plates_alone():
    def model(x):
        with pyro.plate("data", 100, subsample_size=x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    with DataScale(100 / 10):
        tr = poutine.trace(model).get_trace(torch.zeros(10))
    tr.compute_log_prob()
    assert tr.nodes["x"]["scale"] == 10.0  # Pyro's own N/B, not squared


def test_score_estimators_see_a_non_reparameterized_guide():
    vae = VAE(8, 2, (4,))
    x = torch.bernoulli(torch.full((3, 8), 0.5))
    for name, est in ESTIMATORS.items():
        tr = poutine.trace(prepare_guide(name, vae.guide)).get_trace(x)
        site = tr.nodes["z"]
        assert site["fn"].has_rsample == est.reparameterized
        assert site["value"].requires_grad == est.reparameterized
        if est.baseline:
            assert site["infer"]["baseline"] == est.baseline
    with pytest.raises(ValueError, match="reparam"):
        get_estimator("reinforce++")
    with pytest.raises(ValueError, match="num_particles"):
        make_elbo("reparam", num_particles=0)


def test_reparam_beats_score_function_on_digits():
    data = load_dataset("digits")
    vals = {}
    for name in ("reparam", "score"):
        vae = VAE(data.dim, 10, (256,))
        config = SVIConfig(estimator=name, epochs=25, batch_size=64, seed=0)
        res = train_svi(vae.model, vae.guide, data.train, data.val, config, transform=binarize, progress=False)
        hist = [h["val_elbo"] for h in res.history]
        vals[name] = hist
        assert hist[-1] > hist[0] + 2.0, name  # both estimators learn
    # same steps, same seed: the pathwise gradient ends higher (measured gap about 2.5 nats)
    assert vals["reparam"][-1] > vals["score"][-1] + 1.0


def test_vectorized_particles_and_bad_sizes():
    data = load_dataset("digits")
    vae = VAE(data.dim, 4, (32,))
    for name in ("reparam", "score"):  # score: the particle plate expands a non-reparameterized site
        res = train_svi(vae.model, vae.guide, data.train[:256], data.val,
                        SVIConfig(estimator=name, particles=4, epochs=2, batch_size=64), transform=binarize,
                        progress=False)
        assert res.history[-1]["step"] == 8 and math.isfinite(res.val_elbo)
    with pytest.raises(ValueError, match="larger than the training set"):
        train_svi(vae.model, vae.guide, data.train[:10], None, SVIConfig(batch_size=64), progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_svi(vae.model, vae.guide, data.train[:0], None, SVIConfig(batch_size=64), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        SVIConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        SVIConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="known estimators"):
        SVIConfig(estimator="magic")


def test_non_finite_loss_stops_with_a_message():
    data = load_dataset("digits", "static")
    vae = VAE(data.dim, 4, (32,))
    with torch.no_grad():
        vae.decoder.net[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss.*epoch 1, step 1"):
        train_svi(vae.model, vae.guide, data.train, None, SVIConfig(epochs=1, batch_size=64), progress=False)


def test_step_loss_is_pyros_trace_elbo_loss():
    # Same seed, same model/guide: ppgen's step reports exactly Pyro's Trace_ELBO value, times N/B.
    from pyro.infer import Trace_ELBO

    from ppgen.infer.svi import make_svi_step

    vae = VAE(64, 4, (16,))
    x = torch.bernoulli(torch.full((32, 64), 0.3))
    step, _ = make_svi_step(vae.model, vae.guide, SVIConfig(lr=1e-12), x, scale=10.0)
    pyro.set_rng_seed(5)
    reference = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(5)
    assert step(x) == pytest.approx(10.0 * reference, rel=1e-6)


def _assert_same_state(a, b, where="state"):
    """Nested dicts/lists of tensors and numbers, equal bitwise."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same_state(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_nn_baseline_network_and_its_adam_survive_resume(tmp_path, one_thread):
    """score-nn-baseline keeps its baseline networks outside Pyro's param store, so they travel in
    the checkpoint's "guide" entry (weights and Adam state): 1 epoch + resume 1 epoch ends on the
    same parameters, baseline and Adam moments as 2 epochs straight (measured: bitwise)."""
    from ppgen.runs import Run, load_checkpoint

    data = load_dataset("digits")

    def train(epochs, path, resume=False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = VAE(data.dim, 4, (32,))
        run = Run(path, resume=resume)
        if not resume:
            run.save_config({})
        config = SVIConfig(estimator="score-nn-baseline", particles=2, epochs=epochs, batch_size=32, seed=0)
        res = train_svi(vae.model, vae.guide, data.train[:256], None, config, run=run, transform=binarize,
                        progress=False)
        return res, load_checkpoint(run.checkpoint_path)

    whole, straight = train(2, tmp_path / "whole")
    train(1, tmp_path / "split")
    resumed, split = train(2, tmp_path / "split", resume=True)
    assert set(straight["guide"]) == {"z"}  # one baseline network, for the VAE's one latent site
    assert straight["guide"]["z"]["net"]["2.weight"].abs().max() > 0  # it has learned (zero-initialised)
    _assert_same_state(straight["params"], split["params"], "params")
    _assert_same_state(straight["guide"], split["guide"], "guide")
    assert [h["train_loss"] for h in whole.history] == [h["train_loss"] for h in resumed.history]


def _sqrt_at_zero_pair():
    """A model whose loss is finite but whose gradient is not: ``x ~ Normal(sqrt(a) + b, 1)`` with
    ``a = 0``, where d sqrt(a) / da is infinite. Adam given that gradient writes NaN into ``a``."""

    def model(x):
        a = pyro.param("a", torch.tensor(0.0))
        b = pyro.param("b", torch.tensor(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(torch.sqrt(a) + b, 1.0), obs=x)

    def guide(x):
        pass

    return model, guide


def test_step_with_a_non_finite_gradient_leaves_the_parameters_alone():
    from ppgen.infer.svi import make_svi_step

    model, guide = _sqrt_at_zero_pair()
    x = torch.linspace(-1.0, 2.0, 16)
    step, _ = make_svi_step(model, guide, SVIConfig(lr=0.1), x)
    exact = -float(dist.Normal(0.5, 1.0).log_prob(x).sum())  # the loss at a = 0, b = 0.5 (no latents)
    loss = step(x)
    assert math.isnan(loss) and step.nonfinite == "gradient of 'a'"
    store = pyro.get_param_store()
    assert store["a"].item() == 0.0 and store["b"].item() == 0.5  # untouched (before: a became NaN)
    # The loss itself was finite: the same pair scored without gradients gives the exact value.
    assert exact == pytest.approx(-evaluate_elbo(model, guide, x) * len(x), rel=1e-6)


def test_non_finite_gradient_is_skipped_or_stops_and_never_reaches_validation():
    model, guide = _sqrt_at_zero_pair()
    x = torch.linspace(-1.0, 2.0, 64)
    config = SVIConfig(epochs=2, batch_size=16, lr=0.1, on_nonfinite="skip")
    result = train_svi(model, guide, x, x, config, progress=False)
    # Every step has an infinite gradient for a: all 4 per epoch skipped, parameters as initialised,
    # and validation scores them exactly (before the fix: a = NaN after the first step).
    assert [h["skipped_steps"] for h in result.history] == [4, 4]
    assert result.val_elbo == pytest.approx(float(dist.Normal(0.5, 1.0).log_prob(x).mean()), rel=1e-6)
    with pytest.raises(FloatingPointError, match="non-finite gradient of 'a'.*epoch 1, step 1"):
        train_svi(model, guide, x, x, SVIConfig(epochs=1, batch_size=16, lr=0.1), progress=False)


def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were():
    # A NaN datapoint through a BatchNorm in train mode turns its running statistics NaN in the
    # forward pass; the step that is skipped for it must put them back, as it leaves the weights.
    from ppgen.infer.svi_step import make_svi_step

    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1).expand(-1, 3), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("enc", enc)
        out = enc(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(out[:, 0], out[:, 1].exp()))

    x = torch.randn(8, 3)
    step, _ = make_svi_step(model, guide, SVIConfig(lr=0.01), x)
    bn = enc[1]
    assert int(bn.num_batches_tracked) == 0  # building the step moved nothing
    step(x)
    stats = [b.clone() for b in bn.buffers()]
    weights = [p.detach().clone() for p in step.params]
    bad = x.clone()
    bad[2, 1] = math.nan
    step(bad)
    assert step.nonfinite == "loss"
    assert all(torch.equal(a, b) for a, b in zip(stats, bn.buffers()))
    assert all(torch.equal(a, p) for a, p in zip(weights, step.params))
    step(x)  # and a finite batch moves them again
    assert step.nonfinite is None and int(bn.num_batches_tracked) == 2
    assert not torch.equal(stats[0], bn.running_mean) and bool(bn.running_mean.isfinite().all())


# -- no host sync per step ------------------------------------------------------------------------

_HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")


def _count_host_reads(monkeypatch, during: list) -> dict:
    """Count every Python-level host read of a tensor (``.item()``, ``float()``, ``bool()``,
    ``.tolist()``, ...) while ``during[0]`` is true; returns the live counter."""
    counts = {"reads": 0}
    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if during[0]:
                counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_training_loop_reads_the_device_a_constant_number_of_times_per_epoch(monkeypatch, one_thread, on_nonfinite):
    """The loop reads losses once per epoch, not once per step: with 16 steps per epoch, the
    training part of an epoch does at most 3 host reads (the epoch's records, the parameter check),
    the same for 1 and 3 epochs per step count."""
    import ppgen.infer.svi as svi_mod

    during = [False]
    real_make = svi_mod.make_svi_step

    def counting_make(*args, **kwargs):  # count from the first step on (not the registration pass)
        made = real_make(*args, **kwargs)
        during[0] = True
        return made

    monkeypatch.setattr(svi_mod, "make_svi_step", counting_make)
    data = load_dataset("digits", "static")
    counts = _count_host_reads(monkeypatch, during)
    reads = []
    for epochs in (1, 3):
        during[0], counts["reads"] = False, 0
        vae = VAE(data.dim, 4, (16,))
        config = SVIConfig(epochs=epochs, batch_size=32, on_nonfinite=on_nonfinite)
        result = train_svi(vae.model, vae.guide, data.train[:512], None, config, progress=False)
        during[0] = False
        assert [h["step"] for h in result.history] == [16 * (e + 1) for e in range(epochs)]
        assert all(math.isfinite(h["train_loss"]) for h in result.history)
        reads.append(counts["reads"])
    assert reads[0] <= 3 and reads[1] <= 3 * 3, reads  # per epoch, not per step (16 steps)


def test_stop_halts_later_updates_on_the_device(monkeypatch):
    """Under on_nonfinite="stop" the loop learns of a bad step only at the epoch's end; by then
    the later steps of the epoch must not have updated anything: after the error every
    parameter has had exactly the updates before the bad step (Adam's step count), as when the
    loop stopped at once."""
    import ppgen.infer.svi as svi_mod

    data = load_dataset("digits", "static")
    vae = VAE(data.dim, 4, (16,))
    made, calls = [], {"n": 0}
    real_make = svi_mod.make_svi_step

    def keep(*args, **kwargs):
        made.append(real_make(*args, **kwargs))
        calls["n"] = 0  # count training steps only
        return made[-1]

    def model(x):  # -inf on the third training step
        calls["n"] += 1
        vae.model(x)
        if calls["n"] == 3:
            pyro.factor("poison", torch.tensor(float("-inf")))

    monkeypatch.setattr(svi_mod, "make_svi_step", keep)
    with pytest.raises(FloatingPointError, match=r"non-finite loss \((inf|nan)\) at epoch 1, step 3"):
        train_svi(model, vae.guide, data.train[:256], None, SVIConfig(epochs=1, batch_size=32), progress=False)
    step, optimizer = made[0]
    assert calls["n"] == 8  # the loop ran on past the bad step ...
    assert {float(s["step"]) for s in optimizer.state.values()} == {2.0}  # ... but only 2 updates applied


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_loop_synchronizes_a_constant_number_of_times_per_epoch(monkeypatch):
    """torch's own sync detector (set_sync_debug_mode) sees every device->host wait, also those
    inside C++ ops: the training part of an epoch (16 steps) does at most a few."""
    import ppgen.infer.svi as svi_mod

    real_make = svi_mod.make_svi_step

    def watching_make(*args, **kwargs):
        made = real_make(*args, **kwargs)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        return made

    monkeypatch.setattr(svi_mod, "make_svi_step", watching_make)
    data = load_dataset("digits", "static")
    counts = []
    for epochs in (1, 3):
        vae = VAE(data.dim, 4, (16,)).to("cuda")
        config = SVIConfig(epochs=epochs, batch_size=32, device="cuda")
        try:
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                result = train_svi(vae.model, vae.guide, data.train[:512], None, config, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert [h["step"] for h in result.history] == [16 * (e + 1) for e in range(epochs)]
        counts.append(sum("synchroniz" in str(w.message) for w in record))
    assert counts[0] <= 4 and counts[1] <= 3 * 4, counts  # per epoch, not per step (16 steps)
