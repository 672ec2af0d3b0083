"""Noise ladders and Langevin step sizes set from the data.

The rules of Song & Ermon (2020), *Improved techniques for training score-based generative
models*, for annealed Langevin (:func:`ppgen.score.sampling.annealed_langevin`), combined by
:func:`data_noise_ladder`:

- technique 1: ``sigma_1`` = the largest Euclidean distance between two training points
  (:func:`max_pairwise_distance`, on a seeded subsample: a lower bound of the full set's);
- technique 2: a geometric ladder whose ratio ``gamma = sigma_{i-1} / sigma_i`` makes
  ``Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) ~ 0.5``: a draw of
  ``N(0, sigma_i^2 I)`` lands in the 3-sd shell of ``N(0, sigma_{i-1}^2 I)`` half of the time
  (:func:`level_overlap`, :func:`overlap_ratio`; it bounds ``gamma`` only for ``D >= 5``);
- technique 4: with ``T`` steps per level, step ``eta_i = eps sigma_i^2 / sigma_L^2`` with ``eps``
  minimizing ``f = (1 - a)^{2T} (gamma^2 - 2 / (2 - a)) + 2 / (2 - a)``, ``a = eps / sigma_L^2``,
  the ratio of the sampler's variance after ``T`` steps to ``sigma_i^2`` for Gaussian data, so
  that it is as close to 1 as it gets (:func:`langevin_variance_ratio`, :func:`langevin_step_size`).

:func:`resolve_ladder` fills a :class:`ppgen.score.ScoreConfig`'s data-dependent fields by these rules and
:func:`ladder_record` describes them (ladder.json). The preconditioning of Karras et al. (2022) (:mod:`ppgen.score.networks`) takes the data's scale
from :func:`data_moments`: the mean and standard deviation of all coordinates pooled.

Reproduced in the tests: CIFAR-10 (``D = 3072``, ``sigma_L = 0.01``, ``gamma = 1.0376``, ``T = 5``)
gives the paper's ``eps = 6.2e-6``, CelebA 64 its ``3.3e-6``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch

if TYPE_CHECKING:
    from ppgen.score.loop import ScoreConfig

#: levels of a data ladder in D <= 4, where technique 2 bounds no ratio
LOW_DIM_LEVELS = 20

__all__ = ["LOW_DIM_LEVELS", "NoiseLadder", "data_moments", "data_noise_ladder", "langevin_step_size", "langevin_variance_ratio", "level_overlap",
           "ladder_record", "max_pairwise_distance", "overlap_ratio", "resolve_ladder"]


def max_pairwise_distance(x: torch.Tensor, subsample: int = 2000, seed: int = 0) -> float:
    """Largest Euclidean distance between two rows of ``x`` (N, D) (Song & Ermon 2020, technique 1).

    Computed exactly over ``min(N, subsample)`` rows drawn without replacement by a generator
    seeded with ``seed`` (all rows when ``N <= subsample``), in chunks of 512 rows on ``x``'s
    device; on a subsample it is a lower bound of the full set's maximum.
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"x must be a tensor of shape (N, D) with N >= 2, got {getattr(x, 'shape', type(x))}")
    if not isinstance(subsample, int) or subsample < 2:
        raise ValueError(f"subsample must be an integer >= 2, got {subsample!r}")
    if x.shape[0] > subsample:
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:subsample].to(x.device)]
    x = x.double()
    best = torch.zeros((), dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[0], 512):
        best = torch.maximum(best, torch.cdist(x[i : i + 512], x).max())
    return float(best)


