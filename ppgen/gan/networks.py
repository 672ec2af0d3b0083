"""The GAN's networks: the VAE's decoder as generator, the encoder's trunk with a scalar head as
discriminator, so the GAN and the VAE can be compared on the same networks (Goodfellow et al.
2014, "Generative Adversarial Nets"); and spectral normalization of a discriminator (Miyato et
al. 2018, "Spectral Normalization for Generative Adversarial Networks").

Discriminators output logits ``d``; ``D(x) = sigmoid(d)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ppgen.nets import Decoder, make_decoder, make_encoder

__all__ = ["Generator", "Discriminator", "make_generator", "make_discriminator", "spectral_normalize"]


class Generator(nn.Module):
    """``z (B, z_dim) -> x (B, D)``: a :class:`ppgen.nets.Decoder`, then ``sigmoid`` for images
    (pixel intensities in [0, 1]) or nothing for real-valued (toy) data."""

    def __init__(self, decoder: Decoder, sigmoid: bool = True):
        super().__init__()
        self.decoder, self.sigmoid = decoder, sigmoid
        self.z_dim, self.x_dim = decoder.z_dim, decoder.x_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return torch.sigmoid(out) if self.sigmoid else out

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` samples ``G(z), z ~ N(0, I)``: shape ``(n, D)``."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.z_dim, generator=generator).to(device)
        return self(z)


class Discriminator(nn.Module):
    """``x (B, D) -> logits (B,)``: an encoder trunk, a leaky ReLU and a scalar linear head."""

    def __init__(self, trunk: nn.Module, hidden_dim: int, x_dim: int):
        super().__init__()
        self.trunk, self.x_dim = trunk, x_dim
        self.head = nn.Linear(hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(f"discriminator expects inputs of shape (batch, {self.x_dim}), got {tuple(x.shape)}")
        return self.head(F.leaky_relu(self.trunk(x), 0.2)).squeeze(-1)


def make_generator(z_dim: int, x_dim: int, hidden: Sequence[int] = (400,), arch: str = "mlp",
                   image_shape: tuple = (1, 28, 28), sigmoid: bool = True) -> Generator:
    """The decoder of :func:`ppgen.nets.make_decoder` as a generator."""
    return Generator(make_decoder(z_dim, x_dim, hidden, arch, image_shape), sigmoid)


def make_discriminator(x_dim: int, hidden: Sequence[int] = (400,), arch: str = "mlp",
                       image_shape: tuple = (1, 28, 28)) -> Discriminator:
    """The trunk of :func:`ppgen.nets.make_encoder` with a scalar head."""
    trunk = make_encoder(x_dim, 1, hidden, arch, image_shape).trunk
    return Discriminator(trunk, hidden[-1], x_dim)


def spectral_normalize(module: nn.Module) -> nn.Module:
    """Put :func:`torch.nn.utils.parametrizations.spectral_norm` on every ``Linear`` and ``Conv``
    layer of ``module`` that has none yet (in place; returns ``module``). Each weight is divided by
    its largest singular value, estimated by one power iteration per training-mode forward pass
    (Miyato et al. 2018); a convolution's kernel is taken as the matrix ``(out, in * kh * kw)``, as
    there. Its initial vector is drawn from the global random stream."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import spectral_norm

    for layer in list(module.modules()):
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not parametrize.is_parametrized(layer, "weight"):
            spectral_norm(layer)
    return module
