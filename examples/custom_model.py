"""Declare your own Pyro model/guide pair and train it with ppgen's SVI loop and evidence tools.

The model is a linear factor model written the way Pyro's examples write one,
``z ~ N(0, I)``, ``x ~ N(W z + b, s^2 I)`` inside ``pyro.plate("data", B)``, with an amortized
MLP encoder as the guide. The data come from a known linear-Gaussian model, so the learned
model's importance-sampled log p(x) can be set against the exact log p(x) of the truth.

    python examples/custom_model.py --epochs 30
    python examples/custom_model.py --smoke
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class FactorModel(nn.Module):
    """``z ~ N(0, I_d)``, ``x ~ N(W z + b, s^2 I_D)``; guide ``q(z | x) = N(mu(x), diag sd(x)^2)``."""

    def __init__(self, x_dim: int, z_dim: int, hidden: int = 64):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = nn.Linear(z_dim, x_dim)  # W, b
        self.log_noise = nn.Parameter(torch.zeros(()))  # log s
        self.encoder = nn.Sequential(nn.Linear(x_dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * z_dim))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self)  # registers decoder and log_noise (and, unused here, the encoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), self.log_noise.exp()).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ppgen.infer.evidence import log_evidence
    from ppgen.infer.svi import SVIConfig, train_svi
    from ppgen.models.linear_gaussian import LinearGaussian

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--x-dim", type=int, default=8)
    p.add_argument("--z-dim", type=int, default=2)
    p.add_argument("--n", type=int, default=4000, help="training points")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--samples", type=int, default=500, help="K importance samples for log p(x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few seconds: small data, few epochs")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.epochs, args.samples = 1000, 8, 100

    truth = LinearGaussian.random(args.x_dim, args.z_dim, noise=0.5, seed=args.seed, dtype=torch.float32)
    train, test = truth.sample(args.n, seed=args.seed), truth.sample(500, seed=args.seed + 1)
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    fm = FactorModel(args.x_dim, args.z_dim)
    result = train_svi(fm.model, fm.guide, train, test, SVIConfig(epochs=args.epochs, batch_size=100, lr=1e-2,
                                                                   seed=args.seed), progress=False)
    ev = log_evidence(fm.model, fm.guide, test, args.samples, seed=args.seed)
    s = ev.summary()
    exact = float(truth.log_evidence(test.double()).mean())
    curve = " ".join(f"{h['val_elbo']:.2f}" for h in result.history)
    print(f"validation ELBO by epoch: {curve}")
    print(f"learned model on 500 test points: ELBO {s['elbo']:.3f}, IS log p(x) {s['log_px']:.3f} +- "
          f"{s['log_px_stderr']:.3f} (K={args.samples}), k-hat untrusted: {s['khat_share_untrusted']:.0%}")
    print(f"exact log p(x) under the generating model: {exact:.3f} (the learned model should approach it)")
    return {"elbo": s["elbo"], "log_px": s["log_px"], "stderr": s["log_px_stderr"], "exact_truth": exact,
            "first_val_elbo": result.history[0]["val_elbo"], "last_val_elbo": result.val_elbo}


if __name__ == "__main__":
    main()
