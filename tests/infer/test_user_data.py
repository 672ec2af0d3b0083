"""User data as Pyro users pass it, and the datapoint plate found, not assumed (issue 16).

Known answers from a conjugate model written the way Pyro's examples write one: covariates
``x`` and targets ``y`` as two arguments, a local latent per datapoint in ``pyro.plate("obs")``:

    z_n ~ N(0, 1),   y_n ~ N(a x_n + z_n, s^2)   =>   y_n | x_n ~ N(a x_n, 1 + s^2)

and the exact posterior ``z_n | y_n ~ N((y_n - a x_n) / (1 + s^2), s^2 / (1 + s^2))`` as guide,
so every importance weight equals ``p(y_n | x_n)`` and each ELBO draw is the exact evidence.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from ppgen.infer.batches import as_batch
from ppgen.infer.evidence import log_evidence
from ppgen.infer.networks import eval_mode, networks_of
from ppgen.infer.svi import SVIConfig, evaluate_elbo, make_svi_step, train_svi
from ppgen.infer.traces import find_data_plate
from ppgen.infer.variance import gradient_stats

S2 = 0.5  # noise variance s^2
A = 0.7  # the regression weight, a parameter


@pytest.fixture(autouse=True)
def _fresh_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def regression_model(x, y, mask=None):
    a = pyro.param("a", torch.tensor(A))
    with pyro.plate("obs", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        with pyro.poutine.mask(mask=mask if mask is not None else True):
            pyro.sample("y", dist.Normal(a * x + z, math.sqrt(S2)), obs=y)


def regression_guide(x, y, mask=None):
    """The exact posterior: ``N(0, 1)`` where the label is masked out."""
    a = pyro.param("a", torch.tensor(A)).detach()
    seen = torch.ones_like(x) if mask is None else mask.to(x.dtype)
    loc = seen * (y - a * x) / (1 + S2)
    var = 1.0 - seen * (1.0 / (1 + S2))  # 1 where unlabelled, s^2 / (1 + s^2) where labelled
    with pyro.plate("obs", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, var.sqrt()))


def exact_log_p(x, y, a=A):
    return dist.Normal(a * x, math.sqrt(1 + S2)).log_prob(y).double()


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    y = A * x + torch.randn(n, generator=g) * math.sqrt(1 + S2)
    return x, y


# -- one batch form, checked in one place --------------------------------------------------------

def test_as_batch_forms_and_slicing():
    x, y = _data(10)
    t = as_batch(x)
    assert (t.size, t.form, t.args[0] is x, t.kwargs) == (10, "tensor", True, {})
    tup = as_batch((x, None, y, 3.0))
    part = tup.rows(torch.tensor([4, 1]))
    assert part.size == 2 and part.args[1] is None and part.args[3] == 3.0
    assert torch.equal(part.args[0], x[[4, 1]]) and torch.equal(part.args[2], y[[4, 1]])
    d = as_batch({"x": x, "y": y}).rows(slice(2, 5))
    assert d.form == "dict" and d.size == 3 and torch.equal(d.data["y"], y[2:5])


def test_mismatched_lengths_name_both_arguments():
    x, y = _data(10)
    with pytest.raises(ValueError, match=r"'x' \(position 0\) has 10 rows.*'y' \(position 1\) has 9 rows"):
        train_svi(regression_model, regression_guide, (x, y[:-1]), config=SVIConfig(batch_size=5), progress=False)
    with pytest.raises(ValueError, match=r"keyword 'x' has 10 rows, keyword 'y' has 9 rows"):
        log_evidence(regression_model, regression_guide, {"x": x, "y": y[:-1]}, 4)
    with pytest.raises(TypeError, match="tensor"):
        as_batch("not data")


# -- training: tuple data, a plate named "obs", minibatch scaling -------------------------------

def test_train_svi_tuple_batch_scales_the_obs_plate():
    """First-epoch loss per datapoint equals the full-data negative ELBO per datapoint (exact
    guide: every draw is exact), so the N / B scaling reached the "obs" plate. Unscaled, the
    loss would be B / N = 1/4 of it (main failed earlier: a tuple was taken for 2 datapoints)."""
    x, y = _data(40)
    exact = -float(exact_log_p(x, y).mean())
    res = train_svi(regression_model, regression_guide, (x, y), None,
                    SVIConfig(epochs=1, batch_size=10, lr=1e-12), progress=False)
    assert res.history[0]["train_loss"] == pytest.approx(exact, rel=1e-5)
    # the same number from Pyro's Trace_ELBO on the full data, same params
    full = Trace_ELBO().loss(regression_model, regression_guide, x, y) / len(x)
    assert res.history[0]["train_loss"] == pytest.approx(full, rel=1e-5)


def test_train_svi_dict_batch_with_mask_and_unlabelled_split():
    """Partly labelled data: a mask tensor sliced with the rows. Labelled rows contribute
    ``-log p(y | x)``; unlabelled rows nothing (their z has prior = posterior). Validation on an
    unlabelled split ``(x, None)`` (mask None => all labelled is not what we want, so a zero
    mask) gives 0 nats exactly."""
    x, y = _data(40)
    mask = torch.arange(40) % 2 == 0
    res = train_svi(regression_model, regression_guide, {"x": x, "y": y, "mask": mask},
                    {"x": x, "y": y, "mask": torch.zeros(40, dtype=torch.bool)},
                    SVIConfig(epochs=1, batch_size=8, lr=1e-12), progress=False)
    expected = -float((exact_log_p(x, y) * mask).sum()) / 40
    assert res.history[0]["train_loss"] == pytest.approx(expected, rel=1e-5)
    assert res.val_elbo == pytest.approx(0.0, abs=1e-6)


def semi_model(x, y):
    """``z ~ N(0, 1)``, ``x ~ N(z, 1)``, and a label ``y ~ N(z, 1)`` when given (None: unlabelled)."""
    with pyro.plate("docs", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        if y is not None:
            pyro.sample("y", dist.Normal(z, 1.0), obs=y)


def semi_guide(x, y):
    w = pyro.param("w", torch.tensor(0.0))  # a parameter to train; the posterior below is exact
    prec = 2.0 if y is None else 3.0
    mean = (x if y is None else x + y) / prec
    with pyro.plate("docs", x.shape[0]):
        pyro.sample("z", dist.Normal(mean + 0 * w, prec ** -0.5))


def test_unlabelled_split_none_entry():
    """A tuple with None (an unlabelled split): trains with N / B scaling and the evidence is the
    exact marginal ``x ~ N(0, 2)``; the labelled split's is the bivariate normal."""
    x, y = _data(30, seed=3)
    res = train_svi(semi_model, semi_guide, (x, None), None, SVIConfig(epochs=1, batch_size=10, lr=1e-12),
                    progress=False)
    exact_x = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).double()
    assert res.history[0]["train_loss"] == pytest.approx(-float(exact_x.mean()), rel=1e-5)
    ev = log_evidence(semi_model, semi_guide, (x, None), 8, batch_size=7)
    torch.testing.assert_close(ev.log_px, exact_x, atol=1e-5, rtol=0)
    both = dist.MultivariateNormal(torch.zeros(2), torch.tensor([[2.0, 1.0], [1.0, 2.0]]))
    ev = log_evidence(semi_model, semi_guide, (x, y), 8, batch_size=7)
    torch.testing.assert_close(ev.log_px, both.log_prob(torch.stack([x, y], -1)).double(), atol=1e-5, rtol=0)


