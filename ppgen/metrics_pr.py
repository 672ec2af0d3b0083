"""Precision, recall and label balance: the two failures a single distance mixes.

- **Precision and recall for distributions** (Kynkaanniemi et al. 2019, "Improved precision and
  recall metric for assessing generative models"). Each set of feature vectors stands for its
  distribution's support as the union of hyperspheres around its points, the radius of each
  being the distance to its ``k``-th nearest neighbour in the same set (``k = 3`` by default, the
  paper's choice). *Precision* is the share of generated points inside the real manifold
  (samples that look like data); *recall* the share of real points inside the generated
  manifold (parts of the data the model produces). A point ``y`` is inside the manifold of a
  set ``X`` when ``|y - x| <= r_k(x)`` for some ``x`` in ``X`` (the boundary counts as inside).

  Memory: the pairwise distances are never held whole; rows are taken ``chunk`` at a time, so
  the largest temporary is ``(chunk, max(N, M))``. Everything runs on the device of the inputs
  (nothing is copied to the host until the two final means). Distances are computed from
  differences (``torch.cdist``'s exact mode), in the inputs' dtype: pass float64 for exact
  comparisons on hand-made points.

- **Label balance.** The classifier's predicted-class histogram of the samples against the one
  of the data (the test split, also as the classifier reads it, so its own errors cancel), as
  the total-variation distance ``TV(p, q) = 1/2 sum_c |p_c - q_c|`` in [0, 1]: 0 when the
  samples spread over the classes exactly as the data do, 1 when they share no class.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import torch

__all__ = ["PrecisionRecall", "knn_radii", "manifold_membership", "precision_recall", "label_histogram",
           "total_variation", "plot_label_balance"]


class PrecisionRecall(NamedTuple):
    """``precision`` and ``recall`` in [0, 1] and the ``k`` they were computed with."""

    precision: float
    recall: float
    k: int


def check_2d(x: torch.Tensor, name: str, dim: Optional[int] = None) -> None:
    """Refuse anything but a finite ``(N, dim)`` tensor (``(N, F)`` when ``dim`` is None)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(N, {dim})" if dim is not None else "(N, F)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")


def _check_chunk(chunk: int) -> None:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")


def knn_radii(x: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of ``x`` (N, F) to its ``k``-th nearest neighbour among the other
    rows: shape ``(N,)``. A duplicate of a row is a neighbour at distance 0."""
    check_2d(x, "x")
    _check_chunk(chunk)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < x.shape[0]:
        raise ValueError(f"k must be an integer in [1, N - 1] = [1, {x.shape[0] - 1}] for {x.shape[0]} points, "
                         f"got {k!r}")
    out = []
    for b in range(0, x.shape[0], chunk):
        d = torch.cdist(x[b : b + chunk], x, compute_mode="donot_use_mm_for_euclid_dist")
        # the k + 1 smallest include the row itself (distance 0), so the last is the k-th other
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def manifold_membership(y: torch.Tensor, x: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Whether each row of ``y`` (M, F) lies in the union of balls of radius ``radii`` (N,)
    around the rows of ``x`` (N, F): a bool tensor ``(M,)``."""
    check_2d(x, "x")
    check_2d(y, "y", x.shape[1])
    _check_chunk(chunk)
    if radii.shape != (x.shape[0],):
        raise ValueError(f"radii must have shape ({x.shape[0]},), one per row of x, got {tuple(radii.shape)}")
    out = []
    for b in range(0, y.shape[0], chunk):
        d = torch.cdist(y[b : b + chunk], x, compute_mode="donot_use_mm_for_euclid_dist")
        out.append((d <= radii).any(1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of ``fake`` (M, F) against
    ``real`` (N, F), feature vectors on one device.

    ``precision = mean_j [fake_j in manifold(real)]``, ``recall = mean_i [real_i in
    manifold(fake)]``, each manifold the union of ``k``-NN balls of its own set.

    :param k: neighbour whose distance is each ball's radius (``1 <= k < min(N, M)``).
    :param chunk: rows of pairwise distances held at once (memory ``chunk * max(N, M)``).
    """
    check_2d(real, "real")
    check_2d(fake, "fake", real.shape[1])
    if fake.device != real.device:
        raise ValueError(f"real and fake must be on one device, got {real.device} and {fake.device}")
    precision = manifold_membership(fake, real, knn_radii(real, k, chunk), chunk).double().mean()
    recall = manifold_membership(real, fake, knn_radii(fake, k, chunk), chunk).double().mean()
    return PrecisionRecall(float(precision), float(recall), k)


def label_histogram(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Share of each class among integer ``labels`` (N,): shape ``(classes,)``, float64, sums to 1."""
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype.is_floating_point:
        raise TypeError(f"labels must be a 1-D integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)} "
                        f"of shape {tuple(getattr(labels, 'shape', ()))}")
    if len(labels) == 0:
        raise ValueError("labels is empty: need at least one label for a histogram")
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(f"labels must lie in [0, {classes - 1}], got range [{int(labels.min())}, {int(labels.max())}]")
    return torch.bincount(labels, minlength=classes).double() / len(labels)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    """``1/2 sum_c |p_c - q_c|`` of two histograms of equal shape ``(C,)``."""
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"p and q must be histograms of one shape (C,), got {tuple(p.shape)} and {tuple(q.shape)}")
    return float(0.5 * (p.double() - q.double().to(p.device)).abs().sum())


def plot_label_balance(histograms: dict, path: Union[str, Path], class_names: Optional[Sequence[str]] = None,
                       title: str = "") -> Path:
    """Grouped bars of class shares: ``histograms`` maps a label (``"data"``, ``"samples"``, a
    family...) to a histogram ``(C,)``; written as a PNG to ``path``."""
    import numpy as np

    from ppgen.plots import plt, save_figure

    names = list(histograms)
    if not names:
        raise ValueError("histograms is empty: give at least one label -> histogram")
    classes = len(histograms[names[0]])
    fig, ax = plt.subplots(figsize=(min(12, max(6, 0.25 * classes * len(names) + 3)), 3.5), dpi=120)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(np.arange(classes) + (i - (len(names) - 1) / 2) * width, [float(v) for v in histograms[name]],
               width, label=name)
    ax.set_xticks(np.arange(classes))
    ax.set_xticklabels(class_names or [str(c) for c in range(classes)], fontsize=8)
    ax.axhline(1 / classes, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("class predicted by the feature classifier")
    ax.set_ylabel("share of images")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
