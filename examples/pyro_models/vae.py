"""The variational autoencoder of Kingma & Welling (2014) on binarized 8x8 digits, in Pyro's idiom.

A Gaussian latent code per image, a Bernoulli decoder, an encoder network as the guide; the
datapoints sit in ``pyro.plate("data", ...)``. Run through ppgen's SVI loop, evidence, gradient
statistics and automatic guide by ``_ppgen_checks.run_checks``.

    python examples/pyro_models/vae.py
    python examples/pyro_models/vae.py --smoke
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

Z_DIM, HIDDEN, X_DIM = 4, 64, 64


class Encoder(nn.Module):
    def __init__(self, z_dim: int = Z_DIM, hidden: int = HIDDEN):
        super().__init__()
        self.fc = nn.Linear(X_DIM, hidden)
        self.fc_loc = nn.Linear(hidden, z_dim)
        self.fc_scale = nn.Linear(hidden, z_dim)

    def forward(self, x):
        h = torch.nn.functional.softplus(self.fc(x))
        return self.fc_loc(h), torch.exp(self.fc_scale(h))


class Decoder(nn.Module):
    def __init__(self, z_dim: int = Z_DIM, hidden: int = HIDDEN):
        super().__init__()
        self.fc = nn.Linear(z_dim, hidden)
        self.fc_out = nn.Linear(hidden, X_DIM)

    def forward(self, z):
        return torch.sigmoid(self.fc_out(torch.nn.functional.softplus(self.fc(z))))


class VAE(nn.Module):
    def __init__(self, z_dim: int = Z_DIM):
        super().__init__()
        self.encoder, self.decoder, self.z_dim = Encoder(z_dim), Decoder(z_dim), z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(x.shape[0], self.z_dim)
            z_scale = x.new_ones(x.shape[0], self.z_dim)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            probs = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(probs, validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


torch.manual_seed(0)
vae = VAE()
model, guide = vae.model, vae.guide


def main(argv: Optional[Sequence[str]] = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ppgen_checks import run_checks

    from ppgen import load_dataset

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--smoke", action="store_true", help="a few seconds")
    args = p.parse_args(argv)
    data = load_dataset("digits", "static")
    pyro.clear_param_store()
    return run_checks("vae", model, guide, data.train, data.val, smoke=args.smoke,
                      epochs=4 if args.smoke else args.epochs, lr=3e-3,
                      importance_k=1000 if args.smoke else 5000)


if __name__ == "__main__":
    main()
