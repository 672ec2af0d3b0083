"""ppgen.loop_state: the checkpoint/resume, interrupt and non-finite policies the GAN and score loops share."""

import math

import pytest
import torch
from torch import nn

from ppgen.ema import EMA
from ppgen.loop_state import LoopState, check_finite, interrupt
from ppgen.runs import Interrupted, Run


def _parts(seed: int):
    torch.manual_seed(seed)
    net = nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()  # Adam moments that a resume must restore
    return net, opt, EMA(net, 0.9), torch.Generator().manual_seed(seed)


def test_interrupt_checkpoints_and_resume_restores_everything(tmp_path):
    net, opt, ema, noise = _parts(0)
    run = Run(tmp_path / "run")
    run.save_config({})
    for epoch in (1, 2, 3):
        run.log({"epoch": epoch, "train_loss": float(epoch)})
    saved = LoopState({"net": net, "optim": opt}, noise, ema)
    with pytest.raises(Interrupted, match=r"SIGINT: stopped in epoch 3; checkpoint saved in .*--resume"):
        interrupt("SIGINT", "in epoch 3", run, lambda: saved.state(2, batch=5))
    after = torch.randn(6, generator=noise)  # what the noise stream draws next
    next_global = torch.rand(3)  # ... and torch's global stream

    net2, opt2, ema2, noise2 = _parts(1)  # other weights, moments, average and streams
    restored = LoopState({"net": net2, "optim": opt2}, noise2, ema2)
    start, first, history = restored.resume(Run(tmp_path / "run", resume=True), 0)
    assert (start, first) == (2, 5)
    assert [r["epoch"] for r in history] == [1, 2]
    assert [r["epoch"] for r in Run(tmp_path / "run", resume=True).metrics()] == [1, 2]  # rank 0 truncated epoch 3
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"])
    assert all(torch.equal(a, b) for a, b in zip(ema.averaged().parameters(), ema2.averaged().parameters()))
    assert torch.equal(torch.randn(6, generator=noise2), after)
    assert torch.equal(torch.rand(3), next_global)


def test_resume_without_a_checkpoint_or_run_starts_afresh(tmp_path):
    net, opt, _, noise = _parts(0)
    saved = LoopState({"net": net, "optim": opt}, noise)
    assert saved.resume(None, 0) == (0, 0, [])
    assert saved.resume(Run(tmp_path / "new"), 0) == (0, 0, [])  # not resuming
    assert "ema" not in saved.state(1) and saved.state(1)["epoch"] == 1


def test_interrupt_without_a_writer_saves_nothing(tmp_path):
    with pytest.raises(Interrupted) as err:
        interrupt("SIGTERM", "at epoch 2, batch 3", None, lambda: pytest.fail("a process that does not write saved"))
    assert str(err.value) == "SIGTERM: stopped at epoch 2, batch 3"


def test_check_finite_reads_the_sums_or_names_the_first_bad_one(tmp_path):
    assert check_finite(torch.tensor([1.5, -2.0]), ("a", "b"), 1, None, 0, "") == [1.5, -2.0]
    assert check_finite(torch.tensor(0.25), ("loss",), 1, None, 0, "") == [0.25]  # a 0-d sum
    sums = torch.tensor([1.0, math.inf, math.nan])
    with pytest.raises(FloatingPointError, match=r"^b became inf in epoch 4; training stopped and no checkpoint was "
                                                 r"written yet\. Lower it\.$"):
        check_finite(sums, ("a", "b", "c"), 4, None, 0, "Lower it.")
    with pytest.raises(FloatingPointError, match="rank 0 names the last good checkpoint"):
        check_finite(sums, ("a", "b", "c"), 4, None, 1, "")
    run = Run(tmp_path / "run")
    run.save_checkpoint({"epoch": 3})
    with pytest.raises(FloatingPointError, match=r"last good checkpoint is .*checkpoint\.pt \(end of epoch 3\)"):
        check_finite(sums, ("a", "b", "c"), 4, run, 0, "")
