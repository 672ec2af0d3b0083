"""A sparse gamma deep exponential family (Ranganath et al. 2015) on synthetic counts, in Pyro's idiom.

Three layers of positive local latents per datapoint (``z_top -> z_mid -> z_bottom``), each
Gamma with its mean set by the layer above through positive weights, and Poisson counts at the
bottom. The weights are *global* latents with sparse Gamma priors, each matrix in its own plate;
the datapoints sit in ``pyro.plate("data", ...)``. The guide has a Gamma factor for every weight
(its own parameters) and, unlike the non-amortized guide of the paper and Pyro's example, an
encoder for the locals, so new datapoints (held-out evidence) can be scored. With global latents
there is no per-datapoint evidence: ``ppgen.joint_log_evidence`` estimates ``log p(x_1..N)``.

    python examples/pyro_models/sparse_gamma_def.py
    python examples/pyro_models/sparse_gamma_def.py --smoke
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from torch import nn

TOP, MID, BOTTOM, X_DIM, HIDDEN = 3, 5, 8, 24, 32
ALPHA_Z, BETA_Z, ALPHA_W, BETA_W = 0.1, 0.1, 0.1, 0.3
MIN_SHAPE, MIN_MEAN = 1e-3, 1e-6  # floors on the guide's Gamma parameters


class SparseGammaDEF(nn.Module):
    def __init__(self):
        super().__init__()
        widths = (TOP, MID, BOTTOM)
        self.encoder = nn.Sequential(nn.Linear(X_DIM, HIDDEN), nn.Softplus())
        self.heads = nn.ModuleDict({name: nn.Linear(HIDDEN, 2 * w) for name, w in zip(("z_top", "z_mid", "z_bottom"),
                                                                                   widths)})

    def model(self, x):
        with pyro.plate("w_top_plate", TOP * MID):
            w_top = pyro.sample("w_top", dist.Gamma(x.new_tensor(ALPHA_W), x.new_tensor(BETA_W)))
        with pyro.plate("w_mid_plate", MID * BOTTOM):
            w_mid = pyro.sample("w_mid", dist.Gamma(x.new_tensor(ALPHA_W), x.new_tensor(BETA_W)))
        with pyro.plate("w_bottom_plate", BOTTOM * X_DIM):
            w_bottom = pyro.sample("w_bottom", dist.Gamma(x.new_tensor(ALPHA_W), x.new_tensor(BETA_W)))
        # Vectorized particles put a dim in front of each weight vector: keep it in the reshape.
        w_top = w_top.reshape(w_top.shape[:-1] + (1, TOP, MID))
        w_mid = w_mid.reshape(w_mid.shape[:-1] + (1, MID, BOTTOM))
        w_bottom = w_bottom.reshape(w_bottom.shape[:-1] + (1, BOTTOM, X_DIM))

        with pyro.plate("data", x.shape[0]):
            z_top = pyro.sample("z_top", dist.Gamma(x.new_tensor(ALPHA_Z), BETA_Z).expand([TOP]).to_event(1))
            mean_mid = (z_top.unsqueeze(-2) @ w_top).squeeze(-2)
            z_mid = pyro.sample("z_mid", dist.Gamma(ALPHA_Z, BETA_Z / mean_mid).to_event(1))
            mean_bottom = (z_mid.unsqueeze(-2) @ w_mid).squeeze(-2)
            z_bottom = pyro.sample("z_bottom", dist.Gamma(ALPHA_Z, BETA_Z / mean_bottom).to_event(1))
            rate = (z_bottom.unsqueeze(-2) @ w_bottom).squeeze(-2)
            pyro.sample("obs", dist.Poisson(rate).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("def_encoder", self)

        def sample_weights(name, size):
            shape = pyro.param(f"{name}_shape_q", lambda: torch.full((size,), 1.0), constraint=constraints.positive)
            mean = pyro.param(f"{name}_mean_q", lambda: torch.full((size,), 0.5), constraint=constraints.positive)
            shape, mean = shape.clamp_min(MIN_SHAPE), mean.clamp_min(MIN_MEAN)
            with pyro.plate(f"{name}_plate", size):
                pyro.sample(name, dist.Gamma(shape, shape / mean))

        sample_weights("w_top", TOP * MID)
        sample_weights("w_mid", MID * BOTTOM)
        sample_weights("w_bottom", BOTTOM * X_DIM)
        h = self.encoder(torch.log1p(x))
        with pyro.plate("data", x.shape[0]):
            for name in ("z_top", "z_mid", "z_bottom"):
                log_shape, log_mean = self.heads[name](h).chunk(2, dim=-1)
                shape, mean = F.softplus(log_shape).clamp_min(MIN_SHAPE), log_mean.exp().clamp_min(MIN_MEAN)
                pyro.sample(name, dist.Gamma(shape, shape / mean).to_event(1))


def synthetic_counts(n: int, seed: int = 0) -> torch.Tensor:
    """Counts ``(n, 24)`` from a one-layer Gamma-Poisson factorisation with sparse loadings."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    w = torch.distributions.Gamma(0.3, 0.3).sample((3, X_DIM))
    z = torch.distributions.Gamma(1.0, 1.0).sample((n, 3))
    return torch.poisson(2.0 * z @ w, generator=g)


torch.manual_seed(0)
sgdef = SparseGammaDEF()
model, guide = sgdef.model, sgdef.guide


def main(argv: Optional[Sequence[str]] = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _ppgen_checks import run_checks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--n", type=int, default=400, help="training datapoints")
    p.add_argument("--smoke", action="store_true", help="a few seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs = 30
    counts = synthetic_counts(args.n + 100, seed=3)
    pyro.clear_param_store()
    return run_checks("sparse_gamma_def", model, guide, counts[100:], counts[:100], smoke=args.smoke,
                      epochs=args.epochs, lr=1e-2, batch_size=100, global_latents=True,
                      importance_k=1000 if args.smoke else 10000)


if __name__ == "__main__":
    main()
