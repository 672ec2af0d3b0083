"""The shared networks, in plain PyTorch (no Pyro here).

The same classes serve every family: an encoder is the VAE's amortized guide network, and its
trunk is the GAN's discriminator and the score model's body; a decoder is the VAE's likelihood
network and the GAN's generator. All networks take and return flat tensors ``(B, D)``, so MLP and
convolutional versions are interchangeable.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["mlp", "Encoder", "Decoder", "ConvTrunk", "ConvDecoder", "make_encoder", "make_decoder"]


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them (none after the last)."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"mlp needs at least two positive layer widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class ConvTrunk(nn.Module):
    """Two stride-2 convolutions and a linear layer: ``(B, 784) -> (B, out_dim)`` for 1x28x28."""

    def __init__(self, out_dim: int, image_shape: tuple[int, ...] = (1, 28, 28), width: int = 32):
        super().__init__()
        c, h, w = image_shape
        if (h, w) != (28, 28):
            raise ValueError(f"the convolutional networks take 28x28 images, got {h}x{w}")
        self.image_shape = tuple(image_shape)
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 4, 2, 1),  # 14x14
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, 2 * width, 4, 2, 1),  # 7x7
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(2 * width * 49, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, *self.image_shape))


class ConvDecoder(nn.Module):
    """Linear layer and two stride-2 transposed convolutions: ``(B, z) -> (B, 784)`` outputs."""

    def __init__(self, z_dim: int, image_shape: tuple[int, ...] = (1, 28, 28), width: int = 32):
        super().__init__()
        c, h, w = image_shape
        if (h, w) != (28, 28):
            raise ValueError(f"the convolutional networks take 28x28 images, got {h}x{w}")
        self.z_dim, self.width = z_dim, width
        self.fc = nn.Sequential(nn.Linear(z_dim, 2 * width * 49), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1),  # 14x14
            nn.ReLU(),
            nn.ConvTranspose2d(width, c, 4, 2, 1),  # 28x28
            nn.Flatten(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).reshape(-1, 2 * self.width, 7, 7)
        return self.net(h).reshape(*z.shape[:-1], -1)


class Encoder(nn.Module):
    """Amortized Gaussian encoder: ``x (B, D) -> loc (B, z), scale (B, z)``.

    :param trunk: network ``(B, D) -> (B, H)``; its output feeds two linear heads.
    """

    def __init__(self, trunk: nn.Module, hidden_dim: int, z_dim: int, x_dim: int):
        super().__init__()
        self.x_dim, self.z_dim = x_dim, z_dim
        self.trunk = trunk
        self.loc = nn.Linear(hidden_dim, z_dim)
        self.scale = nn.Linear(hidden_dim, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.x_dim:
            raise ValueError(
                f"encoder expects inputs of width {self.x_dim}, got shape {tuple(x.shape)}; "
                "flatten images to (batch, pixels) and check the dataset matches the model"
            )
        h = F.relu(self.trunk(x))
        return self.loc(h), F.softplus(self.scale(h)) + 1e-4


class Decoder(nn.Module):
    """Decoder ``z (..., z) -> (..., D)`` unconstrained outputs (Bernoulli logits, Gaussian means)."""

    def __init__(self, net: nn.Module, z_dim: int, x_dim: int):
        super().__init__()
        self.z_dim, self.x_dim = z_dim, x_dim
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[-1] != self.z_dim:
            raise ValueError(f"decoder expects latents of width {self.z_dim}, got {tuple(z.shape)}")
        return self.net(z)


def make_encoder(
    x_dim: int,
    z_dim: int,
    hidden: Sequence[int] = (400,),
    arch: str = "mlp",
    image_shape: tuple[int, ...] = (1, 28, 28),
) -> Encoder:
    """An MLP (``hidden`` widths) or convolutional :class:`Encoder`."""
    if arch == "mlp":
        return Encoder(mlp([x_dim, *hidden]), hidden[-1], z_dim, x_dim)
    if arch == "conv":
        return Encoder(ConvTrunk(hidden[-1], image_shape), hidden[-1], z_dim, x_dim)
    raise ValueError(f"unknown architecture {arch!r}; choose 'mlp' or 'conv'")


def make_decoder(
    z_dim: int,
    x_dim: int,
    hidden: Sequence[int] = (400,),
    arch: str = "mlp",
    image_shape: tuple[int, ...] = (1, 28, 28),
) -> Decoder:
    """An MLP (reversed ``hidden`` widths) or convolutional :class:`Decoder`."""
    if arch == "mlp":
        return Decoder(mlp([z_dim, *reversed(hidden), x_dim]), z_dim, x_dim)
    if arch == "conv":
        return Decoder(ConvDecoder(z_dim, image_shape), z_dim, x_dim)
    raise ValueError(f"unknown architecture {arch!r}; choose 'mlp' or 'conv'")
