"""Per-step time of ppgen's SVI step against a hand-written PyTorch VAE and plain Pyro SVI.

Same 784-400-20 networks, batch 128, Adam, the same sampled-KL ELBO (one z per datapoint).
The hand-written reference uses torch's default Adam, as such a loop is usually written; a second
hand-written loop with the fused Adam that ppgen uses shows what is left of Pyro's own overhead
(printed, with no target).
The three are timed in interleaved rounds in one process, so load on the machine affects
them alike; the ratio is of medians. Run: ``python bench/svi_step.py [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.nn import functional as F

from ppgen.infer.svi import SVIConfig, make_svi_step
from ppgen.models.vae import VAE

D, Z, H, B = 784, 20, 400, 128


def hand_written(vae: VAE, lr: float, fused: bool = False):
    """The lean reference: log densities written out, no distribution objects or validation.
    ``fused`` picks torch's fused Adam kernel (ppgen's choice) over torch's default."""
    opt = torch.optim.Adam(vae.parameters(), lr=lr, fused=fused or None)

    def step(x):
        loc, scale = vae.encoder(x)
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_lik = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
        # log p(z) - log q(z|x) for z = loc + scale * eps; the 0.5 log(2 pi) terms cancel
        log_ratio = (-0.5 * z.pow(2) + 0.5 * eps.pow(2) + scale.log()).sum()
        loss = -(log_lik + log_ratio)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def plain_pyro(vae: VAE, lr: float):
    # As Pyro's VAE example does it: pyro.optim.Adam and svi.step.
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    return svi.step


def ppgen_step(vae: VAE, lr: float, x: torch.Tensor):
    step, _ = make_svi_step(vae.model, vae.guide, SVIConfig(lr=lr), x)
    return step


def time_steps(step, batches, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in batches:
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rounds, steps = (3, 20) if args.quick else (7, 50)
    torch.manual_seed(0)
    batches = [torch.bernoulli(torch.rand(B, D, device=device)) for _ in range(steps)]
    # Separate networks per contestant, same initial weights; each step function owns one.
    base = VAE(D, Z, (H,)).to(device)
    nets = {k: VAE(D, Z, (H,)).to(device) for k in ("hand-written", "hand-fused", "plain-pyro", "ppgen")}
    for v in nets.values():
        v.load_state_dict(base.state_dict())
    times: dict[str, list[float]] = {k: [] for k in nets}
    makers = {
        "hand-written": lambda: hand_written(nets["hand-written"], 1e-3),
        "hand-fused": lambda: hand_written(nets["hand-fused"], 1e-3, fused=True),
        "plain-pyro": lambda: plain_pyro(nets["plain-pyro"], 1e-3),
        "ppgen": lambda: ppgen_step(nets["ppgen"], 1e-3, batches[0]),
    }
    for _ in range(rounds):
        for name, make in makers.items():
            fn = make()  # Pyro-based steps are rebuilt: they share Pyro's global param store
            fn(batches[0])  # warm-up
            times[name].append(time_steps(fn, batches, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'loop':<14}{'ms/step (median of ' + str(rounds) + ')':>28}")
    for k, v in med.items():
        print(f"{k:<14}{1000 * v:>28.3f}")
    results = [
        {"bench": "svi_step", "case": "ppgen/hand-written", "value": med["ppgen"], "unit": "s/step",
         "reference": med["hand-written"], "ratio": med["ppgen"] / med["hand-written"], "target": 1.10,
         "better": "lower", "device": str(device)},
        {"bench": "svi_step", "case": "ppgen/plain-pyro", "value": med["ppgen"], "unit": "s/step",
         "reference": med["plain-pyro"], "ratio": med["ppgen"] / med["plain-pyro"], "target": 0.75,
         "better": "lower", "device": str(device)},
        {"bench": "svi_step", "case": "ppgen/hand-written-fused-adam", "value": med["ppgen"], "unit": "s/step",
         "reference": med["hand-fused"], "ratio": med["ppgen"] / med["hand-fused"], "target": None,
         "better": "lower", "device": str(device)},
    ]
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
