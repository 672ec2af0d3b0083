"""Variational autoencoder as a Pyro model/guide pair (Kingma & Welling 2014).

model: ``z ~ N(0, I)``, ``x ~ Bernoulli(logits=decoder(z))``, one pair per datapoint inside the
``"data"`` plate; guide: ``z ~ N(encoder(x))``, an amortized diagonal Normal. The guide's site is
reparameterized; score-function estimators switch that off from outside (see
:mod:`ppgen.infer.estimators`), so the same model is trained by every estimator.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppgen.nets import make_decoder, make_encoder

__all__ = ["VAE", "VAEConfig"]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of a :class:`VAE`."""

    latent_dim: int = 20  # latent width
    hidden: tuple[int, ...] = (400,)  # hidden widths of the encoder; the decoder mirrors them
    arch: str = "mlp"  # "mlp" or "conv" (28x28 images)

    def __post_init__(self) -> None:
        if isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive integer widths, got {self.hidden!r}")
        if self.arch not in ("mlp", "conv"):
            raise ValueError(f"unknown architecture {self.arch!r}; choose 'mlp' or 'conv'")

    def build(self, x_dim: int, image_shape: tuple[int, ...]) -> "VAE":
        return VAE(x_dim, self.latent_dim, self.hidden, self.arch, image_shape)


class VAE(nn.Module):
    """A VAE with Bernoulli likelihood and amortized diagonal-Normal guide.

    :param x_dim: observation width ``D`` (flattened pixels).
    :param z_dim: latent width.
    :param hidden: hidden-layer widths of the MLP encoder (the decoder mirrors them).
    :param arch: ``"mlp"`` or ``"conv"`` (28x28 images only).
    :param image_shape: ``(C, H, W)`` of an observation, for the convolutional networks.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int = 20,
        hidden: Sequence[int] = (400,),
        arch: str = "mlp",
        image_shape: Optional[tuple[int, ...]] = None,
    ):
        super().__init__()
        if x_dim < 1 or z_dim < 1:
            raise ValueError(f"x_dim and z_dim must be positive, got x_dim={x_dim}, z_dim={z_dim}")
        shape = tuple(image_shape) if image_shape else (1, 28, 28)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = make_encoder(x_dim, z_dim, hidden, arch, shape)
        self.decoder = make_decoder(z_dim, x_dim, hidden, arch, shape)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.x_dim:
            raise ValueError(
                f"x must have shape (batch, {self.x_dim}), got {tuple(x.shape)}; "
                "flatten images and check the dataset matches the model's x_dim"
            )

    def model(self, x: torch.Tensor) -> None:
        """Generative model ``p(x, z)`` for a batch ``x`` of shape ``(B, D)`` with 0/1 values."""
        self._check(x)
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.z_dim), x.new_ones(self.z_dim)).to_event(1)
            z = pyro.sample("z", prior)
            # Data support (0/1) is checked once per dataset by the training loop, not per step.
            lik = dist.Bernoulli(logits=self.decoder(z), validate_args=False).to_event(1)
            pyro.sample("x", lik, obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """Amortized guide ``q(z | x) = N(loc(x), diag scale(x)^2)`` for ``x`` of shape ``(B, D)``."""
        self._check(x)
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def check_data(self, x: torch.Tensor) -> None:
        """Raise a clear ``ValueError`` if ``x`` cannot be scored by this model."""
        from ppgen.data import check_binary

        self._check(x)
        check_binary(x)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` draws of pixel probabilities ``sigmoid(decoder(z))``, ``z ~ p(z)``: shape ``(n, D)``."""
        device = next(self.parameters()).device
        return torch.sigmoid(self.decoder(torch.randn(n, self.z_dim, device=device)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities decoded from the posterior mean: shape ``(B, D)``."""
        self._check(x)
        loc, _ = self.encoder(x)
        return torch.sigmoid(self.decoder(loc))
