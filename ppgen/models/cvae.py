"""Conditional VAE for image completion (Sohn, Lee & Yan 2015; Pyro's ``cvae`` example), and
the deterministic regression baseline it is compared with.

An image is split by a fixed pixel mask into the observed part ``x`` (some quadrants) and the
part to complete ``y`` (the other quadrants). The CVAE models ``p(y | x)`` with a latent ``z``:

    z | x ~ N(mu_p(x), sigma_p(x)^2)                (prior network)
    y | x, z ~ Bernoulli(logits=g([x, z]))          (generation network)
    q(z | x, y) = N(mu_q([x, y]), sigma_q([x, y])^2) (recognition network, the guide)

The model and guide take the whole image batch ``(B, D)`` and split it themselves, so the
evidence tools (:func:`ppgen.infer.evidence.log_evidence`) estimate the conditional
``log p(y | x)`` per image without change: ``x`` is conditioning, not a sample site.

The baseline predicts ``y`` from ``x`` with one network and scores the independent-pixel
``Bernoulli(y; sigmoid(f(x)))``: the best a deterministic predictor can do, it cannot represent
several plausible completions at once, which is what the latent ``z`` adds.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ppgen.nets import mlp

__all__ = ["CVAE", "CVAEConfig", "RegressionBaseline", "quadrant_mask", "baseline_nll"]


def quadrant_mask(image_shape: Sequence[int], observed: Sequence[int]) -> torch.Tensor:
    """Boolean mask ``(D,)`` of the pixels in the ``observed`` quadrants (0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right) of images of shape ``(C, H, W)``, flattened C-major."""
    c, h, w = image_shape
    quads = set(observed)
    if not quads or not quads <= {0, 1, 2, 3} or len(quads) == 4:
        raise ValueError(f"observed must name 1 to 3 of the quadrants 0..3, got {tuple(observed)!r}")
    rows = torch.arange(h)[:, None] >= h // 2  # bottom half
    cols = torch.arange(w)[None, :] >= w // 2  # right half
    quadrant = rows.long() * 2 + cols.long()  # (H, W) in 0..3
    mask = torch.zeros(h, w, dtype=torch.bool)
    for q in quads:
        mask |= quadrant == q
    return mask.expand(c, h, w).reshape(-1)


@dataclasses.dataclass(frozen=True)
class CVAEConfig:
    """Architecture of a :class:`CVAE` and the completion task."""

    latent_dim: int = 8  # width of z
    hidden: tuple[int, ...] = (256,)  # hidden widths of each of the three networks
    observed: tuple[int, ...] = (0,)  # quadrants given as input (0 TL, 1 TR, 2 BL, 3 BR)

    def __post_init__(self) -> None:
        if isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive integer widths, got {self.hidden!r}")
        quadrant_mask((1, 2, 2), self.observed)  # validates the quadrant list

    def build(self, image_shape: tuple[int, ...]) -> "CVAE":
        return CVAE(image_shape, self.latent_dim, self.hidden, self.observed)


class _Gaussian(nn.Module):
    """``input (B, I) -> loc (B, d), scale (B, d)`` through an MLP."""

    def __init__(self, in_dim: int, hidden: Sequence[int], z_dim: int):
        super().__init__()
        self.net = mlp([in_dim, *hidden, 2 * z_dim])

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(h).chunk(2, -1)
        return loc, F.softplus(raw) + 1e-4


class CVAE(nn.Module):
    """Conditional VAE ``p(y | x) = int p(z | x) p(y | x, z) dz`` (module docstring).

    :param image_shape: ``(C, H, W)``; images are given flat, ``(B, C*H*W)``, values 0/1.
    :param z_dim: latent width.
    :param hidden: hidden widths of the prior, generation and recognition networks.
    :param observed: the quadrants that form the input ``x``.
    """

    def __init__(self, image_shape: Sequence[int], z_dim: int = 8, hidden: Sequence[int] = (256,),
                 observed: Sequence[int] = (0,)):
        super().__init__()
        self.image_shape = tuple(image_shape)
        mask = quadrant_mask(self.image_shape, observed)
        self.register_buffer("x_index", mask.nonzero().squeeze(-1), persistent=False)
        self.register_buffer("y_index", (~mask).nonzero().squeeze(-1), persistent=False)
        self.dim, self.z_dim = mask.numel(), z_dim
        nx, ny = len(self.x_index), len(self.y_index)
        self.prior_net = _Gaussian(nx, hidden, z_dim)
        self.recognition_net = _Gaussian(nx + ny, hidden, z_dim)
        self.generation_net = mlp([nx + z_dim, *hidden, ny])

    def split(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``: observed pixels ``(B, |x|)`` and pixels to complete ``(B, |y|)``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 2 or images.shape[1] != self.dim:
            raise ValueError(f"images must have shape (batch, {self.dim}), got {tuple(images.shape)}")
        return images[:, self.x_index], images[:, self.y_index]

    def _logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = x.expand(*z.shape[:-1], x.shape[-1])  # z may carry a leading particle dim
        return self.generation_net(torch.cat([x, z], -1))

    def model(self, images: torch.Tensor) -> None:
        """``p(z | x) p(y | x, z)`` for flat binary images ``(B, D)``."""
        x, y = self.split(images)
        pyro.module("cvae_prior", self.prior_net)
        pyro.module("cvae_generation", self.generation_net)
        with pyro.plate("data", images.shape[0]):
            loc, scale = self.prior_net(x)
            z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
            pyro.sample("y", dist.Bernoulli(logits=self._logits(x, z), validate_args=False).to_event(1), obs=y)

    def guide(self, images: torch.Tensor) -> None:
        """``q(z | x, y)`` for flat binary images ``(B, D)``."""
        x, y = self.split(images)
        pyro.module("cvae_recognition", self.recognition_net)
        with pyro.plate("data", images.shape[0]):
            loc, scale = self.recognition_net(torch.cat([x, y], -1))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def complete(self, images: torch.Tensor, num_samples: int = 1) -> torch.Tensor:
        """Completions ``(num_samples, B, D)``: observed pixels kept, the others are the pixel
        probabilities of ``p(y | x, z)`` for ``z ~ p(z | x)``."""
        x, _ = self.split(images)
        loc, scale = self.prior_net(x)
        z = loc + scale * torch.randn(num_samples, *loc.shape, device=loc.device, dtype=loc.dtype)
        out = images.expand(num_samples, *images.shape).clone()
        out[..., self.y_index] = torch.sigmoid(self._logits(x, z))
        return out


class RegressionBaseline(nn.Module):
    """Deterministic ``y_hat = sigmoid(f(x))``, trained by pixel-wise cross-entropy.

    :param cvae: the :class:`CVAE` whose split (mask) and widths it copies.
    """

    def __init__(self, cvae: CVAE, hidden: Sequence[int] = (256,)):
        super().__init__()
        self.split = cvae.split
        self.y_index = cvae.y_index
        self.net = mlp([len(cvae.x_index), *hidden, len(cvae.y_index)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the pixels to complete, ``(B, |y|)``."""
        x, _ = self.split(images)
        return self.net(x)

    @torch.no_grad()
    def complete(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        out[:, self.y_index] = torch.sigmoid(self(images))
        return out


def baseline_nll(baseline: RegressionBaseline, images: torch.Tensor) -> torch.Tensor:
    """Conditional NLL ``-log Bernoulli(y; sigmoid(f(x)))`` per image, shape ``(B,)`` (nats)."""
    _, y = baseline.split(images)
    return F.binary_cross_entropy_with_logits(baseline(images), y, reduction="none").sum(-1)
