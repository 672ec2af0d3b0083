"""The M2 generative model of Kingma et al. (2014), "Semi-Supervised Learning with Deep
Generative Models": a categorical class ``y`` next to a continuous style ``z``.

    y ~ OneHotCategorical(1/K),  z ~ N(0, I_d),  x | y, z ~ Bernoulli(logits=decoder([y, z]))
    q(y | x) = OneHotCategorical(softmax(classifier(x))),  q(z | x, y) = N(encoder([x, y]))

trained unsupervised, or semi-supervised on partly labelled batches in one run: ``model(x, y,
labelled)`` with integer labels ``y (B,)`` and a boolean mask ``labelled (B,)`` keeps ``y`` latent
in every row and the guide pins a labelled row's ``q(y | x)`` to its label (a point mass), so the
exact sum over ``y`` keeps only that term: ``-L(x, y)`` for labelled rows, ``-U(x)`` for the
others (Kingma et al. 2014, eqs. 6-7). ``alpha > 0`` adds ``alpha * log q(y | x)`` of the labelled
rows as ``pyro.factor("classifier", ...)`` (eq. 9), inside the data plate so ppgen's loop scales it
by ``N / B``; block that site to score evidence (``poutine.block(model, hide=["classifier"])``).
``model(x, y)`` observes every label. The continuous ``z`` is always reparameterized; the discrete
``y`` has two gradient estimators, picked by the SVI estimator name:

- ``"enum"``: ``y`` is summed out exactly in parallel (TraceEnum_ELBO): ``K`` decoder passes.
- ``"score-discrete"``: ``y`` is sampled and gets the score-function gradient with a
  decaying-average baseline, Rao-Blackwellized by TraceGraph_ELBO (Williams 1992; Mnih & Gregor
  2014), while ``z`` keeps its pathwise gradient.

:class:`ppgen.models.discrete.DiscreteVAE` is the purely discrete special case (no ``z``), whose
evidence is exact; M2's evidence needs importance sampling (:mod:`ppgen.infer.evidence`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn import functional as F

from ppgen.models.helpers import check_batch
from ppgen.nets import mlp

__all__ = ["M2", "M2Config", "DISCRETE_ESTIMATORS", "discrete_score_guide", "cluster_accuracy"]

PIN = 1e4  # logit gap of the point mass on a given label: exp(-1e4) is exactly 0 in float32/64

#: ``--discrete`` flag -> estimator name in :data:`ppgen.infer.estimators.ESTIMATORS`.
DISCRETE_ESTIMATORS = {"enum": "enum", "score": "score-discrete"}


class _DiscreteBaseline(Messenger):
    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not msg["fn"].has_rsample:
            msg["infer"] = {**msg["infer"], "baseline": {"use_decaying_avg_baseline": True, "baseline_beta": self.beta}}


def discrete_score_guide(guide: Callable, beta: float = 0.95) -> Callable:
    """``guide`` whose non-reparameterizable (discrete) sites get a decaying-average baseline for
    TraceGraph_ELBO; reparameterized sites are untouched (pathwise gradient)."""
    return _DiscreteBaseline(beta)(guide)


@dataclasses.dataclass(frozen=True)
class M2Config:
    """Architecture of an :class:`M2` model."""

    num_classes: int = 10  # K, values of the class latent y
    latent_dim: int = 8  # width of the style latent z
    hidden: tuple[int, ...] = (256,)  # hidden widths of classifier, encoder and decoder
    alpha: float = 0.0  # weight of the classifier term on labelled rows (Kingma et al. 2014, eq. 9)

    def __post_init__(self) -> None:
        for name in ("num_classes", "latent_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive integer widths, got {self.hidden!r}")

    def build(self, x_dim: int) -> "M2":
        return M2(x_dim, self.num_classes, self.latent_dim, self.hidden, self.alpha)


class M2(nn.Module):
    """M2 (module docstring). Model and guide take ``x (B, D)`` with 0/1 values, optional integer
    labels ``y (B,)`` and an optional boolean mask ``labelled (B,)``; sites ``"y"`` (one-hot, event
    dim 1), ``"z"`` (event dim 1), ``"x"`` and, with labels and ``alpha > 0``, the factor
    ``"classifier"``, all in ``pyro.plate("data")``.

    :param x_dim: ``D``.
    :param num_classes: ``K``.
    :param z_dim: style width ``d``.
    :param hidden: hidden widths of the three MLPs.
    :param alpha: weight of the classifier term (eq. 9 of Kingma et al. 2014).
    """

    def __init__(self, x_dim: int, num_classes: int = 10, z_dim: int = 8, hidden: Sequence[int] = (256,),
                 alpha: float = 0.0):
        super().__init__()
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha must be a non-negative number, got {alpha!r}")
        self.x_dim, self.num_classes, self.z_dim, self.alpha = x_dim, num_classes, z_dim, float(alpha)
        self.classifier = mlp([x_dim, *hidden, num_classes])
        self.encoder = mlp([x_dim + num_classes, *hidden, 2 * z_dim])
        self.decoder = mlp([num_classes + z_dim, *reversed(tuple(hidden)), x_dim])

    @staticmethod
    def _join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # Enumeration gives y a leading (K, 1) shape and particles give z a leading dim: broadcast.
        shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
        return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1)

    def _labels(self, x: torch.Tensor, y: Optional[torch.Tensor], labelled: Optional[torch.Tensor]):
        """One-hot labels ``(B, K)`` (zero rows where ``labelled`` is False), or ``None``."""
        check_batch(x, self.x_dim)
        if y is None:
            if labelled is not None:
                raise ValueError("labelled (a mask) was given without y: pass the labels too, or neither")
            return None
        if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.is_floating_point():
            raise TypeError(f"y must be integer class labels of shape {tuple(x.shape[:1])}, got "
                            f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
        if labelled is not None:
            if not isinstance(labelled, torch.Tensor) or labelled.dtype != torch.bool or labelled.shape != y.shape:
                raise TypeError(f"labelled must be a boolean tensor of shape {tuple(y.shape)}, got "
                                f"{getattr(labelled, 'dtype', type(labelled).__name__)} "
                                f"{tuple(getattr(labelled, 'shape', ()))}")
            y = torch.where(labelled, y, torch.zeros_like(y))  # the rows without a label: ignored
        one_hot = F.one_hot(y, self.num_classes).to(x.dtype)
        return one_hot if labelled is None else one_hot * labelled.unsqueeze(-1).to(x.dtype)

    def model(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, labelled: Optional[torch.Tensor] = None) -> None:
        """``p(y) p(z) p(x | y, z)`` for ``x (B, D)``; labels ``y (B,)`` observed (no mask) or
        pinned by the guide where ``labelled``, plus the classifier term (class docstring)."""
        labels = self._labels(x, y, labelled)
        pyro.module("m2_decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.OneHotCategorical(x.new_full((self.num_classes,), 1.0 / self.num_classes))
            y = pyro.sample("y", prior, obs=labels if labelled is None else None)
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1))
            logits = self.decoder(self._join(y, z))
            pyro.sample("x", dist.Bernoulli(logits=logits, validate_args=False).to_event(1), obs=x)
            if labels is not None and self.alpha > 0:
                pyro.module("m2_classifier", self.classifier)
                log_q = (F.log_softmax(self.classifier(x), -1) * labels).sum(-1)  # 0 where unlabelled
                pyro.factor("classifier", self.alpha * log_q)

    def guide(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, labelled: Optional[torch.Tensor] = None) -> None:
        """``q(y | x) q(z | x, y)`` for ``x (B, D)``; ``q(y | x)`` is the point mass on the label
        of a labelled row, and no ``y`` site at all when every label is observed."""
        labels = self._labels(x, y, labelled)
        pyro.module("m2_classifier", self.classifier)
        pyro.module("m2_encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            if labels is None or labelled is not None:
                logits = self.classifier(x)
                if labelled is not None:
                    logits = torch.where(labelled.unsqueeze(-1), (labels - 1) * PIN, logits)
                labels = pyro.sample("y", dist.OneHotCategorical(logits=logits))
            loc, raw = self.encoder(self._join(x, labels)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))

    def check_data(self, x: torch.Tensor) -> None:
        from ppgen.data import check_binary

        check_batch(x, self.x_dim)
        check_binary(x)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """``argmax_k q(y = k | x)``: shape ``(B,)``."""
        check_batch(x, self.x_dim)
        return self.classifier(x).argmax(-1)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Pixel probabilities ``(n, D)``: row ``i`` has class ``i mod K`` and a fresh style."""
        device = next(self.parameters()).device
        y = F.one_hot(torch.arange(n, device=device) % self.num_classes, self.num_classes).float()
        return torch.sigmoid(self.decoder(torch.cat([y, torch.randn(n, self.z_dim, device=device)], -1)))


def cluster_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Accuracy of unsupervised cluster ids ``pred (N,)`` against ``labels (N,)`` after mapping
    each cluster to its most frequent label (the usual score of unsupervised M2 / clustering)."""
    if pred.shape != labels.shape:
        raise ValueError(f"pred and labels must have the same shape, got {tuple(pred.shape)} and {tuple(labels.shape)}")
    correct = 0
    for k in range(num_classes):
        members = labels[pred == k]
        if len(members):
            correct += int(torch.bincount(members.long()).max())
    return correct / max(len(labels), 1)
