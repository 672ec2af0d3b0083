"""Figures that ``ppgen report`` draws itself (the rest it takes from the runs' folders).

- :func:`vae_interpolation` / :func:`gan_interpolation`: straight lines in latent space decoded
  to images (VAE: between the encoder means of two test images; GAN: between two prior draws).
- :func:`latent_scatter`: the encoder means of the test split, coloured by label (2-D latents).
- :func:`training_curves`: one row per family, the family's progress metric against optimizer
  steps (left) and cumulative training wall time (right).
- :func:`family_time_curves`: ``ppgen compare-families``' metrics against training time, one
  line per family (mean over seeds, a band of +- 1 sd).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ppgen.plots import save_image_grid  # noqa: E402

__all__ = ["lerp_rows", "vae_interpolation", "gan_interpolation", "latent_scatter", "curve_series", "training_curves",
           "family_time_curves"]

PathLike = Union[str, Path]

#: family -> (metric keys plotted, y label) of its metrics.jsonl records.
CURVE_METRICS = {
    "vae": (("val_elbo",), "validation ELBO (nats)"),
    "gan": (("loss_D", "loss_G"), "loss per step"),
    "score": (("val_loss",), "validation score-matching loss"),
    "model": (("val_elbo",), "validation ELBO (nats per datapoint)"),  # ppgen train model FILE.py:NAME
}


def lerp_rows(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """Points on the segments from ``a`` to ``b`` (both ``(P, d)``): shape ``(P * steps, d)``,
    row-major by pair, the first of each row ``a[p]`` and the last ``b[p]``."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"a and b must have the same shape (P, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    t = torch.linspace(0, 1, steps, device=a.device, dtype=a.dtype).view(1, steps, 1)
    return (a.unsqueeze(1) * (1 - t) + b.unsqueeze(1) * t).reshape(-1, a.shape[1])


@torch.no_grad()
def vae_interpolation(vae, x: torch.Tensor, image_shape: Sequence[int], path: PathLike, steps: int = 10) -> Path:
    """Decode the segments between the encoder means of ``x[0::2]`` and ``x[1::2]`` (``x``:
    ``(2P, D)`` images): one row per pair, ``steps`` images per row."""
    loc, _ = vae.encoder(x)
    z = lerp_rows(loc[0::2], loc[1::2], steps)
    return save_image_grid(vae.likelihood.mean(vae.decoder(z)).cpu(), image_shape, path, nrow=steps)


@torch.no_grad()
def gan_interpolation(generator, pairs: int, image_shape: Sequence[int], path: PathLike, steps: int = 10,
                      seed: int = 0) -> Path:
    """Generator images along segments between ``pairs`` pairs of prior draws ``z ~ N(0, I)``."""
    device = next(generator.parameters()).device
    z = torch.randn(2 * pairs, generator.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return save_image_grid(generator(lerp_rows(z[0::2], z[1::2], steps)).cpu(), image_shape, path, nrow=steps)


@torch.no_grad()
def latent_scatter(vae, x: torch.Tensor, labels: torch.Tensor, path: PathLike, title: str = "") -> Path:
    """Scatter of the 2-D encoder means of ``x`` ``(N, D)`` coloured by ``labels`` ``(N,)``."""
    loc, _ = vae.encoder(x)
    if loc.shape[1] != 2:
        raise ValueError(f"latent_scatter needs a 2-D latent, got latent dimension {loc.shape[1]}")
    loc = loc.cpu()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    sc = ax.scatter(loc[:, 0], loc[:, 1], c=labels.cpu(), cmap="tab10", s=6, alpha=0.8)
    ax.legend(*sc.legend_elements(), title="label", fontsize=7, loc="best", markerscale=0.8)
    ax.set_xlabel("z1 (encoder mean)")
    ax.set_ylabel("z2 (encoder mean)")
    ax.set_title(title or f"latent means of {len(loc)} test images")
    fig.tight_layout()
    return _save(fig, path)


def curve_series(family: str, records: Sequence[dict], steps_per_epoch: int = 0) -> dict[str, tuple[list, list, list]]:
    """``{metric: (steps, cumulative seconds, values)}`` from a run's epoch records (metrics.jsonl).

    Steps come from the record's ``step`` (SVI), the running sum of ``g_steps`` (GAN), or
    ``epoch * steps_per_epoch`` (score runs, whose records count epochs only)."""
    keys, _ = CURVE_METRICS.get(family, ((), ""))
    epochs = [r for r in records if "seconds" in r and any(k in r for k in keys)]
    steps, wall, total_steps, total_wall = [], [], 0, 0.0
    for r in epochs:
        total_wall += float(r["seconds"])
        if "step" in r:
            total_steps = int(r["step"])
        elif "g_steps" in r:
            total_steps += int(r["g_steps"])
        else:
            total_steps = int(r.get("epoch", 0)) * steps_per_epoch
        steps.append(total_steps)
        wall.append(total_wall)
    return {k: (steps, wall, [float(r[k]) for r in epochs]) for k in keys if epochs and all(k in r for r in epochs)}


def training_curves(runs: Mapping[str, tuple[str, dict]], path: PathLike) -> Path:
    """``runs``: ``name -> (family, curve_series(...))``. One row per family present, metric
    against steps (left) and wall time (right); several metrics of one run share its colour."""
    families = [f for f in CURVE_METRICS if any(fam == f and series for fam, series in runs.values())]
    if not families:
        raise ValueError("no run has training curves (metrics.jsonl epoch records)")
    fig, axes = plt.subplots(len(families), 2, figsize=(11, 3.6 * len(families)), dpi=110, squeeze=False)
    styles = ("-", "--", ":")
    for row, family in zip(axes, families):
        keys, ylabel = CURVE_METRICS[family]
        for i, (name, (fam, series)) in enumerate((n, v) for n, v in runs.items() if v[0] == family):
            colour = f"C{i % 10}"
            for key, style in zip(keys, styles):
                if key not in series:
                    continue
                steps, wall, values = series[key]
                label = name if len(keys) == 1 else f"{name} {key}"
                row[0].plot(steps, values, style, color=colour, marker="o", markersize=2, label=label)
                row[1].plot(wall, values, style, color=colour, marker="o", markersize=2, label=label)
        row[0].set_xlabel("optimizer steps")
        row[1].set_xlabel("training wall time (s)")
        for ax in row:
            ax.set_ylabel(ylabel)
            ax.set_title(f"{family}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def family_time_curves(runs: Mapping[str, list], metrics: Mapping[str, tuple[str, str]], path: PathLike) -> Path:
    """``runs``: family -> one dict per seed with ``checkpoints`` (records with ``train_seconds``
    and metric keys); ``metrics``: key -> (title, "lower"/"higher" better). One panel per metric
    any run has: per family, the mean over seeds at each checkpoint index (x: mean training
    seconds there) with a band of +- 1 sd."""
    keys = [k for k in metrics if any(k in c for per_seed in runs.values() for r in per_seed for c in r["checkpoints"])]
    if not keys:
        raise ValueError("no checkpoint holds any of the metrics " + ", ".join(metrics))
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.3), dpi=110, squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (family, per_seed) in enumerate(runs.items()):
            depth = min(len(r["checkpoints"]) for r in per_seed)  # checkpoints every seed reached
            if depth == 0 or key not in per_seed[0]["checkpoints"][0]:
                continue
            t = torch.tensor([[r["checkpoints"][j]["train_seconds"] for j in range(depth)] for r in per_seed]).mean(0)
            v = torch.tensor([[float(r["checkpoints"][j][key]) for j in range(depth)] for r in per_seed], dtype=torch.float64)
            mean, sd = v.mean(0), (v.std(0) if len(per_seed) > 1 else torch.zeros(depth, dtype=torch.float64))
            ax.plot(t, mean, marker="o", markersize=3, color=f"C{i}", label=family)
            ax.fill_between(t, mean - sd, mean + sd, color=f"C{i}", alpha=0.2)
        title, better = metrics[key]
        ax.set_title(f"{title} ({better} is better)", fontsize=9)
        ax.set_xlabel("training time (s)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``n_train`` points in batches of ``batch_size``."""
    return math.ceil(n_train / batch_size)
