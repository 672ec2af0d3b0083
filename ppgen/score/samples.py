"""Samples, figures and metrics samplers of trained score runs (:mod:`ppgen.score.loop`).

:func:`sample_score` draws from a score net by (annealed) Langevin dynamics with the run's
settings; :func:`write_figures` and :func:`sample_run` turn draws into a PNG (an image grid, or a
2-D scatter with the learned score field); :func:`run_samples` is the score family's entry of
``ppgen.metrics.RUN_SAMPLERS``. Sampling uses the EMA weights when the run kept them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ppgen.data import DataConfig
from ppgen.plots import save_figure
from ppgen.runs import Run
from ppgen.score.loop import ScoreConfig, ScoreRun, load_data, load_score
from ppgen.score.sampling import annealed_langevin, langevin

__all__ = ["sample_score", "plot_toy_field", "write_figures", "sample_run", "run_samples"]


def sample_score(
    net: nn.Module,
    config: ScoreConfig,
    n: int,
    lo: torch.Tensor,
    hi: torch.Tensor,
    steps: Optional[int] = None,
    keep_every: int = 0,
    seed: int = 0,
    mean: Optional[torch.Tensor] = None,
):
    """Langevin samples from a trained score net ``(n, D)``.

    Noise-conditional nets use annealed Langevin over ``config.sigmas`` with step
    :meth:`ScoreConfig.step_size` at the smallest level (and the final denoising step if
    ``config.denoise``), started at ``mean + sigma_max z`` (init ``gaussian``: about the data noised
    at the top level) or uniformly in the data's box ``[lo, hi]`` (init ``uniform``, the default of
    noise-free objectives, which run plain Langevin).

    :param lo, hi: ``(D,)`` the training data's coordinate-wise bounds.
    :param steps: steps per level (default ``config.steps``).
    :param mean: ``(D,)`` the training data's mean (default ``(lo + hi) / 2``).
    :returns: :class:`ppgen.score.sampling.LangevinResult` ``(x (n, D), trajectory)``.
    """
    device = next(net.parameters()).device
    steps = steps or config.steps
    g = torch.Generator(device=device).manual_seed(seed)
    lo, hi = lo.to(device), hi.to(device)
    if (config.init or ("gaussian" if config.conditional else "uniform")) == "gaussian":
        centre = (lo + hi) / 2 if mean is None else mean.to(device)
        x0 = centre + config.sigma_max * torch.randn(n, lo.shape[0], generator=g, device=device)
    else:
        x0 = lo + (hi - lo) * torch.rand(n, lo.shape[0], generator=g, device=device)
    eta = config.step_size(steps)
    if config.conditional:
        return annealed_langevin(net, x0, config.sigmas.to(device), eta, steps, denoise=config.denoise,
                                 keep_every=keep_every, generator=g)
    return langevin(net, x0, eta, steps, keep_every=keep_every, generator=g)


def plot_toy_field(net: nn.Module, config: ScoreConfig, samples: torch.Tensor, data: torch.Tensor, path: Path) -> Path:
    """Quiver plot of the learned score (at the smallest noise level) over data and Langevin samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = float(data.abs().max()) * 1.15
    g = torch.linspace(-lim, lim, 25)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    device = next(net.parameters()).device
    with torch.no_grad():
        args = (torch.full((len(grid),), config.sigma_min, device=device),) if config.conditional else ()
        s = net(grid.to(device), *args).cpu()
    s = s / (s.norm(dim=-1, keepdim=True) + 1e-8) * s.norm(dim=-1, keepdim=True).clamp(max=1).pow(0.5)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=110)
    axes[0].scatter(*data[:2000].T, s=2, alpha=0.3, c="tab:gray")
    axes[0].quiver(grid[:, 0], grid[:, 1], s[:, 0], s[:, 1], color="tab:blue", angles="xy")
    axes[0].set_title(f"learned score ({config.objective}), data in grey")
    axes[1].scatter(*samples[:2000].cpu().T, s=2, alpha=0.4, c="tab:red")
    axes[1].set_title("Langevin samples")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    return save_figure(fig, path)


def write_figures(done: ScoreRun, n: int = 64, path: Optional[Path] = None, steps: Optional[int] = None,
                  seed: int = 0, mean: Optional[torch.Tensor] = None) -> Path:
    """Write a sample figure of ``done.sampler`` (the EMA net if kept): a scatter + score field for
    toys, an image grid otherwise. ``mean`` (D,) defaults to the mean of ``done.train``."""
    from ppgen.plots import save_image_grid

    net, config = (done.net if done.sampler is None else done.sampler).eval(), done.config
    lo, hi = done.train.min(0).values, done.train.max(0).values
    mean = done.train.mean(0) if mean is None else mean
    if config.image_shape is None:
        x = sample_score(net, config, max(n, 2000), lo, hi, steps, seed=seed, mean=mean).x
        return plot_toy_field(net, config, x, done.train, path or done.run.figures / "samples.png")
    x = sample_score(net, config, n, lo, hi, steps, seed=seed, mean=mean).x.clamp(0, 1)
    return save_image_grid(x.cpu(), config.image_shape, path or done.run.figures / "samples.png")


def sample_run(path: Union[str, Path], out: Union[str, Path], n: int = 64, steps: Optional[int] = None,
               seed: int = 0, device: str = "cpu", download: bool = False) -> Path:
    """Langevin samples from the score run in ``path`` written to the PNG ``out``."""
    net, config, ckpt = load_score(path, device)
    train = load_data(config, download)[0] if config.image_shape is None else None
    if train is None:  # for images only the box and the mean are used
        train = torch.stack([ckpt["lo"], ckpt["hi"]]).cpu()
    mean = ckpt.get("mean", train.mean(0))
    return write_figures(ScoreRun(net, config, Run(path, resume=True), train, []), n, Path(out), steps, seed, mean)


def run_samples(path: Union[str, Path], n: int, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, DataConfig]:
    """``(samples (n, D) in [0, 1], DataConfig)`` of an image score run, the signature of
    ``ppgen.metrics.RUN_SAMPLERS`` so ``ppgen metrics`` can score it."""
    net, config, ckpt = load_score(path, device)
    if config.image_shape is None:
        raise ValueError(f"{path} is a 2-D toy run; image metrics need an image dataset")
    x = torch.cat([sample_score(net, config, min(500, n - i), ckpt["lo"], ckpt["hi"], seed=seed + i,
                                mean=ckpt.get("mean")).x
                   for i in range(0, n, 500)])
    return x.clamp(0, 1).cpu(), DataConfig(config.data, "none", config.data_dir, config.split_seed)