# -- evidence: a dict batch and the plate found by size --------------------------------------------

def test_log_evidence_dict_batch_matches_exact():
    x, y = _data(25)
    ev = log_evidence(regression_model, regression_guide, {"x": x, "y": y}, 6, batch_size=10)
    torch.testing.assert_close(ev.log_px, exact_log_p(x, y), atol=1e-5, rtol=0)
    mask = torch.arange(25) % 3 != 0  # unlabelled rows have evidence 0
    ev = log_evidence(regression_model, regression_guide, {"x": x, "y": y, "mask": mask}, 6, batch_size=10)
    torch.testing.assert_close(ev.log_px, exact_log_p(x, y) * mask, atol=1e-5, rtol=0)


@pytest.mark.parametrize("estimator", ["iwae", "dreg", "vimco"])
def test_multisample_bounds_train_on_the_found_plate(estimator):
    """The per-datapoint bounds read the "obs" plate (no "data" plate anywhere): the K-sample
    bound is exact for the exact guide, so the epoch loss is again -log p per datapoint."""
    x, y = _data(40)
    res = train_svi(regression_model, regression_guide, (x, y), None,
                    SVIConfig(estimator=estimator, particles=4, epochs=1, batch_size=10, lr=1e-12), progress=False)
    assert res.history[0]["train_loss"] == pytest.approx(-float(exact_log_p(x, y).mean()), rel=1e-5)


