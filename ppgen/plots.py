"""Matplotlib figures written as PNG files (Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["image_grid", "save_image_grid", "plot_curves", "save_figure"]

PathLike = Union[str, Path]


def image_grid(images: torch.Tensor, image_shape: Sequence[int], nrow: int = 0, pad: int = 1) -> np.ndarray:
    """Tile ``images`` of shape ``(N, D)`` (values in [0, 1], ``D = C*H*W``) into one array
    ``(rows*(H+pad)+pad, cols*(W+pad)+pad[, 3])``."""
    c, h, w = image_shape
    if images.ndim != 2 or images.shape[1] != c * h * w:
        raise ValueError(f"images must have shape (N, {c * h * w}), got {tuple(images.shape)}")
    n = images.shape[0]
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    x = images.detach().float().cpu().clamp(0, 1).reshape(n, c, h, w).permute(0, 2, 3, 1).numpy()
    grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.float32)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = x[k]
    return grid[..., 0] if c == 1 else grid


def save_image_grid(
    images: torch.Tensor, image_shape: Sequence[int], path: PathLike, nrow: int = 0, scale: int = 0
) -> Path:
    """Write ``images`` (``(N, D)`` in [0, 1]) as a PNG grid; small images are enlarged so each
    pixel stays visible (``scale`` pixels per image pixel; 0 picks a size near 28 px per image)."""
    grid = image_grid(images, image_shape, nrow)
    scale = scale or max(1, 28 // image_shape[-1]) * 2
    grid = np.kron(grid, np.ones((scale, scale) + (() if grid.ndim == 2 else (1,)), dtype=grid.dtype))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1)
    return path


def save_figure(fig: "plt.Figure", path: PathLike) -> Path:
    """Lay ``fig`` out tightly, write it to ``path`` as PNG (creating folders) and close it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: PathLike,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> Path:
    """One line per entry ``label -> (x, y)``, written to ``path`` as PNG."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
