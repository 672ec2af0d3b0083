"""ppgen.ema.EMA against the closed form of the moving average, with and without warm-up, and
its resume from a state_dict."""

import copy

import pytest
import torch
from torch import nn

from ppgen.ema import EMA


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(dtype)


def _random_step(net, gen):
    """Stand-in for an optimizer step: new weights w_i; also moves the batch-norm buffers."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    net.train()(torch.randn(5, 3, generator=gen, dtype=next(net.parameters()).dtype))


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ema_equals_closed_form(dtype):
    """a_n = sum_i (1-d) d^(n-i) w_i + d^n w_0 within 1e-6 after n = 40 updates."""
    net, gen, d, n = _net(dtype), torch.Generator().manual_seed(1), 0.9, 40
    ema = EMA(net, d)
    ws = [_flat(net).double()]
    for _ in range(n):
        _random_step(net, gen)
        ema.update(net)
        ws.append(_flat(net).double())
    exact = d ** n * ws[0] + sum((1 - d) * d ** (n - i) * ws[i] for i in range(1, n + 1))
    assert torch.allclose(_flat(ema.averaged()).double(), exact, atol=1e-6, rtol=0)
    # buffers are copied, not averaged
    for b, mb in zip(ema.averaged().buffers(), net.buffers()):
        assert torch.equal(b, mb)
    assert ema.num_updates == n


def test_ema_warmup_closed_form():
    """With warm-up, d_t = min(d, (1+t)/(10+t)): the product form of the recursion."""
    net, gen, d, n = _net(torch.float64), torch.Generator().manual_seed(2), 0.8, 50
    ema = EMA(net, d, warmup=True)
    ds = [min(d, (1 + t) / (10 + t)) for t in range(n)]
    assert ds[0] == pytest.approx(0.1) and ds[-1] == d and ds[5] < d
    ws = [_flat(net)]
    for _ in range(n):
        _random_step(net, gen)
        ema.update(net)
        ws.append(_flat(net))
    keep = lambda lo: torch.tensor(ds[lo:], dtype=torch.float64).prod()  # prod_{t >= lo} d_t
    exact = keep(0) * ws[0] + sum((1 - ds[i - 1]) * keep(i) * ws[i] for i in range(1, n + 1))
    assert torch.allclose(_flat(ema.averaged()), exact, atol=1e-10, rtol=0)


def test_ema_resume_continues_identically():
    net, gen = _net(), torch.Generator().manual_seed(3)
    ema = EMA(net, 0.99, warmup=True)
    for _ in range(7):
        _random_step(net, gen)
        ema.update(net)
    saved = copy.deepcopy(ema.state_dict())
    other_net = _net()
    with torch.no_grad():
        for p in other_net.parameters():
            p.add_(1.0)  # the resumed EMA starts from different weights: all must come from the state
    resumed = EMA(other_net, 0.99, warmup=True)
    resumed.load_state_dict(saved)
    for _ in range(5):
        _random_step(net, gen)
        ema.update(net)
        resumed.update(net)
    assert resumed.num_updates == ema.num_updates == 12
    for a, b in zip(ema.averaged().state_dict().values(), resumed.averaged().state_dict().values()):
        assert torch.equal(a, b)
    # the state round-trips through a weights_only checkpoint
    import io
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["num_updates"] == 12 and torch.equal(loaded["module"]["0.weight"], ema.averaged()[0].weight)


def test_ema_copy_to_and_isolation():
    net, gen = _net(), torch.Generator().manual_seed(4)
    ema = EMA(net, 0.5)
    _random_step(net, gen)
    ema.update(net)
    target = _net()
    ema.copy_to(target)
    assert torch.equal(_flat(target), _flat(ema.averaged()))
    assert not any(p.requires_grad for p in ema.averaged().parameters()) and not ema.averaged().training
    before = _flat(ema.averaged()).clone()
    _random_step(net, gen)  # the live net moving does not move the average until update()
    assert torch.equal(_flat(ema.averaged()), before)


def test_ema_refusals():
    net = _net()
    with pytest.raises(ValueError, match="decay must be a number in \\[0, 1\\)"):
        EMA(net, 1.0)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        EMA(torch.zeros(3), 0.9)
    ema = EMA(net, 0.9)
    with pytest.raises(ValueError, match="does not match the EMA's architecture"):
        ema.update(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="decay=0.8"):
        ema.load_state_dict(EMA(net, 0.8).state_dict())