def test_gradient_stats_dict_batch_on_the_obs_plate():
    """gradient_stats on ``model(**batch)`` with the per-datapoint iwae bound in plate "obs":
    unbiased for the exact gradient of ``-sum_n log p(y_n | x_n)`` in ``a`` (the guide is the
    exact posterior, so the ELBO and every IWAE bound have the evidence's gradient, Fisher's
    identity): ``-sum_n (y_n - a x_n) x_n / (1 + s^2)``."""
    x, y = _data(20)
    exact = {"a": -((y - A * x) * x).sum() / (1 + S2)}
    stats = gradient_stats(regression_model, regression_guide, {"x": x, "y": y}, ["reparam", "iwae"],
                           num_draws=40, reference=exact, warmup=0, particles=[1, 4])
    for name in ("reparam", "iwae"):
        for k in (1, 4):
            row = stats.row(name, "all", particles=k)
            assert row["max_z"] < 4.0, (name, k, row)
    # K = 4 averages four independent draws: variance about a quarter
    ratio = stats.row("iwae", particles=4)["variance"] / stats.row("iwae", particles=1)["variance"]
    assert 0.1 < ratio < 0.6


# -- which plate: named, found by size, ambiguous, missing ----------------------------------------

def two_plate_model(x):
    with pyro.plate("rows", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    with pyro.plate("cols", x.shape[0]):  # a second plate that happens to have the batch's size
        pyro.sample("u", dist.Normal(torch.zeros_like(x), 1.0), obs=x)


def two_plate_guide(x):
    pyro.param("w", torch.tensor(0.0))
    with pyro.plate("rows", x.shape[0]):
        pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))


def test_ambiguous_plate_raises_and_data_plate_picks():
    x = torch.randn(20)
    with pytest.raises(ValueError, match=r"several plates of the batch's size 5.*\['cols', 'rows'\].*data_plate"):
        train_svi(two_plate_model, two_plate_guide, x, None, SVIConfig(epochs=1, batch_size=5), progress=False)
    step, _ = make_svi_step(two_plate_model, two_plate_guide, SVIConfig(lr=1e-12), x[:5], scale=4.0,
                            data_plate="rows")
    assert step.data_plate == "rows"
    info = find_data_plate(two_plate_model, two_plate_guide, (x[:5],), {}, 5, "cols")
    assert info.data_plate == "cols" and info.nesting == 1


def test_model_without_a_datapoint_plate_raises():
    """On main this trained silently with no N / B scaling."""
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(x / 2 + 0 * pyro.param("w", torch.tensor(0.0)), 0.7).to_event(1))

    with pytest.raises(ValueError, match=r"no plate named 'data' and no plate of the batch's size 5"):
        train_svi(model, guide, torch.randn(20), None, SVIConfig(epochs=1, batch_size=5), progress=False)


def test_guide_plate_named_differently_raises():
    def guide(x):
        pyro.param("w", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5 ** 0.5))

    def model(x):
        with pyro.plate("rows", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"guide's site 'z' is in plate 'data'.*Give both plates the same name"):
        train_svi(model, guide, torch.randn(20), None, SVIConfig(epochs=1, batch_size=5), progress=False)


# -- plates without a size: broadcast, and subsample indices ------------------------------------

def unsized_model(x):
    with pyro.plate("data"):  # size from the data
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def unsized_guide(x):
    w = pyro.param("w", torch.tensor(0.0))
    with pyro.plate("data"):
        pyro.sample("z", dist.Normal(x / 2 + 0 * w, 0.5 ** 0.5))


def subsample_model(x, idx):
    with pyro.plate("data", 40, subsample=idx):  # Pyro's own N / B from the indices
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def subsample_guide(x, idx):
    w = pyro.param("w", torch.tensor(0.0))
    with pyro.plate("data", 40, subsample=idx):
        pyro.sample("z", dist.Normal(x / 2 + 0 * w, 0.5 ** 0.5))


