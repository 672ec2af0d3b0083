"""SVIConfig(compile=True): compiled and eager steps give the same losses, gradients and
parameters; what cannot compile runs eagerly with one warning; Pyro is changed only inside the
compiled call. Compiling costs 10-40 s per model on 2 shared cores, so each family compiles once
(tiny networks) and those tests are marked slow."""

from __future__ import annotations

import contextlib
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer import compile as compat
from ppgen.infer.svi import SVIConfig, make_svi_step
from ppgen.models.vae import VAE

D, Z, H, B = 12, 2, (8,), 16


def _data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((B, D), 0.3), generator=g)


def _run(vae: VAE, config: SVIConfig, x: torch.Tensor, betas, expect_compiled: bool):
    """First loss and gradients, then one step per KL weight in ``betas``: returns (loss, grads,
    records, parameters)."""
    step, _ = make_svi_step(vae.model, vae.guide, config, x, scale=4.0)
    assert step.compiled is expect_compiled, step.why_eager
    pyro.set_rng_seed(1)
    with vae.objective(kl_weight=betas[0]):
        loss = step._loss_and_grads((x,), {})
    grads = [p.grad.clone() for p in step.params]
    step.optimizer.zero_grad(set_to_none=True)
    records = []
    for beta in betas:
        with vae.objective(kl_weight=beta):
            records.append(step.on_device(x))
    return loss, grads, torch.stack(records), [p.detach().clone() for p in step.params]


def _compare(vae_kwargs: dict, config_kwargs: dict, betas=(1.0, 1.0, 1.0)):
    x = _data()
    torch.manual_seed(0)
    compiled_vae = VAE(D, Z, H, **vae_kwargs)
    eager_vae = VAE(D, Z, H, **vae_kwargs)
    eager_vae.load_state_dict(compiled_vae.state_dict())
    before = {k: v.clone() for k, v in compiled_vae.state_dict().items()}
    got = _run(compiled_vae, SVIConfig(lr=0.01, compile=True, **config_kwargs), x, betas, True)
    want = _run(eager_vae, SVIConfig(lr=0.01, **config_kwargs), x, betas, False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5 * float(w.abs().max()) + 1e-7)
    torch.testing.assert_close(got[2][:, 0], want[2][:, 0], rtol=1e-5, atol=1e-5)  # losses of the steps
    for p, q in zip(got[3], want[3]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(before[k], v) for k, v in compiled_vae.state_dict().items())  # all updated


# -- compiled == eager, per family ---------------------------------------------------------------

@pytest.mark.slow
def test_fullcov_gaussian_compiles_and_matches_eager(one_thread):
    _compare({"posterior": "fullcov", "likelihood": "gaussian"}, {})


@pytest.mark.slow
def test_diag_vae_with_kl_warmup_and_free_bits_compiles_and_matches_eager(one_thread):
    # The default diag/Bernoulli VAE; beta changes between steps as under warm-up (0.5, 0.75, then
    # 1): the compiled step must follow it without a graph per value. Graphs: the build's (plain
    # ELBO, no free bits), one for every beta < 1 (the weight is a tensor the graph reads) and one
    # for beta = 1 with free bits; a Python-float beta compiled one more per value.
    from torch._dynamo.utils import counters

    counters.clear()
    _compare({"free_bits": 0.05}, {}, betas=(0.5, 0.75, 1.0))
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


@pytest.mark.slow
@pytest.mark.parametrize("estimator, particles", [("analytic-kl", 1), ("iwae", 3)])
def test_estimator_compiles_and_matches_eager(one_thread, estimator, particles):
    _compare({}, {"estimator": estimator, "particles": particles})


# -- what does not compile runs eagerly, says why, and gives the eager numbers --------------------

