"""Gradient-estimator measurements on trained VAE runs: over checkpoints, and by training.

- :func:`measure_run`: :func:`ppgen.infer.variance.gradient_stats` of a VAE run at
  initialization and at each saved checkpoint (``checkpoint.pt``, plus any
  ``checkpoints/epoch-XXX.pt`` a run kept), on one fixed validation batch.
- :func:`plot_variance`: total variance (log scale) per estimator against epoch, and SNR per
  parameter group.
- :func:`compare_estimators`: train the same VAE with each estimator and plot validation ELBO
  against SVI steps and against wall time on one figure.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from ppgen.data import binarize  # noqa: E402
from ppgen.infer.svi import load_params  # noqa: E402
from ppgen.infer.variance import GradientStats, gradient_stats  # noqa: E402
from ppgen.plots import save_figure  # noqa: E402
from ppgen.devices import resolve_device  # noqa: E402
from ppgen.runs import Run, config_from_dict, load_checkpoint  # noqa: E402

__all__ = ["Checkpoint", "list_checkpoints", "measure_run", "plot_variance", "compare_estimators"]


class Checkpoint(NamedTuple):
    """A point of a run to measure: ``epoch`` 0 is a fresh initialization (``path`` None)."""

    epoch: int
    path: Optional[Path]


def list_checkpoints(run_path: Union[str, Path], which: str = "all") -> list[Checkpoint]:
    """``"all"``: initialization, every ``checkpoints/epoch-XXX.pt`` and the final
    ``checkpoint.pt``; ``"last"``: the final checkpoint only; ``"init"``: initialization only."""
    if which not in ("all", "last", "init"):
        raise ValueError(f"checkpoints must be 'all', 'last' or 'init', got {which!r}")
    run = Run(run_path, resume=True)
    points = [Checkpoint(0, None)] if which in ("all", "init") else []
    if which == "init":
        return points
    if which == "all":
        for p in sorted((run.path / "checkpoints").glob("epoch-*.pt")):
            m = re.fullmatch(r"epoch-(\d+)\.pt", p.name)
            if m:
                points.append(Checkpoint(int(m.group(1)), p))
    final = run.checkpoint_path
    if final.exists():
        epoch = int(load_checkpoint(final)["epoch"])
        if all(c.epoch != epoch for c in points):
            points.append(Checkpoint(epoch, final))
    return points


def measure_run(
    run_path: Union[str, Path],
    estimators: Sequence[str],
    checkpoints: str = "all",
    num_draws: int = 100,
    batch_size: int = 128,
    reference_draws: int = 500,
    warmup: int = 100,
    seed: int = 0,
    device: str = "cpu",
    particles: Union[int, Sequence[int]] = 1,
) -> list[tuple[Checkpoint, GradientStats]]:
    """Gradient statistics of VAE run ``run_path`` at each checkpoint, on the first
    ``batch_size`` validation images (binarized once with ``seed`` if the run binarizes dynamically).
    Gradients are those of the batch's negative ELBO (sum over the batch, not rescaled to N).

    Every parameter the model and guide register is loaded from the checkpoint (encoder, decoder,
    the posterior's flow or covariance factor, a learned likelihood scale); a checkpoint that
    lacks one of them is refused rather than measured half-trained. ``particles`` is passed to
    :func:`ppgen.infer.variance.gradient_stats` (an int, or a list to sweep)."""
    from ppgen.train import VAERunConfig

    run = Run(run_path, resume=True)
    config = config_from_dict(VAERunConfig, run.load_config())
    data = config.data.load(False)
    x = data.val[:batch_size].to(resolve_device(device))
    if data.dynamic:
        x = binarize(x, torch.Generator(device=x.device).manual_seed(seed))
    out = []
    for point in list_checkpoints(run_path, checkpoints):
        torch.manual_seed(config.svi.seed)
        vae = config.model.build(data.dim, data.image_shape).to(x.device)
        pyro.clear_param_store()
        registered = _register(vae, x)
        if point.path is not None:
            params = load_checkpoint(point.path, map_location=x.device)["params"]
            missing = sorted(registered - set(params))
            if missing:
                raise ValueError(f"checkpoint {point.path} lacks parameters {missing} that the model/guide of "
                                 f"{run_path} registers: it comes from another configuration")
            load_params({k: v for k, v in params.items() if k in registered})
        stats = gradient_stats(vae.model, vae.guide, x, estimators, num_draws=num_draws,
                               reference_draws=reference_draws, warmup=warmup, seed=seed, particles=particles)
        out.append((point, stats))
    return out


def _register(vae, x: torch.Tensor) -> set[str]:
    """Names of every parameter the VAE's model and guide put in Pyro's param store, found by one
    trace of both on ``x`` (off the caller's random stream; parameter values are untouched)."""
    from pyro import poutine
    from pyro.infer import Trace_ELBO

    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        with poutine.trace(param_only=True) as capture:
            Trace_ELBO().loss(vae.model, vae.guide, x)
    return {name for name, site in capture.trace.nodes.items() if site["type"] == "param"}


def plot_variance(results: list[tuple[Checkpoint, GradientStats]], path: Union[str, Path], title: str = "") -> Path:
    """Left: total gradient variance (log scale) per estimator and particle count against epoch.
    Right: per parameter group at the last measured checkpoint, the SNR (bars) and the
    noise-floor-corrected SNR (black dots; absent where it is <= 0, i.e. the group's gradient is
    not told apart from noise), with the plain SNR's noise floor sqrt(2 / (pi R)) dashed."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    labels = list(results[0][1].mean)
    epochs = [c.epoch for c, _ in results]
    last = results[-1][1]

    def legend(label: str) -> str:
        k = last.row(label)["particles"]
        return label if k == 1 or "K=" in label else f"{label} K={k}"

    for label in labels:
        ax1.plot(epochs, [s.row(label)["variance"] for _, s in results], marker="o", label=legend(label))
    ax1.set_yscale("log")
    ax1.set_xlabel("epoch (0 = initialization)")
    ax1.set_ylabel("tr Cov[gradient] (log scale)")
    ax1.grid(alpha=0.3, which="both")
    ax1.legend(fontsize=7)
    groups = sorted({r["name"] for r in last.rows if r["level"] == "group"})
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [g + i * width for g in range(len(groups))]
        rows = [last.row(label, g, "group") for g in groups]
        ax2.bar(xs, [r["snr"] for r in rows], width, label=legend(label))
        dots = [(x, r["snr_corrected"]) for x, r in zip(xs, rows) if r["snr_corrected"] > 0]
        if dots:
            ax2.plot(*zip(*dots), "k.", markersize=5, label="corrected SNR" if i == 0 else None)
    ax2.axhline((2 / (math.pi * last.num_draws)) ** 0.5, color="grey", linestyle="--", linewidth=1,
                label=f"noise floor, R = {last.num_draws}")
    ax2.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax2.set_yscale("log")
    ax2.set_ylabel(f"mean SNR |E g|/sd(g), epoch {results[-1][0].epoch}")
    ax2.grid(alpha=0.3, axis="y", which="both")
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def compare_estimators(
    base,
    estimators: Sequence[str],
    out: Union[str, Path],
    progress: bool = False,
    download: bool = False,
    seconds: Optional[float] = None,
) -> dict[str, list[dict]]:
    """Train the VAE of ``base`` (a :class:`ppgen.train.VAERunConfig`) once per estimator into
    ``out/<estimator>`` and plot validation ELBO against steps and wall time into
    ``out/compare.png``. Returns ``estimator -> history`` with cumulative ``wall`` seconds.

    :param seconds: optional equal wall-time budget: each estimator trains epoch by epoch (resuming
        its run) until its training time reaches ``seconds`` or ``base.svi.epochs`` is done; the
        last epoch may overrun the budget (its time is in the history)."""
    from ppgen.infer.estimators import get_estimator
    from ppgen.train import train_vae

    if not estimators:
        raise ValueError("estimators must name at least one estimator")
    for name in estimators:
        get_estimator(name)
    out = Path(out)
    histories = {}
    for name in estimators:
        if seconds is not None and not seconds > 0:
            raise ValueError(f"seconds must be a positive budget, got {seconds!r}")
        stops = range(1, base.svi.epochs + 1) if seconds is not None else [base.svi.epochs]
        for epochs in stops:
            config = dataclasses.replace(base, svi=dataclasses.replace(base.svi, estimator=name, epochs=epochs))
            done = train_vae(config, out / name, resume=epochs > stops[0], overwrite=epochs == stops[0],
                             progress=progress, download=download)
            wall, hist = 0.0, []
            for h in done.result.history:
                wall += h["seconds"]
                hist.append({**h, "wall": wall})
            if seconds is not None and wall >= seconds:
                break
        histories[name] = hist
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), dpi=120, sharey=True)
    for name, hist in histories.items():
        ax1.plot([h["step"] for h in hist], [h["val_elbo"] for h in hist], marker="o", markersize=3, label=name)
        ax2.plot([h["wall"] for h in hist], [h["val_elbo"] for h in hist], marker="o", markersize=3, label=name)
    ax1.set_xlabel("SVI steps")
    ax2.set_xlabel("wall time (s, training only)")
    ax1.set_ylabel("validation ELBO (nats per image)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(f"{base.data.name}: the same VAE trained with each gradient estimator")
    save_figure(fig, out / "compare.png")
    return histories


def elbo_at_equal_time(histories: dict[str, list[dict]]) -> tuple[float, dict[str, float]]:
    """The common budget ``T`` (the shortest run's total wall time) and, per estimator, the
    validation ELBO of its last epoch finished within ``T``."""
    budget = min(h[-1]["wall"] for h in histories.values())
    best = {}
    for name, hist in histories.items():
        done = [h for h in hist if h["wall"] <= budget + 1e-9]
        best[name] = done[-1]["val_elbo"] if done else float("nan")
    return budget, best


@dataclasses.dataclass(frozen=True)
class VarianceConfig:
    """Settings of ``ppgen variance`` (flags map one-to-one)."""

    estimators: tuple[str, ...] = ("reparam", "stl", "score", "score-baseline", "score-nn-baseline")  # to measure
    checkpoints: str = "all"  # "all" (init + every kept checkpoint + final), "last" or "init"
    draws: int = 100  # gradient draws per estimator and checkpoint
    batch_size: int = 128  # validation images in the fixed batch
    reference_draws: int = 500  # reparameterized draws averaged into the reference gradient
    warmup: int = 100  # discarded draws first, so baselines adapt
    seed: int = 0  # torch seed of the draws and of the batch's binarization
    device: str = "cpu"  # "cpu" or "cuda"
    particles: tuple[int, ...] = (1,)  # K, samples per gradient draw; several: a sweep (rows carry K)

    def __post_init__(self) -> None:
        from ppgen.infer.estimators import get_estimator

        if not self.estimators:
            raise ValueError("estimators must name at least one estimator")
        for name in self.estimators:
            get_estimator(name)
        if self.checkpoints not in ("all", "last", "init"):
            raise ValueError(f"checkpoints must be 'all', 'last' or 'init', got {self.checkpoints!r}")
        if not self.particles or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.particles):
            raise ValueError(f"particles must be positive integers, e.g. (1,) or (1, 10, 50), got {self.particles!r}")
        if len(set(self.particles)) != len(self.particles):
            raise ValueError(f"particles lists a count twice: {self.particles!r}")
