"""Seconds per GAN step (one discriminator and one generator update) of ppgen's adversarial loop
against a hand-written PyTorch loop on the same networks, batch and loss (non-saturating).

784-400-20 MLP generator/discriminator, batch 128, Adam 2e-4 betas (0.5, 0.999); one epoch of
``--steps`` batches each, timed in interleaved rounds; the ratio is of medians. Two references:
the loop as a user writes it (``torch.optim.Adam``'s default kernel) and the same loop with the
fused Adam ppgen uses (:func:`ppgen.devices.adam`), so the second ratio is the loop's own cost
(below 1 because ppgen's generator step skips the discriminator's parameter gradients).
Run: ``python bench/gan_step.py [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.nn import functional as F

from ppgen.adversarial import LoopConfig, adversarial_loop, make_discriminator, make_generator

D, Z, H, B = 784, 20, 400, 128


def hand_written(gen, disc, data: torch.Tensor, fused: bool = False) -> None:
    """The reference: the same updates with no logging, checks or checkpoints."""
    kernel = {"fused": True} if fused else {}
    opt_g = torch.optim.Adam(gen.parameters(), 2e-4, betas=(0.5, 0.999), **kernel)
    opt_d = torch.optim.Adam(disc.parameters(), 2e-4, betas=(0.5, 0.999), **kernel)
    order = torch.randperm(len(data))
    for b in range(0, len(data) - B + 1, B):
        x = data[order[b : b + B]]
        real, fake = disc(x), disc(gen(torch.randn(B, Z, device=x.device)).detach())
        loss_d = F.softplus(-real).mean() + F.softplus(fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = F.softplus(-disc(gen(torch.randn(B, Z, device=x.device)))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rounds = 3 if args.quick else 7
    data = torch.rand(B * args.steps, D, device=device)
    config = LoopConfig("ns", epochs=1, batch_size=B, device=args.device)
    times: dict[str, list[float]] = {"hand-written": [], "hand-written-fused": [], "ppgen": []}
    for _ in range(rounds):
        for name in times:
            torch.manual_seed(0)
            gen, disc = make_generator(Z, D, (H,)).to(device), make_discriminator(D, (H,)).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name == "ppgen":
                adversarial_loop(gen, disc, data, config)
            else:
                hand_written(gen, disc, data, fused=name == "hand-written-fused")
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'loop':<20}{'ms/step (median of ' + str(rounds) + ')':>28}")
    for k, v in med.items():
        print(f"{k:<20}{1000 * v:>28.3f}")
    results = [{"bench": "gan_step", "case": f"ppgen/{ref}", "value": med["ppgen"], "unit": "s/step",
                "reference": med[ref], "ratio": med["ppgen"] / med[ref], "target": 1.10, "better": "lower",
                "device": str(device)} for ref in ("hand-written", "hand-written-fused")]
    for result in results:
        print(json.dumps(result))
    return results


if __name__ == "__main__":
    main()