def test_unsized_and_subsample_plates():
    """Exact guide: -log N(x; 0, 2) per datapoint from training (scaled once: by DataScale for the
    unsized plate, by Pyro's subsample plate for the other, never both), evidence and ELBO."""
    x = torch.randn(40, generator=torch.Generator().manual_seed(1))
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).double()
    config = SVIConfig(epochs=1, batch_size=10, lr=1e-12)
    res = train_svi(unsized_model, unsized_guide, x, None, config, progress=False)
    assert res.history[0]["train_loss"] == pytest.approx(-float(exact.mean()), rel=1e-5)
    res = train_svi(subsample_model, subsample_guide, (x, torch.arange(40)), None, config, progress=False)
    assert res.history[0]["train_loss"] == pytest.approx(-float(exact.mean()), rel=1e-5)
    torch.testing.assert_close(log_evidence(unsized_model, unsized_guide, x, 4, batch_size=16).log_px, exact,
                               atol=1e-5, rtol=0)
    assert evaluate_elbo(unsized_model, unsized_guide, x, batch_size=16) == pytest.approx(float(exact.mean()),
                                                                                            rel=1e-5)
    stats = gradient_stats(unsized_model, unsized_guide, x, ["reparam", "iwae"], num_draws=4, reference_draws=4,
                           warmup=0, particles=[1, 2])
    assert math.isfinite(stats.row("iwae", particles=2)["variance"])


def sequential_model(x):
    for i in pyro.plate("data", x.shape[0]):  # a model that is not vectorized
        z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
        pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=x[i])


def sequential_guide(x):
    w = pyro.param("w", torch.tensor(0.0))
    for i in pyro.plate("data", x.shape[0]):
        pyro.sample(f"z_{i}", dist.Normal(x[i] / 2 + 0 * w, 0.5 ** 0.5))


def test_sequential_data_plate_is_scaled():
    x = torch.randn(20, generator=torch.Generator().manual_seed(2))
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).double()
    res = train_svi(sequential_model, sequential_guide, x, None, SVIConfig(epochs=1, batch_size=5, lr=1e-12),
                    progress=False)
    assert res.history[0]["train_loss"] == pytest.approx(-float(exact.mean()), rel=1e-5)


# -- networks in eval mode for evaluation, and restored --------------------------------------------

class Scaled(torch.nn.Module):
    """A BatchNorm whose eval-mode output is known: running mean 0 and variance 1 (its
    initial statistics, momentum 0) give ``h(x) = x / sqrt(1 + eps)``; in train mode it would
    standardise each chunk by its own statistics instead."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1, momentum=0.0, affine=False)

    def forward(self, x):
        return self.bn(x.unsqueeze(-1)).squeeze(-1)


net = Scaled()  # module-level, as in Pyro's examples


def bn_model(x):
    pyro.module("net", net)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def bn_guide(x):
    h = net(x)  # eval: x / sqrt(1 + eps); the exact posterior mean is x / 2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(h / 2, 0.5 ** 0.5))


def test_evaluation_runs_networks_in_eval_mode_and_restores():
    """Eval mode: the guide is (up to BatchNorm's eps) the exact posterior, so the ELBO is
    log N(x; 0, 2) per datapoint. Train mode standardises x per chunk, a different proposal and
    a lower ELBO (on main: evaluate_elbo ran in train mode)."""
    x = 3.0 + 2.0 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    exact = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x).double()
    net.train()  # as training leaves it
    elbo = evaluate_elbo(bn_model, bn_guide, x, batch_size=16, num_particles=20)
    assert elbo == pytest.approx(float(exact.mean()), abs=0.05)  # main: -7.63 (train mode)
    assert net.training and net.bn.training
    net.bn.eval()  # a mixed state, to check each module gets its own mode back
    ev = log_evidence(bn_model, bn_guide, x, 50, batch_size=16)
    assert float(ev.log_px.mean()) == pytest.approx(float(exact.mean()), abs=1e-3)
    assert float(ev.elbo.mean()) == pytest.approx(float(exact.mean()), abs=0.05)
    assert net.training and not net.bn.training
    net.train()
    with pyro.poutine.block():  # what train mode would have given: far below
        train_mode = -Trace_ELBO(num_particles=20).loss(bn_model, bn_guide, x) / len(x)
    assert train_mode < float(exact.mean()) - 1.0


def test_networks_found_through_methods_closures_and_the_store():
    class Holder:
        def __init__(self):
            self.enc = torch.nn.Dropout(0.5)

        def guide(self, x):
            return self.enc(x)

    holder, hidden = Holder(), torch.nn.BatchNorm1d(3)
    inner = torch.nn.Linear(2, 2)

    def closure(x):
        return inner(x)

    found = networks_of(holder.guide, closure, registered=False)
    assert any(m is holder.enc for m in found) and any(m is inner for m in found)
    pyro.module("hidden", hidden)  # reachable only through the param store
    assert any(m is hidden for m in networks_of(lambda x: x))
    with eval_mode(holder.guide):
        assert not holder.enc.training and not hidden.training
    assert holder.enc.training and hidden.training