def data_moments(x: torch.Tensor) -> tuple[float, float]:
    """``(mu, sigma_data)``: the mean and standard deviation (divisor N D) of all entries of ``x``
    (N, D) pooled, computed in float64 -- the isotropic Gaussian ``N(mu, sigma_data^2 I)`` closest to
    the data, whose noised score the preconditioned nets return at ``F = 0`` (Karras et al. 2022,
    ``sigma_data``)."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.numel() < 2:
        raise ValueError(f"x must be a tensor of shape (N, D) with at least 2 entries, got {getattr(x, 'shape', type(x))}")
    x = x.double()
    mean = x.mean()
    std = float((x - mean).pow(2).mean().sqrt())
    if not std > 0:
        raise ValueError("the training data are constant (standard deviation 0): sigma_data is undefined; give --sigma-data")
    return float(mean), std


def _phi(t: float) -> float:
    return 0.5 * (1.0 + math.erf(t / math.sqrt(2.0)))


def level_overlap(gamma: float, dim: int) -> float:
    """``Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma)`` (Song & Ermon 2020,
    technique 2): the probability that ``||x||``, ``x ~ N(0, sigma^2 I_D)``, lies within 3 standard
    deviations of the norm of ``N(0, (gamma sigma)^2 I_D)``, with ``||x||`` taken as normal."""
    return _phi(math.sqrt(2 * dim) * (gamma - 1) + 3 * gamma) - _phi(math.sqrt(2 * dim) * (gamma - 1) - 3 * gamma)


def overlap_ratio(dim: int, target: float = 0.5) -> float:
    """The ratio ``gamma > 1`` with :func:`level_overlap` ``(gamma, dim) = target`` (bisection).

    For ``dim >= 8`` it is ``sqrt(2D) / (sqrt(2D) - 3)`` to 1e-8 (where the lower argument is 0
    the upper is ``6 gamma > 6``). For ``dim <= 4`` the overlap stays above ``Phi(3) - Phi(-3)`` for every ratio, so no ratio is
    too large by this rule and ``inf`` is returned."""
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}")
    if not 0.0 < target < level_overlap(1.0, dim):
        raise ValueError(f"target overlap must be in (0, {level_overlap(1.0, dim):.4f}), got {target!r}")
    if dim <= 4:
        return math.inf
    lo, hi = 1.0, 2.0
    while level_overlap(hi, dim) > target:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if level_overlap(mid, dim) > target else (lo, mid)
    return lo


def langevin_variance_ratio(a: float, gamma: float, steps: int) -> float:
    """Song & Ermon (2020), technique 4: for data ``N(0, sigma^2 I)`` and a chain that starts at level
    ``gamma sigma``, the variance after ``steps`` Langevin steps of size ``a sigma^2`` over ``sigma^2``:
    ``(1 - a)^{2T} (gamma^2 - 2 / (2 - a)) + 2 / (2 - a)``, with ``a = eps / sigma_L^2``."""
    c = 2.0 / (2.0 - a)
    return (1.0 - a) ** (2 * steps) * (gamma**2 - c) + c


def langevin_step_size(sigma_min: float, gamma: float, steps: int) -> float:
    """``eps`` of technique 4: the step at the smallest level ``sigma_min`` whose
    :func:`langevin_variance_ratio` is closest to 1 (it exceeds 1 for every ``a`` in (0, 1)):
    a grid over ``log a`` refined by golden-section search."""
    if not (isinstance(gamma, (int, float)) and 1.0 < gamma < math.inf):
        raise ValueError(f"gamma (ratio of adjacent noise levels) must be a finite number > 1, got {gamma!r}; "
                         "the step-size rule needs at least 2 levels")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps (Langevin steps per level) must be a positive integer, got {steps!r}")
    f = lambda u: langevin_variance_ratio(math.exp(u), gamma, steps)  # noqa: E731
    grid = [math.log(1e-9) + k * (math.log(0.999) - math.log(1e-9)) / 400 for k in range(401)]
    k = min(range(401), key=lambda j: f(grid[j]))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, 400)]
    r = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        m1, m2 = hi - r * (hi - lo), lo + r * (hi - lo)
        lo, hi = (lo, m2) if f(m1) < f(m2) else (m1, hi)
    return math.exp(0.5 * (lo + hi)) * sigma_min**2


class NoiseLadder(NamedTuple):
    """A noise ladder and the rule values behind it (:func:`data_noise_ladder`)."""

    sigma_max: float  # technique 1 (or as given)
    n_sigmas: int  # technique 2 (or as given)
    gamma: float  # sigma_{i-1} / sigma_i of the geometric ladder
    overlap: float  # level_overlap(gamma, D) actually met (>= target when the rule set n_sigmas)


def data_noise_ladder(x: torch.Tensor, sigma_min: float, sigma_max: Optional[float] = None,
                      n_sigmas: Optional[int] = None, subsample: int = 2000, target: float = 0.5,
                      seed: int = 0) -> NoiseLadder:
    """The geometric ladder of Song & Ermon (2020) for training data ``x`` (N, D): ``sigma_max`` the
    largest pairwise distance (technique 1, on ``subsample`` rows) unless given; ``n_sigmas`` the
    fewest levels whose ratio ``gamma = (sigma_max / sigma_min)^(1 / (n - 1))`` meets
    ``level_overlap(gamma, D) >= target`` (technique 2) unless given. For ``D <= 4`` that rule
    sets no bound and 20 levels are used (on a 2-D three-component mixture with exact scores, 20
    levels of 20 steps put the mode weights within 0.03; 10 levels within 0.06)."""
    where = "" if sigma_max is None else " (given)"
    if sigma_max is None:
        sigma_max = max_pairwise_distance(x, subsample, seed)
        where = " (the largest distance between two training points)"
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}{where}")
    if sigma_min == sigma_max and n_sigmas is None:
        n_sigmas = 1
    if n_sigmas is None:
        g = overlap_ratio(x.shape[1], target)
        n_sigmas = LOW_DIM_LEVELS if math.isinf(g) else math.ceil(math.log(sigma_max / sigma_min) / math.log(g) - 1e-9) + 1
    gamma = (sigma_max / sigma_min) ** (1.0 / (n_sigmas - 1)) if n_sigmas > 1 else 1.0  # 1: one level
    return NoiseLadder(float(sigma_max), int(n_sigmas), gamma, level_overlap(gamma, x.shape[1]))


# --------------------------------------------------------------------------- a run's config


def resolve_ladder(config: "ScoreConfig", train: torch.Tensor) -> tuple["ScoreConfig", Optional[NoiseLadder]]:
    """``config`` with ``sigma_max``/``n_sigmas`` set from training data ``train`` (N, D) where None
    (Song & Ermon 2020, techniques 1-2; :func:`ppgen.score.ladder.data_noise_ladder`), and with
    ``precondition``, ``sigma_data``/``data_mean`` where None (:func:`data_moments`);
    and the ladder's rule values (None for noise-free objectives, which have no ladder).
    Deterministic: the subsample is seeded by ``split_seed``, so a resumed run resolves to the same ladder."""
    if not config.conditional:
        return config, None
    ladder = data_noise_ladder(train, config.sigma_min, config.sigma_max, config.n_sigmas, config.ladder_subsample,
                               seed=config.split_seed)
    config = dataclasses.replace(config, sigma_max=ladder.sigma_max, n_sigmas=ladder.n_sigmas)
    if config.precondition and (config.sigma_data is None or config.data_mean is None):
        mean, std = data_moments(train)
        config = dataclasses.replace(config, sigma_data=config.sigma_data or std,
                                     data_mean=mean if config.data_mean is None else config.data_mean)
    if config.loss_weight is None:
        config = dataclasses.replace(config, loss_weight="edm" if config.precondition else "sigma2")
    if config.precondition and config.data_range is None and config.image_shape is not None:  # toys: unbounded
        config = dataclasses.replace(config, data_range=(float(train.min()), float(train.max())))
    return config, ladder


def ladder_record(asked: "ScoreConfig", ladder: NoiseLadder, n_train: int, resolved: Optional["ScoreConfig"] = None) -> dict:
    """The ladder of config ``asked`` (before :func:`resolve_ladder`) and the rules behind it, as
    written to ladder.json: ``sigma_max, n_sigmas, gamma, overlap, sigma_min, steps_per_level, eps,
    rules``, and ``sigma_data, data_mean`` of the ``resolved`` config when it is preconditioned."""
    m = min(n_train, asked.ladder_subsample)
    rules = {"sigma_max": f"technique 1: largest pairwise distance of {m} of {n_train} training points"
                          if asked.sigma_max is None else "given",
             "n_sigmas": "technique 2: fewest levels with overlap >= 0.5" if asked.n_sigmas is None else "given",
             "eps": "technique 4: variance ratio closest to 1" if asked.eta is None else "eta * sigma_min^2"}
    done = dataclasses.replace(asked, sigma_max=ladder.sigma_max, n_sigmas=ladder.n_sigmas)
    pre = {}
    if resolved is not None and resolved.precondition:
        rules["sigma_data"] = "given" if asked.sigma_data is not None else f"std of the {n_train} training points, pooled"
        rules["data_mean"] = "given" if asked.data_mean is not None else f"mean of the {n_train} training points, pooled"
        pre = {"sigma_data": resolved.sigma_data, "data_mean": resolved.data_mean, "data_range": resolved.data_range}
    return {**ladder._asdict(), "sigma_min": asked.sigma_min, "steps_per_level": done.steps,
            "eps": done.step_size(), **pre, "rules": rules}
