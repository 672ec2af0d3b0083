"""SVIConfig(compile=True) over what a user can reach: every estimator and particle count, and
model shapes from real Pyro code (two data arguments, a plate not named "data", a BatchNorm
encoder in train mode, a global latent next to local ones). Each cell either compiles and then
gives the eager step's losses, gradients, parameters, module buffers and RNG stream, or runs
eagerly after one warning line and gives the eager numbers exactly. A non-finite batch after
compilation is skipped as the eager step skips it. Compiling costs 5-30 s per cell on 2 shared
cores: cells share one compilation each (the NaN batch rides along) and are marked slow."""

from __future__ import annotations

import random
import warnings
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppgen.infer.autoguide import AmortizedGuide
from ppgen.infer.batches import as_batch
from ppgen.infer.svi import SVIConfig, make_svi_step
from ppgen.models.vae import VAE

D, Z, B = 12, 2, 16


def _x(seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(torch.full((B, D), 0.3), generator=torch.Generator().manual_seed(seed))


def _nan(x: torch.Tensor) -> torch.Tensor:
    bad = x.clone()
    bad[3, 2] = float("nan")
    return bad


# -- the models: factory() -> (model, guide, modules holding buffers, batches) ---------------------

def _vae():
    vae = VAE(D, Z, (8,))
    x = _x()
    return vae.model, vae.guide, [vae], [x, _nan(x), _x(1)]


def _vae_other_sizes():
    """Then batches of 10 and 7 rows (step() called by hand; train_svi drops the last partial
    batch): one recompilation, with dynamic shapes."""
    model, guide, modules, batches = _vae()
    return model, guide, modules, batches + [_x(2)[:10], _x(3)[:7]]


def _two_args_batchnorm_global():
    """model(x, y) with its datapoints in plate "batch", a global latent ``w`` beside the local
    ``z``, and a hand-written guide whose encoder has a BatchNorm1d in train mode (reads x only,
    so the NaN in y of the second batch leaves the running statistics alone)."""
    # No bias in front of the BatchNorm: it would have a zero gradient in exact arithmetic, whose
    # rounding noise Adam turns into steps of size lr with random signs (a random walk, and
    # running means, that differ between any two differently rounded runs, eager CPU vs CUDA too)
    enc = nn.Sequential(nn.Linear(D, 8, bias=False), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2 * Z))
    dec = nn.Linear(Z, D)

    def model(x, y):
        pyro.module("dec", dec)
        w = pyro.sample("w", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            pyro.sample("y", dist.Normal((z * w).sum(-1), 0.5), obs=y)
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x, y):
        pyro.module("enc", enc)
        loc = pyro.param("w_loc", x.new_zeros(Z))
        scale = pyro.param("w_scale", x.new_ones(Z), constraint=dist.constraints.positive)
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))
        h = enc(x)
        with pyro.plate("batch", x.shape[0]):
            pyro.sample("z", dist.Normal(h[:, :Z], nn.functional.softplus(h[:, Z:]) + 1e-3).to_event(1))

    g = torch.Generator().manual_seed(2)
    x, y = _x(), torch.randn(B, generator=g)
    bad_y, huge_y = y.clone(), y.clone()
    bad_y[5] = float("nan")
    # A finite loss (~2e38 at scale 4) whose gradients' squares overflow float32: a skip that
    # names the gradient
    huge_y[5] = 5e18
    return model, guide, [enc, dec], [(x, y), (x, bad_y), (_x(1), torch.randn(B, generator=g)), (x, huge_y)]


def _keyword_args_batchnorm_global():
    """The same model, its batches given as dicts: ``model(**{"x": x, "y": y})``."""
    model, guide, modules, batches = _two_args_batchnorm_global()
    return model, guide, modules, [{"x": x, "y": y} for x, y in batches]


