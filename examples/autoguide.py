"""Write only the model: ppgen builds the amortized encoder guide for every local latent.

The model has two local latents per datapoint, a real code ``z`` and a positive brightness ``s``:

    z_n ~ N(0, I_2),   s_n ~ LogNormal(0, 0.3),   x_n ~ N(s_n * decoder(z_n), diag sigma^2)

``AmortizedGuide(model)`` traces it once, finds ``z`` and ``s`` inside ``pyro.plate("data")``,
and builds one MLP encoder with a head per site (``s`` through ``exp``, so its draws are
positive). The pair is trained by ppgen's SVI loop, its evidence is estimated by importance
sampling, and the gradient estimators are compared on it, all unchanged.

    python examples/autoguide.py --epochs 30 --family fullcov
    python examples/autoguide.py --smoke
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

D, Z = 8, 2


def make_model(decoder: nn.Module, noise: Optional[float] = None):
    """The Pyro model above, with the ppgen helpers (plain ``pyro.sample`` works just as well);
    ``noise=None`` learns the per-pixel noise scale (initial 0.1) with the decoder."""
    from ppgen.models.helpers import data_plate, likelihood, observe

    lik = likelihood("gaussian", D, scale=noise)

    def model(x: torch.Tensor) -> None:
        pyro.module("decoder", decoder)
        if noise is None:
            pyro.module("likelihood", lik)
        with data_plate(x):
            z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))
            s = pyro.sample("s", dist.LogNormal(x.new_zeros(()), 0.3))
            observe(x, lik, s.unsqueeze(-1) * decoder(z))

    return model


def simulate(n: int, seed: int) -> torch.Tensor:
    """Data from the model with a fixed random nonlinear decoder."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(Z, 16, generator=g), torch.randn(16, D, generator=g) / 4
    z, s = torch.randn(n, Z, generator=g), (0.3 * torch.randn(n, generator=g)).exp()
    return s[:, None] * (torch.tanh(z @ w1) @ w2) + 0.2 * torch.randn(n, D, generator=g)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ppgen import AmortizedGuide, SVIConfig, log_evidence, train_svi
    from ppgen.infer.variance import format_table, gradient_stats

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="training points")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--family", default="diag", choices=["diag", "fullcov", "iaf"], help="guide family of z")
    p.add_argument("--samples", type=int, default=500, help="K importance samples for log p(x)")
    p.add_argument("--draws", type=int, default=200, help="gradient draws per estimator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few seconds: small data, few epochs")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.epochs, args.samples, args.draws = 1000, 8, 100, 50
    torch.set_num_threads(1)
    train, test = simulate(args.n, args.seed), simulate(500, args.seed + 1)
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    decoder = nn.Sequential(nn.Linear(Z, 32), nn.Tanh(), nn.Linear(32, D))
    model = make_model(decoder)
    guide = AmortizedGuide(model, family=args.family, hidden=(64,))
    result = train_svi(model, guide, train, test, SVIConfig(epochs=args.epochs, batch_size=100, lr=1e-2, seed=args.seed),
                       progress=False)
    print("guide sites:", ", ".join(f"{s.name} ({'local' if s.local else 'global'}, width {s.width})" for s in guide.sites))
    print("validation ELBO by epoch:", " ".join(f"{h['val_elbo']:.2f}" for h in result.history))

    with torch.no_grad():
        s_draws = torch.stack([guide(test)["s"] for _ in range(10)])
    ev = log_evidence(model, guide, test, args.samples, seed=args.seed).summary()
    print(f"test: ELBO {ev['elbo']:.3f}, IS log p(x) {ev['log_px']:.3f} +- {ev['log_px_stderr']:.3f} "
          f"(K={args.samples}), k-hat untrusted: {ev['khat_share_untrusted']:.0%}; guide draws of s in "
          f"[{float(s_draws.min()):.3f}, {float(s_draws.max()):.3f}]")

    estimators = ["reparam", "stl", "score", "score-baseline"]
    stats = gradient_stats(model, guide, test[:100], estimators, num_draws=args.draws, reference_draws=4 * args.draws)
    print("\n".join(format_table(stats, levels=("all",), relative_to="reparam")))
    rows = {r["estimator"]: r for r in stats.rows if r["level"] == "all"}
    return {
        "first_val_elbo": result.history[0]["val_elbo"], "last_val_elbo": result.val_elbo,
        "elbo": ev["elbo"], "log_px": ev["log_px"], "stderr": ev["log_px_stderr"], "min_s": float(s_draws.min()),
        "variance": {e: rows[e]["variance"] for e in estimators}, "max_z": {e: rows[e]["max_z"] for e in estimators},
    }


if __name__ == "__main__":
    main()
