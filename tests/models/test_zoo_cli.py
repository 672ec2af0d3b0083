"""`ppgen train vae` with the zoo flags end to end; `ppgen train m2`."""

import json

import pyro
import torch
from pyro import poutine

from ppgen.cli import main
from ppgen.train import load_vae


def test_train_vae_iaf_with_warmup_round_trips_through_the_run_directory(tmp_path, capsys):
    out = tmp_path / "iaf"
    rc = main(["train", "vae", "--posterior", "iaf", "--flows", "2", "--kl-warmup", "2", "--latent-dim", "4",
               "--hidden", "32", "--epochs", "2", "--batch-size", "128", "--out", str(out), "--no-progress",
               "--no-download"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["posterior"] == "iaf" and config["model"]["kl_warmup"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "train_loss" in r] == [1, 2]
    vae, _, _ = load_vae(out)
    x = (torch.rand(3, 64) > 0.5).float()
    # Every learned parameter came back: the flow's weights equal the checkpoint's.
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    flow_keys = [k for k in ckpt["params"] if k.startswith("posterior$$$")]
    assert flow_keys
    store = pyro.get_param_store()
    for k in flow_keys:
        assert torch.equal(store._params[k].detach(), ckpt["params"][k])
    tr = poutine.trace(vae.guide).get_trace(x)
    assert torch.isfinite(tr.nodes["z"]["fn"].log_prob(tr.nodes["z"]["value"])).all()


def test_grey_level_likelihood_refuses_binarized_data_and_bernoulli_refuses_grey(tmp_path, capsys):
    rc = main(["train", "vae", "--likelihood", "cb", "--epochs", "1", "--out", str(tmp_path / "a"),
               "--no-progress", "--no-download"])
    assert rc == 2 and "--binarize none" in capsys.readouterr().err
    rc = main(["train", "vae", "--binarize", "none", "--epochs", "1", "--out", str(tmp_path / "b"),
               "--no-progress", "--no-download"])
    assert rc == 2 and "other than 0 and 1" in capsys.readouterr().err
    rc = main(["train", "vae", "--posterior", "fullcov", "--free-bits", "0.5", "--epochs", "1",
               "--out", str(tmp_path / "c"), "--no-progress", "--no-download"])
    assert rc == 2 and "diag" in capsys.readouterr().err


def test_train_cb_vae_on_grey_levels_has_a_proper_density(tmp_path):
    out = tmp_path / "cb"
    rc = main(["train", "vae", "--likelihood", "cb", "--binarize", "none", "--free-bits", "0.1",
               "--latent-dim", "4", "--hidden", "32", "--epochs", "1", "--out", str(out), "--no-progress",
               "--no-download"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["val_elbo"])) for r in records if "val_elbo" in r)
