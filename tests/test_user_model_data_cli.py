"""``ppgen train model`` on data files of several aligned arrays, end to end through ``ppgen.cli.main``
in-process: the semi-supervised M2 of ``examples/pyro_models/ss_vae.py`` on a ``.pt`` dict
``{xs, ys, labelled}`` (images, one-hot labels, a boolean mask of the given labels), and a model
``model(x, mask)`` with a plate named ``rows`` on a ``.npz`` of two positional arrays.

Each run is checked against the Python path or an exact value: the CLI's losses equal
``train_svi``'s on the same split and seed, a resumed run equals the uninterrupted one, the
evidence equals an independent estimate that sums the class out exactly, samples follow the
model's mean, and ``ppgen evidence`` refuses a number it cannot get right.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ppgen.cli import main
from ppgen.runs import Run, config_from_dict, load_checkpoint
from ppgen.user_models import ModelDataConfig, ModelRunConfig, load_model_data, load_model_run

pytestmark = pytest.mark.usefixtures("one_thread")

SS_VAE = Path(__file__).resolve().parents[1] / "examples" / "pyro_models" / "ss_vae.py"
LABELS = ("ys", "labelled")


def _digits_file(path: Path, rows: int = 1797, fraction: float = 0.1, labels: bool = True) -> Path:
    """The first ``rows`` of the 1797 embedded digits (static binarization), 10% of their labels
    given: ``{xs, ys, labelled}`` (the mask from its own seed, so labelled rows land in every split)."""
    from ppgen import load_dataset

    d = load_dataset("digits", "static")
    xs = torch.cat([d.train, d.val, d.test])[:rows]
    y = torch.cat([d.train_labels, d.val_labels, d.test_labels])[:rows]
    labelled = torch.zeros(len(xs), dtype=torch.bool)
    labelled[torch.randperm(len(xs), generator=torch.Generator().manual_seed(1))[: round(fraction * len(xs))]] = True
    torch.save({"xs": xs, "ys": F.one_hot(y, 10).double(), "labelled": labelled} if labels else {"xs": xs}, path)
    return path


def _train_ss(data: Path, out: Path, epochs: int, *extra: str) -> int:
    return main(["train", "model", f"{SS_VAE}:model", "--guide", f"{SS_VAE}:guide", "--data", str(data),
                 "--estimator", "enum", "--out", str(out), "--epochs", str(epochs), "--batch-size", "50",
                 "--lr", "3e-3", "--no-progress", *extra])


def _fresh_ss_vae():
    spec = importlib.util.spec_from_file_location("ss_vae_python_path", SS_VAE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds its network under torch.manual_seed(0), as the CLI's import does
    return module


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in Run(run, resume=True).metrics() if "train_loss" in r]


def test_dict_file_keeps_labels_and_masks_and_drops_train_only_keys(tmp_path):
    path = tmp_path / "d.pt"
    x = torch.rand(50, 3, dtype=torch.float64)
    x[:, 0] = torch.arange(50)  # the row's number, to check that its label and flag stay with it
    torch.save({"x": x, "y": torch.arange(50) % 3, "mask": torch.arange(50) % 2 == 0}, path)
    data = load_model_data(ModelDataConfig(str(path), "none", train_only=("y", "mask")))
    assert data.train["x"].dtype == torch.float32  # only floating point is cast
    assert data.train["y"].dtype == torch.int64 and data.train["mask"].dtype == torch.bool
    assert set(data.val) == set(data.test) == {"x"} and set(data.train) == {"x", "y", "mask"}
    row = data.train["x"][:, 0].long()
    assert torch.equal(data.train["y"], row % 3) and torch.equal(data.train["mask"], row % 2 == 0)
    with pytest.raises(ValueError, match=r"lacks; its keys"):
        load_model_data(ModelDataConfig(str(path), "none", train_only=("labels",)))
    with pytest.raises(ValueError, match="every key"):
        load_model_data(ModelDataConfig(str(path), "none", train_only=("x", "y", "mask")))
    with pytest.raises(ValueError, match="built-in dataset"):
        ModelDataConfig("digits", train_only=("y",))


def test_semi_supervised_m2_from_a_dict_file(tmp_path, capsys):
    """M2 of ss_vae.py trained by ``ppgen train model`` on {xs, ys, labelled}: the Python path's
    numbers, resume, evidence against the class summed out exactly, samples, report."""
    data = _digits_file(tmp_path / "ss.pt", rows=600)
    once, mixed = tmp_path / "once", tmp_path / "mixed"
    assert _train_ss(data, once, 2, "--train-only", ",".join(LABELS)) == 0
    cfg = config_from_dict(ModelRunConfig, json.loads((once / "config.json").read_text()))
    split = load_model_data(cfg.data)
    assert split.train["labelled"].dtype == torch.bool and 0 < int(split.train["labelled"].sum()) < len(split.train["xs"])
    assert set(split.test) == {"xs"}  # evaluation calls model(xs): ys=None, labelled=None

    # The Python path on the same split and seed: the same loss, step for step and bit for bit.
    from ppgen import SVIConfig, train_svi

    m = _fresh_ss_vae()
    result = train_svi(m.model, m.guide, split.train, split.val,
                       SVIConfig(estimator="enum", epochs=2, batch_size=50, lr=3e-3, seed=0), progress=False)
    cli = [r for r in Run(once, resume=True).metrics() if "train_loss" in r]
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in cli]
    assert [r["val_elbo"] for r in result.history] == [r["val_elbo"] for r in cli]

    # Without --train-only, stopped after one epoch and resumed: training is the same (the option
    # changes only what evaluation passes), so the uninterrupted run's parameters and losses.
    assert _train_ss(data, mixed, 1) == 0
    assert _train_ss(data, mixed, 2, "--resume") == 0
    a, b = (load_checkpoint(p / "checkpoint.pt")["params"] for p in (once, mixed))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(once) == _losses(mixed)

    # Evidence: log p(x) of the test images, against log sum_k p(x, y=k) with the class summed out
    # exactly (ppgen.log_evidence of model(xs, one_hot(k)), y observed, for each k).
    assert main(["evidence", str(once), "--samples", "300", "--no-progress"]) == 0
    ev = json.loads((once / "evidence.json").read_text())
    assert ev["n"] == len(split.test["xs"]) == 60
    from ppgen import log_evidence

    model, guide, _, _ = load_model_run(once)
    xs = split.test["xs"]
    per_class = torch.stack([log_evidence(model, guide, (xs, F.one_hot(torch.full((len(xs),), k), 10).float()),
                                          300, seed=k).log_px for k in range(10)])
    summed = float(torch.logsumexp(per_class, 0).mean())
    # measured: IS (y drawn from the classifier) -29.2706 +- 0.0040, class summed out -29.2702
    assert abs(ev["log_px"] - summed) < 4.5 * ev["log_px_stderr"] + 0.005, (ev["log_px"], summed)
    assert ev["elbo"] <= ev["log_px"] + 3 * ev["log_px_stderr"]

    # Samples: the mean image of 3000 draws against the model's mean, E[sigmoid(decoder(z, y))].
    assert main(["sample", str(once), "--n", "3000", "--seed", "2"]) == 0
    draws = torch.load(once / "samples-3000.pt", weights_only=True)
    assert set(draws) == {"x"} and draws["x"].shape == (3000, 64)
    assert set(draws["x"].unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        z, y = torch.randn(100_000, m.Z_DIM, generator=g), F.one_hot(torch.randint(0, 10, (100_000,), generator=g), 10)
        mean = torch.sigmoid(model.__self__.decoder(torch.cat([z, y.float()], -1))).mean(0)
    z_scores = (draws["x"].mean(0) - mean) / (mean * (1 - mean) / 3000).sqrt().clamp_min(1e-3)
    assert z_scores.abs().max() < 4.5, z_scores.abs().max()

    assert main(["report", str(once), "--out", str(tmp_path / "report")]) == 0
    row = json.loads((tmp_path / "report" / "report.json").read_text())["rows"][0]
    assert row["family"] == "model" and row["is_log_px"] == pytest.approx(ev["log_px"])
    capsys.readouterr()

    # Without --train-only evaluation scores model(xs, ys, labelled), whose guide pins the given
    # labels: IS would estimate log p(x, y) in those rows, not log p(x). Refused, saying what to do.
    assert main(["evidence", str(mixed), "--samples", "50", "--no-progress"]) == 2
    err = capsys.readouterr().err
    pinned = int(load_model_data(ModelDataConfig(str(data), "none")).test["labelled"].sum())
    assert "probability 0" in err and f"'y' in {pinned} of 60" in err and "--train-only" in err
    assert "--drop-keys ys,labelled" in err
    assert not (mixed / "evidence.json").exists()
    # ... or evaluated as it is, without the label keys: the same weights, data and draws as `once`
    assert main(["evidence", str(mixed), "--samples", "300", "--drop-keys", ",".join(LABELS), "--no-progress"]) == 0
    assert json.loads((mixed / "evidence.json").read_text())["log_px"] == ev["log_px"]
    assert main(["evidence", str(mixed), "--samples", "10", "--drop-keys", "labels", "--no-progress"]) == 2
    assert "--drop-keys names ['labels']" in capsys.readouterr().err
    assert main(["evidence", str(mixed), "--samples", "10", "--drop-keys", "xs,ys,labelled", "--no-progress"]) == 2
    assert "would drop every key" in capsys.readouterr().err


def test_train_only_refuses_a_model_that_needs_the_keys(tmp_path, capsys):
    src = tmp_path / "needs_y.py"
    src.write_text(f"import sys; sys.path.insert(0, {str(SS_VAE.parent)!r})\n"
                   "from ss_vae import SSVAE\n"
                   "net = SSVAE()\n"
                   "def model(xs, ys, labelled): return net.model(xs, ys, labelled)\n"
                   "def guide(xs, ys, labelled): return net.guide(xs, ys, labelled)\n")
    data = _digits_file(tmp_path / "ss.pt")
    assert main(["train", "model", f"{src}:model", "--guide", f"{src}:guide", "--data", str(data), "--estimator",
                 "enum", "--out", str(tmp_path / "r"), "--epochs", "1", "--train-only", "ys,labelled",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot be called with only xs" in err and "default" in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_samples_leave_out_the_classifier_factor(tmp_path):
    """M2 with Kingma et al.'s classifier term (alpha 20, ``pyro.factor("classifier", ...)``): the
    factor is a training term, no observation, so ``ppgen sample`` draws only ``x`` (it used to add
    an empty ``classifier`` entry)."""
    src = tmp_path / "alpha.py"
    src.write_text(f"import sys; sys.path.insert(0, {str(SS_VAE.parent)!r})\n"
                   "import torch\nfrom ss_vae import SSVAE\n"
                   "torch.manual_seed(0)\nnet = SSVAE(aux_loss_multiplier=20.0)\n")
    run = tmp_path / "r"
    assert main(["train", "model", f"{src}:net.model", "--guide", f"{src}:net.guide", "--data",
                 str(_digits_file(tmp_path / "ss.pt", rows=300)), "--estimator", "enum", "--out", str(run),
                 "--epochs", "1", "--batch-size", "50", "--train-only", "ys,labelled", "--no-progress"]) == 0
    assert main(["sample", str(run), "--n", "8"]) == 0
    draws = torch.load(run / "samples-8.pt", weights_only=True)
    assert set(draws) == {"x"} and draws["x"].shape == (8, 64)


@pytest.mark.slow
def test_semi_supervised_cli_run_classifies_far_better_than_an_unsupervised_one(tmp_path):
    """10 epochs of M2 on the 1437 training digits, 10% labelled (alpha 0: the labels reach the
    classifier only through the generative model), against the same run on the images alone.
    Measured: 57.2% test accuracy against 21.7% (41.1% cluster-matched); chance is 10%."""
    from ppgen.models.m2 import cluster_accuracy

    semi, none = tmp_path / "semi", tmp_path / "none"
    assert _train_ss(_digits_file(tmp_path / "ss.pt"), semi, 10, "--train-only", ",".join(LABELS)) == 0
    assert _train_ss(_digits_file(tmp_path / "x.pt", labels=False), none, 10) == 0
    truth = load_model_data(ModelDataConfig(str(tmp_path / "ss.pt"), "none")).test  # same rows, labels kept
    y = truth["ys"].argmax(-1)
    acc = {}
    for name, run in (("semi", semi), ("none", none)):
        model, *_ = load_model_run(run)
        pred = model.__self__.classify(truth["xs"])
        acc[name] = (float((pred == y).float().mean()), cluster_accuracy(pred, y, 10))
    assert acc["semi"][0] > 0.45 and acc["semi"][0] > acc["none"][1] + 0.1, acc


MASKED = '''
import pyro, pyro.distributions as dist, torch
from pyro.distributions import constraints

def model(x, mask):
    W = pyro.param("W", lambda: 0.1 * torch.randn(4, 2, dtype=x.dtype))
    b = pyro.param("b", lambda: torch.zeros(4, dtype=x.dtype))
    log_s = pyro.param("log_s", lambda: torch.zeros((), dtype=x.dtype))
    with pyro.plate("rows", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + b, log_s.exp()).mask(mask).to_event(1), obs=x)

def guide(x, mask):
    A = pyro.param("A", lambda: torch.zeros(2, 4, dtype=x.dtype))
    c = pyro.param("c", lambda: torch.zeros(2, dtype=x.dtype))
    L = pyro.param("L", lambda: torch.eye(2, dtype=x.dtype), constraint=constraints.lower_cholesky)
    with pyro.plate("rows", x.shape[0]):
        pyro.sample("z", dist.MultivariateNormal((x * mask) @ A.T + c, scale_tril=L))
'''


def test_two_positional_arrays_in_an_npz_and_a_plate_not_named_data(tmp_path, capsys):
    """``numpy.savez(f, x, mask)``: ``model(x, mask)`` with its datapoints in ``pyro.plate("rows")``
    and a boolean mask of the observed coordinates; evidence against the exact marginal of the
    observed coordinates, ``N(b_o, (W W^T + s^2 I)_oo)``."""
    src = tmp_path / "masked.py"
    src.write_text(MASKED)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 2, generator=g), torch.randn(4, generator=g)
    x = torch.randn(600, 2, generator=g, dtype=torch.float64) @ w.T.double() + b + 0.5 * torch.randn(600, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(600, 4, generator=g) > 0.25
    mask[:, 0] = True  # every row observes something
    np.savez(tmp_path / "xm.npz", (x * mask).numpy(), mask.numpy())  # arr_0, arr_1: positional
    flags = ["train", "model", f"{src}:model", "--guide", f"{src}:guide", "--data", str(tmp_path / "xm.npz"),
             "--data-plate", "rows", "--batch-size", "40", "--lr", "0.05", "--no-progress"]
    once, twice = tmp_path / "once", tmp_path / "twice"
    assert main([*flags, "--out", str(once), "--epochs", "3"]) == 0
    assert main([*flags, "--out", str(twice), "--epochs", "2"]) == 0
    stored = json.loads((twice / "config.json").read_text())
    del stored["data"]["train_only"]  # a run started before the field existed resumes too
    (twice / "config.json").write_text(json.dumps(stored))
    assert main([*flags, "--out", str(twice), "--epochs", "3", "--resume"]) == 0
    a, b_ = (load_checkpoint(p / "checkpoint.pt")["params"] for p in (once, twice))
    assert all(torch.equal(a[k], b_[k]) for k in a) and _losses(once) == _losses(twice)
    assert _losses(once)[2] < _losses(once)[0]

    cfg = config_from_dict(ModelRunConfig, json.loads((once / "config.json").read_text()))
    test = load_model_data(cfg.data).test
    assert isinstance(test, tuple) and test[0].dtype == torch.float32 and test[1].dtype == torch.bool
    assert main(["evidence", str(once), "--samples", "500", "--no-progress"]) == 0
    ev = json.loads((once / "evidence.json").read_text())
    p = {k: v.double() for k, v in a.items()}
    cov = p["W"] @ p["W"].T + torch.exp(2 * p["log_s"]) * torch.eye(4, dtype=torch.float64)
    xt, mt = test[0].double(), test[1]
    exact = float(torch.stack([
        torch.distributions.MultivariateNormal(p["b"][o], cov[o][:, o]).log_prob(xi[o]) for xi, o in zip(xt, mt)
    ]).mean())
    # measured: IS -6.8443 +- 0.0016 against the exact -6.8459 (82% of coordinates observed)
    assert ev["n"] == 60 and abs(ev["log_px"] - exact) < 3 * ev["log_px_stderr"] + 2e-3, (ev["log_px"], exact)

    assert main(["sample", str(once), "--n", "8"]) == 0  # every coordinate drawn, masked ones too
    assert torch.load(once / "samples-8.pt", weights_only=True)["x"].shape == (8, 4)
    # AIS from the encoder on the positional data and plate 'rows' (BDMC needs one tensor: left out)
    assert main(["evidence", str(once), "--samples", "100", "--ais-steps", "100", "--ais-chains", "8",
                 "--ais-limit", "20", "--no-progress"]) == 0
    ev = json.loads((once / "evidence.json").read_text())
    exact20 = float(torch.stack([
        torch.distributions.MultivariateNormal(p["b"][o], cov[o][:, o]).log_prob(xi[o]) for xi, o in zip(xt[:20], mt[:20])
    ]).mean())
    assert ev["ais"]["n"] == 20 and "bdmc" not in ev
    assert abs(ev["ais"]["log_px"] - exact20) < 0.02, (ev["ais"]["log_px"], exact20)
    assert main([*flags, "--out", str(tmp_path / "bad"), "--epochs", "1", "--train-only", "arr_1"]) == 2
    assert "tuple of positional arrays" in capsys.readouterr().err


def test_drop_keys_refusals():
    from ppgen.user_data import drop_keys

    def model(xs, ys):
        pass

    def optional(xs, ys=None):
        pass

    x, y = torch.zeros(4, 3), torch.zeros(4, 2)
    assert set(drop_keys(optional, {"xs": x, "ys": y}, ("ys",), "the split")) == {"xs"}
    assert drop_keys(model, {"xs": x, "ys": y}, (), "the split").keys() == {"xs", "ys"}
    with pytest.raises(ValueError, match="cannot be called with only xs.*default"):
        drop_keys(model, {"xs": x, "ys": y}, ("ys",), "the split")
    with pytest.raises(ValueError, match="--drop-keys ys names keys of a dict, but the split holds a single array"):
        drop_keys(model, x, ("ys",), "the split")