def _amortized_global_batchnorm():
    """A global mean ``mu`` next to a local ``z`` in plate "rows", guided by ppgen's
    AmortizedGuide whose trunk holds a BatchNorm1d (train mode)."""
    def model(x):
        mu = pyro.sample("mu", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
        with pyro.plate("rows", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(mu + z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)

    trunk = nn.Sequential(nn.Linear(D, 8, bias=False), nn.BatchNorm1d(8))
    guide = AmortizedGuide(model, encoder=trunk, hidden=(8,), data_plate="rows")
    return model, guide, [guide], [_x(), _x(1), _x(2)]


def _prodlda():
    """Pyro's ProdLDA as examples/pyro_models/prodlda.py writes it: plate "documents", BatchNorm
    (train mode) and Dropout in encoder and decoder, a Multinomial whose total count the model
    reads with ``int(docs.sum(-1).max())``."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "pyro_models" / "prodlda.py"
    spec = importlib.util.spec_from_file_location("ppgen_example_prodlda", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    lda = example.ProdLDA(hidden=16)
    docs = example.synthetic_corpus(3 * B, seed=1)
    return lda.model, lda.guide, [lda], [docs[:B], docs[B:2 * B], docs[2 * B:]]


# -- running one configuration --------------------------------------------------------------------

def _run(factory: Callable, config: SVIConfig, scale: float):
    """Build with ``factory()`` (seed 0), then from seed 1 one loss-and-gradient evaluation and
    one step per batch. Returns what a run leaves behind."""
    torch.manual_seed(0)
    model, guide, modules, batches = factory()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        step, _ = make_svi_step(model, guide, config, batches[0], scale=scale)
    lines = [str(w.message) for w in record if "--compile" in str(w.message)]
    pyro.set_rng_seed(1)
    first = as_batch(batches[0])
    loss = step._loss_and_grads(first.args, first.kwargs)
    grads = [p.grad.clone() for p in step.params]
    step.optimizer.zero_grad(set_to_none=True)
    losses, problems = [], []
    for batch in batches:
        before = [p.detach().clone() for p in step.params]
        losses.append(step(batch))
        problems.append(step.nonfinite)
        if step.nonfinite is not None:  # a skipped update changes nothing
            assert all(torch.equal(a, p) for a, p in zip(before, step.params))
    buffers = {f"{i}.{k}": v.clone() for i, m in enumerate(modules) for k, v in m.named_buffers()}
    return {"step": step, "warnings": lines, "loss": loss, "grads": grads, "losses": losses,
            "problems": problems, "params": [p.detach().clone() for p in step.params],
            "buffers": buffers, "rng": torch.rand(4)}


def _compiled_and_eager(factory: Callable, scale: float = 4.0, **config_kwargs):
    got = _run(factory, SVIConfig(lr=0.01, compile=True, **config_kwargs), scale)
    want = _run(factory, SVIConfig(lr=0.01, **config_kwargs), scale)
    assert want["step"].names == got["step"].names and not want["warnings"]
    return got, want


# Parameters whose gradient is zero in exact arithmetic (a Linear's bias in front of a BatchNorm,
# which subtracts it again), and the running means that follow them: Adam scales their rounding
# noise up to steps of size lr with random signs, so any two differently rounded runs (eager on
# the CPU and on CUDA too) walk them apart, with no effect on the loss. ProdLDA has two.
_ROUNDING_WALKS = {
    "encoder$$$fc_mu.bias", "encoder$$$fc_lv.bias", "0.encoder.bn_mu.running_mean", "0.encoder.bn_lv.running_mean",
}


def _assert_same(got: dict, want: dict, exact: bool) -> None:
    tol = {"rtol": 0.0, "atol": 0.0} if exact else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(got["loss"], want["loss"], **tol)
    largest = max(float(w.abs().max()) for w in want["grads"])  # one scale, as the build's check
    for g, w in zip(got["grads"], want["grads"]):
        torch.testing.assert_close(g, w, rtol=tol["rtol"], atol=tol["atol"] * largest + (0 if exact else 1e-7))
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), equal_nan=True, **tol)
    assert got["problems"] == want["problems"]
    for name, p, q, w in zip(want["step"].names, got["params"], want["params"], want["grads"]):
        if name in _ROUNDING_WALKS:
            assert float(w.abs().max()) <= 1e-5 * largest  # zero up to rounding, as claimed
            continue
        torch.testing.assert_close(p, q, rtol=tol["rtol"], atol=0.0 if exact else 1e-6)
    assert got["buffers"].keys() == want["buffers"].keys()
    for k in set(want["buffers"]) - _ROUNDING_WALKS:  # BatchNorm: as many updates, from the same batches
        torch.testing.assert_close(got["buffers"][k], want["buffers"][k], rtol=tol["rtol"], atol=0.0 if exact else 1e-6)
    assert torch.equal(got["rng"], want["rng"])  # the build's check left the RNG stream alone


# -- estimators x particles -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("estimator, particles, factory", [("reparam", 3, _vae_other_sizes), ("vimco", 3, _vae)])
def test_estimator_cell_compiles_and_matches_eager(one_thread, estimator, particles, factory):
    """The cells test_compile.py leaves out (reparam with vectorized particles, vimco); the NaN
    batch in the middle is skipped on the device as eager skips it."""
    got, want = _compiled_and_eager(factory, estimator=estimator, particles=particles)
    assert got["step"].compiled, got["step"].why_eager
    assert not got["warnings"]
    assert want["problems"][:3] == [None, "loss", None] and len(want["problems"]) == len(factory()[3])
    _assert_same(got, want, exact=False)


@pytest.mark.parametrize("estimator, particles, why", [
    ("stl", 1, "torch.autograd.grad"),
    ("stl", 3, "torch.autograd.grad"),
    ("dreg", 3, "gradient hooks"),
    ("score", 1, "reads its loss on the host"),
    ("score", 3, "reads its loss on the host"),
    ("score-baseline", 1, "reads its loss on the host"),
    ("score-naive", 2, "reads its loss on the host"),
    ("score-nn-baseline", 1, "reads its loss on the host"),
    ("enum", 1, "reads its loss on the host"),
    ("score-discrete", 1, "reads its loss on the host"),
])
def test_estimator_cell_falls_back_with_one_line_and_eager_numbers(one_thread, estimator, particles, why):
    """Refused without compiling (a known reason): one warning line, then the eager numbers,
    NaN batch included, bit for bit."""
    got, want = _compiled_and_eager(_vae, estimator=estimator, particles=particles)
    assert not got["step"].compiled and got["step"].why_eager
    assert len(got["warnings"]) == 1 and "\n" not in got["warnings"][0] and why in got["warnings"][0]
    assert "estimators that compile: reparam" in got["warnings"][0]  # and what to use instead
    # The NaN batch: a skipped update (score-function guides draw with torch.normal, which refuses
    # the NaN scale an encoder makes of a NaN input: the step skips it as the pathwise one does)
    assert want["problems"] == [None, "loss", None]
    _assert_same(got, want, exact=True)


# -- model shapes ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("factory", [_two_args_batchnorm_global, _keyword_args_batchnorm_global,
                                     _amortized_global_batchnorm, _prodlda],
                         ids=["model(x,y)-plate-batch-batchnorm-global", "model(**{x,y})",
                              "amortized-plate-rows-batchnorm-global", "prodlda-batchnorm-dropout"])
def test_model_shape_compiles_and_matches_eager_buffers_and_rng_included(one_thread, factory):
    got, want = _compiled_and_eager(factory)
    assert got["step"].compiled, got["step"].why_eager
    assert got["step"].data_plate == want["step"].data_plate != "data"
    assert any("running_mean" in k for k in want["buffers"])
    if factory in (_two_args_batchnorm_global, _keyword_args_batchnorm_global):
        assert want["problems"][:3] == [None, "loss", None] and want["problems"][3].startswith("gradient of 'enc")
        assert want["losses"][3] != want["losses"][3]  # step() reports NaN when a gradient skipped the update
    else:
        assert want["problems"] == [None] * 3
    _assert_same(got, want, exact=False)


def _fails(*args, **kwargs):
    raise RuntimeError("stand-in for a failure while compiling")


@pytest.mark.parametrize("compiles", [True, False], ids=["check-passes", "compile-fails"])
def test_build_check_leaves_batchnorm_buffers_and_rng_as_the_eager_build(one_thread, monkeypatch, compiles):
    """The build-time check runs the loss twice; with the compiled run replaced by an eager one
    (no compiling: fast) the step 'compiles', or with one that raises it falls back, and either
    way the BatchNorm running statistics, batch count and RNG state after the build equal those
    of an eager build; the buffers are those of a fresh BatchNorm (make_svi_step's registration
    trace does not move them either)."""
    import ppgen.infer.svi_step as svi_step

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn if compiles else _fails)
    states = []
    for compile in (True, False):
        torch.manual_seed(0)
        model, bn_guide, modules, batches = _two_args_batchnorm_global()

        def guide(x, y):  # also draws from Python's and NumPy's generators (pyro.set_rng_seed seeds them)
            random.random()
            np.random.rand()
            return bn_guide(x, y)

        random.seed(0)
        np.random.seed(0)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            step, _ = svi_step.make_svi_step(model, guide, SVIConfig(compile=compile), batches[0])
        assert step.compiled is (compile and compiles)
        assert (step.why_eager is not None) is (compile and not compiles) and len(record) == (compile and not compiles)
        states.append(({k: v.clone() for k, v in modules[0].named_buffers()},
                       (torch.get_rng_state(), random.random(), np.random.rand())))
    (got, got_rng), (want, want_rng) = states
    fresh = nn.BatchNorm1d(8).state_dict()  # the registration trace is a throwaway too
    for k in want:
        assert torch.equal(got[k], want[k]) and torch.equal(want[k], fresh[k.split(".", 1)[1]]), k
    assert torch.equal(got_rng[0], want_rng[0]) and got_rng[1:] == want_rng[1:]


def test_build_check_judges_every_gradient_on_one_scale():
    """A gradient that is zero in exact arithmetic (a Linear's bias in front of a BatchNorm) is
    rounding noise of the size of the terms it sums; judged on its own scale, two runs' noise
    'differs' (measured: entries up to 1.5e-6 against 1e-7 allowed, and a needless fallback).
    Judged on the largest gradient entry of the step, it agrees; a real difference does not."""
    from ppgen.infer.compile import close as _close

    eager, compiled = torch.tensor([0.0, 9.5e-7, -1.2e-7]), torch.tensor([-1.2e-7, 0.0, 1.5e-6])
    assert not _close(compiled, eager) and _close(compiled, eager, scale=2.0)
    assert not _close(torch.tensor([1e-3, 0.0, 0.0]), eager, scale=2.0)


@pytest.mark.slow
def test_training_run_with_a_nan_row_skips_or_stops_as_the_eager_run(one_thread):
    """train_svi(compile=True) on data with one NaN row: under on_nonfinite="skip" the same
    epoch losses and skipped steps as the eager run (one a epoch: the row's batch), and the same
    parameters; under "stop" the same FloatingPointError."""
    from ppgen.infer.svi import train_svi

    data = torch.cat([_x(0), _x(1), _x(2), _x(3)])
    data[21, 4] = float("nan")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        runs = _train_with_nan_row(train_svi, data)
    assert not [w for w in record if "--compile" in str(w.message)]  # compiled, and stayed so
    (got, got_params, got_stop), (want, want_params, want_stop) = runs[True], runs[False]
    assert [h["skipped_steps"] for h in want] == [1, 1] and [h["skipped_steps"] for h in got] == [1, 1]
    for g, w in zip(got, want):
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=1e-5)
    for p, q in zip(got_params, want_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert got_stop == want_stop and "non-finite loss (nan)" in want_stop


def _train_with_nan_row(train_svi, data) -> dict:
    runs = {}
    for compile in (True, False):
        torch.manual_seed(0)
        vae = VAE(D, Z, (8,))
        result = train_svi(vae.model, vae.guide, data, None,
                           SVIConfig(epochs=2, batch_size=16, lr=0.01, on_nonfinite="skip", compile=compile),
                           progress=False)
        runs[compile] = (result.history, [p.detach().clone() for p in pyro.get_param_store().values()])
        torch.manual_seed(0)
        vae = VAE(D, Z, (8,))
        with pytest.raises(FloatingPointError) as stopped:
            train_svi(vae.model, vae.guide, data, None, SVIConfig(epochs=2, batch_size=16, compile=compile),
                      progress=False)
        runs[compile] += (str(stopped.value),)
    return runs
