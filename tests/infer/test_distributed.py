"""Data-parallel SVI: two gloo processes under torchrun give the single-process result."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import sys
    import pyro, pyro.distributions as dist, torch
    from torch import nn
    from ppgen.infer.svi import SVIConfig, train_svi
    from ppgen.devices import distributed, leave_process_group

    torch.manual_seed(0)
    x = torch.randn(96, 3) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0], [0.3, 0.0, 1.0]])
    encoder = nn.Linear(3, 2)

    def model(x):
        w = pyro.param("w", torch.full((2, 3), 0.1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w, 0.5).to_event(1), obs=x)

    def guide(x):  # a point-mass amortized guide: the loss has no sampling noise
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(encoder(x)).to_event(1))

    res = train_svi(model, guide, x, None, SVIConfig(epochs=2, batch_size=16, lr=0.01), progress=False)
    if distributed().rank == 0:
        state = {k: v.detach() for k, v in pyro.get_param_store().named_parameters()}
        state["loss"] = torch.tensor([h["train_loss"] for h in res.history])
        torch.save(state, sys.argv[1])
    leave_process_group(wait=True)
    """
)


def _run(cmd, tmp_path):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    _run([sys.executable, str(script), str(tmp_path / "one.pt")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), str(tmp_path / "two.pt")], tmp_path)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k
    assert not torch.allclose(one["w"], torch.full((2, 3), 0.1))  # training moved the weights


INTERRUPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import pyro, pyro.distributions as dist, torch
    from ppgen.devices import distributed, leave_process_group
    from ppgen.infer.svi import SVIConfig, train_svi
    from ppgen.runs import Interrupted, Run

    rank = distributed().rank
    x = torch.randn(96, 3, generator=torch.Generator().manual_seed(0))

    def model(x):
        w = pyro.param("w", torch.full((3,), 0.1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(w, 1.0).to_event(1), obs=x)

    def guide(x):
        pass

    calls = {"n": 0}

    def signal_rank_1_only(batch):  # a signal that reaches one process only, in its 3rd step
        # (the first call is train_svi's registration pass on the first batch)
        calls["n"] += 1
        if rank == 1 and calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return batch

    run = Run(sys.argv[1], overwrite=True) if rank == 0 else None
    try:
        train_svi(model, guide, x, None, SVIConfig(epochs=2, batch_size=16, lr=0.01), run=run,
                  transform=signal_rank_1_only, progress=False)
        stopped = None
    except Interrupted as err:
        stopped = str(err)
    with open(f"{sys.argv[1]}-rank{rank}.json", "w") as f:
        json.dump({"stopped": stopped, "steps": calls["n"]}, f)
    leave_process_group(wait=True)
    """
)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(INTERRUPT)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(script), str(tmp_path / "run")], tmp_path)
    ranks = [json.loads((tmp_path / f"run-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # both left after the 3rd step
    assert "checkpoint saved" in ranks[0]["stopped"] and "another process" in ranks[0]["stopped"]
    assert ranks[1]["stopped"].startswith("SIGINT")
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (int(ckpt["step"]), int(ckpt["batch"])) == (3, 3)
