"""Evidence on every path a user's model can take: extra per-datapoint arguments, chunking, the
one-row probe (issue 15 item 12), and the k-hat verdict (items 8 and 9)."""

import math
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppgen.infer.batches import select_rows, slice_arguments
from ppgen.infer.evidence import khat_threshold, khat_untrusted, log_evidence, psis_khat
from ppgen.models.linear_gaussian import LinearGaussian


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


def test_exact_float32_guide_has_no_tail_and_is_trusted():
    """An exact-posterior guide in float32: the log weights differ only by rounding (measured
    spread up to 1.7e-5 nats here). Before the fix the 1e-9 cut-off let ArviZ fit that noise:
    k-hat = inf on some points and 26.7% of them reported untrusted."""
    lg = LinearGaussian.random(6, 3, noise=0.5, seed=0, dtype=torch.float32)
    x = lg.sample(30, seed=1)
    r = log_evidence(lg.model, lg.guide, x, 64)
    assert (r.khat == -math.inf).all()
    s = r.summary()
    assert s["khat_share_untrusted"] == 0.0 and s["khat_threshold"] == pytest.approx(1 - 1 / math.log10(64))
    assert torch.allclose(r.log_px, lg.log_evidence(x).double(), atol=1e-4, rtol=0)
    # The tolerance follows the arithmetic: the same float32 weights judged as float64 arithmetic
    # are not equal, and a real (inflated) guide's tail is still fitted.
    spread_noise = torch.linspace(0, 2e-5, 64, dtype=torch.float64) - 9.0
    assert psis_khat(spread_noise, torch.finfo(torch.float32).eps) == -math.inf
    assert psis_khat(spread_noise) > -math.inf
    wide = log_evidence(lg.model, lambda x: lg.mean_field_guide(x, inflate=2.0), x, 64)
    assert torch.isfinite(wide.khat).all()


def test_khat_threshold_follows_the_sample_size():
    """min(1 - 1/log10 S, 0.7) (Vehtari et al. 2024): 0.41 at S = 50, not the fixed 0.7."""
    assert khat_threshold(50) == pytest.approx(0.4114, abs=1e-4)
    assert khat_threshold(1000) == pytest.approx(2 / 3)
    assert khat_threshold(10_000) == 0.7 and khat_threshold(10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 10"):
        khat_threshold(9)
    k = torch.tensor([0.5, 0.3, -math.inf, math.nan, 0.75], dtype=torch.float64)
    assert khat_untrusted(k, 50).tolist() == [True, False, False, True, True]
    assert khat_untrusted(k, 5000).tolist() == [False, False, False, True, True]


def test_too_few_samples_for_khat_are_never_trusted():
    """K = 5 leaves k-hat NaN. Before the fix summary() counted NaN as trusted: share 0.0 for a
    3x-inflated guide."""
    lg = LinearGaussian.random(6, 3, noise=0.5, seed=0)
    x = lg.sample(30, seed=1)
    r = log_evidence(lg.model, lambda x: lg.mean_field_guide(x, inflate=3.0), x, 5)
    assert torch.isnan(r.khat).all()
    s = r.summary()
    assert s["khat_share_untrusted"] == 1.0 and s["khat_threshold"] is None


def test_summary_uses_the_sample_size_threshold():
    """At K = 50 a k-hat between 0.41 and 0.7 is untrusted (the fixed 0.7 let it pass)."""
    from ppgen.infer.evidence import EvidenceResult

    k = torch.tensor([0.2, 0.5, 0.6, 0.8], dtype=torch.float64)
    r = EvidenceResult(*(torch.zeros(4, dtype=torch.float64),) * 3, k, torch.zeros(4, dtype=torch.float64), {}, 50)
    s = r.summary()
    assert s["khat_share_untrusted"] == 0.75 and float((k > 0.7).double().mean()) == 0.25
