"""The conditional VAE of Sohn et al. (2015): complete an 8x8 digit from the part that is visible.

``xs`` is the image with three quarters hidden (hidden pixels set to -1, the visible quarter
kept), ``ys`` the whole image. A prior network gives ``p(z | xs)``, a recognition network
``q(z | xs, ys)``, and the likelihood scores only the hidden pixels: the Bernoulli is indexed by
the boolean mask ``xs == -1``, as Pyro's CVAE example does. The plate is an unsized
``pyro.plate("data")``. Without ``ys`` the model predicts and records the completion.

    python examples/pyro_models/cvae.py
    python examples/pyro_models/cvae.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

X_DIM, Z_DIM, HIDDEN = 64, 4, 64


def mask_quadrants(images: torch.Tensor, visible: int = 0) -> torch.Tensor:
    """``images (B, 64)`` with every pixel outside quadrant ``visible`` (0: top left) set to -1."""
    b = images.shape[0]
    grid = images.reshape(b, 8, 8).clone()
    keep = torch.zeros(8, 8, dtype=torch.bool)
    r, c = divmod(visible, 2)
    keep[4 * r: 4 * r + 4, 4 * c: 4 * c + 4] = True
    grid[:, ~keep] = -1.0
    return grid.reshape(b, X_DIM)


class GaussianNet(nn.Module):
    """An MLP giving the location and scale of a diagonal Gaussian over ``z``."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(in_dim, HIDDEN), nn.ReLU())
        self.loc = nn.Linear(HIDDEN, Z_DIM)
        self.log_scale = nn.Linear(HIDDEN, Z_DIM)

    def forward(self, inputs):
        h = self.hidden(inputs)
        return self.loc(h), self.log_scale(h).exp()


class CVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.prior_net = GaussianNet(X_DIM)
        self.recognition_net = GaussianNet(2 * X_DIM)
        self.generation_net = nn.Sequential(nn.Linear(Z_DIM + X_DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, X_DIM))

    def model(self, xs, ys=None):
        pyro.module("generation_net", self)
        batch_size = xs.shape[0]
        with pyro.plate("data"):
            prior_loc, prior_scale = self.prior_net(xs)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            probs = torch.sigmoid(self.generation_net(torch.cat([zs, xs], dim=-1)))
            if ys is not None:
                hidden = xs == -1
                hidden_probs = probs[hidden].view(batch_size, -1)
                hidden_ys = ys[hidden].view(batch_size, -1)
                pyro.sample("y", dist.Bernoulli(hidden_probs, validate_args=False).to_event(1), obs=hidden_ys)
            else:
                pyro.deterministic("y", probs.detach())
            return probs

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                loc, scale = self.prior_net(xs)
            else:
                loc, scale = self.recognition_net(torch.cat([xs, ys], dim=-1))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


torch.manual_seed(0)
cvae = CVAE()
model, guide = cvae.model, cvae.guide


def main(argv: Optional[Sequence[str]] = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ppgen_checks import run_checks

    from ppgen import load_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="a few seconds")
    args = p.parse_args(argv)
    data = load_dataset("digits", "static")
    train = (mask_quadrants(data.train), data.train)
    held_out = (mask_quadrants(data.val), data.val)
    pyro.clear_param_store()
    return run_checks("cvae", model, guide, train, held_out, smoke=args.smoke, epochs=4 if args.smoke else args.epochs,
                      lr=3e-3, importance_k=1000 if args.smoke else 5000,
                      sequential_evidence="the likelihood indexes probs (K, B, 64) by a (B, 64) boolean mask")


if __name__ == "__main__":
    main()