def _one_warning(record) -> str:
    lines = [str(w.message) for w in record if "--compile" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("estimator", ["score", "score-baseline", "enum"])
def test_host_reading_estimators_fall_back_without_compiling(estimator):
    vae = VAE(D, Z, H)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        step, _ = make_svi_step(vae.model, vae.guide, SVIConfig(estimator=estimator, compile=True), _data())
    assert not step.compiled and "reads its loss on the host" in _one_warning(record)


def test_other_pyro_version_falls_back(monkeypatch):
    monkeypatch.setattr(pyro, "__version__", "1.9.1")
    assert "Pyro 1.9.2" in compat.unsupported_reason()
    with pytest.raises(RuntimeError, match="1.9.1"):
        with compat.pyro_compat():
            pass
    vae = VAE(D, Z, H)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        step, _ = make_svi_step(vae.model, vae.guide, SVIConfig(compile=True), _data())
    assert not step.compiled and "found Pyro 1.9.1" in _one_warning(record)
    assert not step.device_loss  # Pyro's own loss_and_grads, untouched internals
    assert torch.isfinite(step.on_device(_data())).all()


@pytest.mark.parametrize("vae_kwargs, config_kwargs, where", [
    ({"posterior": "iaf"}, {}, "Unsupported"),  # tried: dynamo stops at the IAF's transforms
    ({}, {"estimator": "stl"}, "torch.autograd.grad"),  # known, not tried
    ({}, {"estimator": "dreg", "particles": 2}, "gradient hooks"),
])
def test_models_that_break_the_graph_fall_back_to_eager_numbers(one_thread, vae_kwargs, config_kwargs, where):
    x = _data()
    torch.manual_seed(0)
    vae = VAE(D, Z, H, **vae_kwargs)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        step, _ = make_svi_step(vae.model, vae.guide, SVIConfig(compile=True, **config_kwargs), x)
    assert not step.compiled and where in _one_warning(record)
    pyro.set_rng_seed(1)
    got = step(x)
    torch.manual_seed(0)
    eager = VAE(D, Z, H, **vae_kwargs)
    step, _ = make_svi_step(eager.model, eager.guide, SVIConfig(**config_kwargs), x)
    pyro.set_rng_seed(1)
    assert got == step(x)


# -- the compatibility layer is scoped ------------------------------------------------------------

def test_pyro_compat_changes_pyro_only_inside_the_block():
    from pyro.infer import trace_elbo
    from pyro.poutine import messenger, runtime
    from torch.distributions import Distribution

    def patched():
        return (runtime.Message, messenger.Messenger.__call__, trace_elbo.torch_item, trace_elbo.warn_if_nan,
                Distribution._get_checked_instance)

    before = patched()
    with compat.pyro_compat():
        assert runtime.Message is dict and trace_elbo.torch_item(torch.tensor(2.0)).requires_grad is False
        assert all(a is not b for a, b in zip(before, patched()))
    with contextlib.suppress(KeyError):
        with compat.pyro_compat():
            raise KeyError  # an error inside the block restores Pyro as well
    assert patched() == before


def test_compat_handlers_give_pyros_values():
    """A model/guide pair traced inside the block: the same sites, values and log densities as
    outside it (same seed), and the ELBO's loss is a tensor instead of a float."""
    from pyro.infer import Trace_ELBO

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.3))
        with pyro.plate("data", len(x), subsample_size=3):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:3])

    def guide(x):
        with pyro.plate("data", len(x), subsample_size=3):
            pyro.sample("z", dist.Normal(pyro.param("q", torch.tensor(0.1)), 1.0))

    x = torch.linspace(-1, 1, 5)
    pyro.set_rng_seed(3)
    want = pyro.poutine.trace(model).get_trace(x)
    want_loss = Trace_ELBO().differentiable_loss(model, guide, x)
    with compat.pyro_compat():
        pyro.set_rng_seed(3)
        got = pyro.poutine.trace(model).get_trace(x)
        got_loss = Trace_ELBO().differentiable_loss(model, guide, x)
    assert list(got.nodes) == list(want.nodes)
    assert torch.equal(got.nodes["z"]["value"], want.nodes["z"]["value"])
    assert float(got.log_prob_sum().detach()) == pytest.approx(float(want.log_prob_sum().detach()), rel=1e-6)
    assert isinstance(got_loss, torch.Tensor)
    assert float(got_loss.detach()) == pytest.approx(float(want_loss.detach()), rel=1e-6)


def test_compile_flag_maps_onto_the_config():
    from ppgen.cli import build_parser
    from ppgen.cli.train import vae_run_config

    for argv, want in ((["train", "vae", "--out", "runs/x"], False), (["train", "vae", "--out", "runs/x", "--compile"], True)):
        assert vae_run_config(build_parser().parse_args(argv)).svi.compile is want
    args = build_parser().parse_args(["train", "model", "m.py:model", "--data", "digits", "--out", "runs/x", "--compile"])
    assert args.compile is True  # model_run_config passes it on as vae_run_config does
    with pytest.raises(TypeError, match="compile must be True or False"):
        SVIConfig(compile="yes")


def test_nonfinite_example_batch_still_compiles_or_says_why(one_thread):
    """_close judges NaN where the eager loss is NaN as agreement (no spurious 'differs')."""
    from ppgen.infer.compile import close as _close

    nan = torch.tensor([float("nan"), 1.0])
    assert _close(nan, nan.clone()) and not _close(torch.tensor([1.0, 1.0]), nan)
    assert _close(torch.tensor([1.00001]), torch.tensor([1.0])) and not _close(torch.tensor([1.01]), torch.tensor([1.0]))


@pytest.mark.slow
def test_compiled_training_run_equals_the_eager_one_with_no_host_reads_per_step(monkeypatch, one_thread):
    """train_svi(compile=True) end to end: the same epoch losses and validation ELBOs as the eager
    run (the compiled graph draws the same noise: inductor's fallback_random), and the loop's
    host reads per epoch stay a small constant (16 steps per epoch)."""
    import math

    import ppgen.infer.svi as svi_mod
    from ppgen.data import binarize, load_dataset
    from ppgen.infer.svi import train_svi

    data = load_dataset("digits")
    counts, during = {"reads": 0}, [False]
    real_make = svi_mod.make_svi_step

    def counting_make(*args, **kwargs):
        made = real_make(*args, **kwargs)
        during[0] = True
        return made

    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["reads"] += during[0]
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(svi_mod, "make_svi_step", counting_make)
    runs = {}
    for compile in (True, False):
        torch.manual_seed(0)
        vae = VAE(data.dim, 4, (32,))
        during[0], counts["reads"] = False, 0
        result = train_svi(vae.model, vae.guide, data.train[:512], None,
                           SVIConfig(epochs=2, batch_size=32, compile=compile), transform=binarize, progress=False)
        during[0] = False
        runs[compile] = (result, counts["reads"])
    compiled, eager = runs[True][0].history, runs[False][0].history
    assert [h["step"] for h in compiled] == [16, 32]
    for c, e in zip(compiled, eager):
        assert math.isfinite(c["train_loss"]) and c["train_loss"] == pytest.approx(e["train_loss"], rel=1e-5)
    assert runs[True][1] <= 2 * 3 and runs[False][1] <= 2 * 3, (runs[True][1], runs[False][1])
