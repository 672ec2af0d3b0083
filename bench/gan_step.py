"""Seconds per GAN step (one discriminator and one generator update) of ppgen's adversarial loop
against a hand-written PyTorch loop on the same networks, batch and loss (non-saturating).

784-400-20 MLP generator/discriminator, batch 128, Adam 2e-4 betas (0.5, 0.999); one epoch of
``--steps`` batches each, timed in interleaved rounds; the ratio is of medians. Two references:
the loop as a user writes it (``torch.optim.Adam``'s default kernel) and the same loop with the
fused Adam ppgen uses (:func:`ppgen.devices.adam`), so the second ratio is the loop's own cost
(below 1 because ppgen's generator step skips the discriminator's parameter gradients).

The stabilizers' cost is timed against ppgen's plain step (all stabilizers off) in the same
rounds: spectral normalization of the discriminator (one power iteration per D forward), the R1
penalty (a double backward through D on the real batch, gamma 1), the generator EMA (decay 0.999,
one fused lerp per G step), and all three together.
Run: ``python bench/gan_step.py [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
from torch.nn import functional as F

from ppgen.gan import LoopConfig, adversarial_loop, make_discriminator, make_generator

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
    plain = LoopConfig("ns", epochs=1, batch_size=B, device=args.device, spectral_norm=False, r1_gamma=0.0,
                       ema_decay=0.0)
    configs = {"ppgen": plain, "ppgen+sn": dataclasses.replace(plain, spectral_norm=True),
               "ppgen+r1": dataclasses.replace(plain, r1_gamma=1.0),
               "ppgen+ema": dataclasses.replace(plain, ema_decay=0.999),
               "ppgen+sn+r1+ema": dataclasses.replace(plain, spectral_norm=True, r1_gamma=1.0, ema_decay=0.999)}
    times: dict[str, list[float]] = {"hand-written": [], "hand-written-fused": [], **{k: [] for k in configs}}
    for _ in range(rounds):
        for name in times:
            torch.manual_seed(0)
            gen, disc = make_generator(Z, D, (H,)).to(device), make_discriminator(D, (H,)).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name in configs:
                adversarial_loop(gen, disc, data, configs[name])
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
    targets = {"ppgen+sn": 1.3, "ppgen+r1": 2.0, "ppgen+ema": 1.1, "ppgen+sn+r1+ema": 2.3}  # vs the plain step
    results += [{"bench": "gan_step", "case": f"{name}/ppgen", "value": med[name], "unit": "s/step",
                 "reference": med["ppgen"], "ratio": med[name] / med["ppgen"], "target": target, "better": "lower",
                 "device": str(device)} for name, target in targets.items()]
    for result in results:
        print(json.dumps(result))
    return results


if __name__ == "__main__":
    main()
