"""Train a noise-conditional score model from Python and sample it by annealed Langevin dynamics.

Denoising score matching over a geometric noise ladder (Vincent 2011; Song & Ermon 2019) on the
8-Gaussians ring, whose noised score is known exactly (a Gaussian mixture), so the learned score
is checked against the truth; then annealed Langevin sampling and the VEEGAN mode count.

    python examples/score_from_python.py --steps 3000
    python examples/score_from_python.py --smoke
"""

from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

import torch


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from ppgen.data import TOY_RADIUS, TOY_STD, toy_sample
    from ppgen.score import GaussianMixture, annealed_langevin
    from ppgen.metrics import mode_coverage
    from ppgen.score import ScoreNet, geometric_sigmas, ncsn_loss

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="Adam steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--levels", type=int, default=8, help="noise levels from 3 down to 0.1")
    p.add_argument("--langevin-steps", type=int, default=50, help="Langevin steps per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.langevin_steps = 300, 10

    torch.manual_seed(args.seed)
    data = toy_sample("8gaussians", 10000, seed=args.seed)
    sigmas = geometric_sigmas(3.0, 0.1, args.levels)
    net = ScoreNet(2, (128, 128), conditional=True)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for step in range(args.steps):
        loss = ncsn_loss(net, data[torch.randint(len(data), (args.batch_size,))], sigmas)
        opt.zero_grad()
        loss.backward()
        opt.step()

    angles = torch.arange(8) * (2 * math.pi / 8)
    truth = GaussianMixture([1.0] * 8, (TOY_RADIUS * torch.stack([angles.cos(), angles.sin()], -1)).tolist(), TOY_STD)
    errors = {}
    with torch.no_grad():
        for sigma in (float(sigmas[0]), float(sigmas[-1])):
            x = truth.sample(2000, torch.Generator().manual_seed(args.seed), sigma=sigma)
            ref = truth.score(x, sigma)
            errors[sigma] = float((net(x, torch.full((2000,), sigma)) - ref).pow(2).sum(-1).mean() / ref.pow(2).sum(-1).mean())
        x0 = torch.rand(2000, 2, generator=torch.Generator().manual_seed(args.seed)) * 8 - 4
        samples = annealed_langevin(net, x0, sigmas, eta=0.1 * float(sigmas[-1]) ** 2, steps_per_level=args.langevin_steps,
                                    denoise=True, generator=torch.Generator().manual_seed(args.seed)).x
    modes, quality = mode_coverage(samples)
    print(f"{args.steps} steps, final DSM loss {float(loss.detach()):.3f}")
    for sigma, err in errors.items():
        print(f"relative squared error of the learned score against the exact score at sigma={sigma:.2f}: {err:.3f}")
    print(f"annealed Langevin ({args.levels} levels x {args.langevin_steps} steps): modes covered {modes}/8, "
          f"high-quality samples {quality:.0%}")
    return {"errors": errors, "modes": modes, "quality": quality, "loss": float(loss.detach())}


if __name__ == "__main__":
    main()
