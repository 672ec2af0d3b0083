"""Evidence on every path a user's model can take: extra per-datapoint arguments, chunking, the
one-row probe (issue 15 item 12), and the k-hat verdict (items 8 and 9)."""

from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer.batches import select_rows, slice_arguments
from ppgen.infer.evidence import log_evidence


def shifted_model(x, y, noise, offset=None):
    """z ~ N(y, 1), x ~ N(z + offset, noise): ``y`` and ``offset`` per datapoint, ``noise`` global."""
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(y, 1.0))
        pyro.sample("x", dist.Normal(z + offset, noise[0]), obs=x)


def shifted_posterior(x, y, noise, offset=None):
    """The exact posterior guide: every importance weight equals p(x_n)."""
    s2 = noise[0] ** 2
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(((x - offset) + y * s2) / (1 + s2), (s2 / (1 + s2)).sqrt()))


@pytest.mark.parametrize("batch_size", [7, 40, 100])
def test_per_datapoint_arguments_follow_their_rows(batch_size):
    """Before the fix: ValueError "Shape mismatch inside plate('data') ... 1 vs 40" at every batch size."""
    g = torch.Generator().manual_seed(0)
    n = 40
    x, y, offset = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    noise = torch.tensor([0.8], dtype=torch.float64)  # dim 0 of length 1, not N: passed unchanged
    exact = dist.Normal(y + offset, (1 + noise[0] ** 2).sqrt()).log_prob(x)
    r = log_evidence(shifted_model, shifted_posterior, x, 12, y, noise, batch_size=batch_size, offset=offset)
    assert torch.allclose(r.log_px, exact, atol=1e-12, rtol=0)  # a misaligned row would be off by O(1)


def test_slice_arguments_rule():
    class Pair(NamedTuple):
        a: torch.Tensor
        b: int

    n = 5
    y, w = torch.arange(5.0), torch.ones(3, 2)
    args, kwargs = slice_arguments(
        (y, w, 2.5, [y, "tag"], Pair(y, 4)), {"mask": {"m": y > 1}, "scalar": torch.tensor(1.0)}, n, slice(1, 3)
    )
    assert torch.equal(args[0], torch.tensor([1.0, 2.0])) and args[1] is w and args[2] == 2.5
    assert torch.equal(args[3][0], torch.tensor([1.0, 2.0])) and args[3][1] == "tag" and isinstance(args[3], list)
    assert isinstance(args[4], Pair) and torch.equal(args[4].a, torch.tensor([1.0, 2.0])) and args[4].b == 4
    assert torch.equal(kwargs["mask"]["m"], torch.tensor([False, True])) and kwargs["scalar"].ndim == 0
    perm = torch.tensor([4, 0])
    assert torch.equal(select_rows(y, n, perm), torch.tensor([4.0, 0.0]))
    with pytest.raises(TypeError, match="index must be a slice or a 1-D integer"):
        slice_arguments((y,), {}, n, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="num_rows must be a non-negative integer"):
        slice_arguments((y,), {}, -1, slice(0, 1))
