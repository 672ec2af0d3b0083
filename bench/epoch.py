"""Seconds per Fashion-MNIST epoch and the validation ELBO reached, for the same VAE trained by
a hand-written PyTorch loop, plain Pyro SVI and ppgen's SVI loop.

784-400-20 VAE, batch 128, Adam 1e-3, dynamic binarization, sampled-KL ELBO; every model is
scored by the same estimator (ppgen.infer.svi.evaluate_elbo on the validation split).
Run: ``python bench/epoch.py [--epochs 10] [--device cuda] [--data digits]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from ppgen.data import binarize, load_dataset
from ppgen.infer.svi import SVIConfig, evaluate_elbo, train_svi
from ppgen.models.vae import VAE
from ppgen.runs import seed_everything

try:  # run as a script from the repository root
    from svi_step import hand_written
except ImportError:  # imported as bench.epoch
    from bench.svi_step import hand_written


def epochs_of(step, data: torch.Tensor, epochs: int, batch: int) -> float:
    """Run ``epochs`` passes of ``step`` over shuffled, freshly binarized batches; seconds per epoch."""
    n = len(data) // batch
    step(binarize(data[:batch]))  # warm-up, as ppgen's loop does its registration pass untimed
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(data), device=data.device)
        for i in range(n):
            step(binarize(data[perm[i * batch : (i + 1) * batch]]))
    if data.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / epochs


def run_one(name: str, data, train, val, epochs: int, seed: int, device: torch.device) -> tuple[float, float]:
    """Train one loop from seed ``seed``; returns (seconds per epoch, validation ELBO)."""
    seed_everything(seed)
    vae = VAE(data.dim, 20, (400,)).to(device)
    if name == "ppgen":
        t0 = time.perf_counter()
        train_svi(vae.model, vae.guide, train, None, SVIConfig(epochs=epochs, seed=seed, device=str(device)),
                  transform=binarize, progress=False)
        seconds = (time.perf_counter() - t0) / epochs
    else:
        if name == "hand-written":
            step = hand_written(vae, 1e-3)
        else:
            pyro.clear_param_store()
            step = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO()).step
        seconds = epochs_of(step, train, epochs, 128)
    return seconds, evaluate_elbo(vae.model, vae.guide, val, num_particles=10)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, default=1, help="training seeds per loop (ELBO mean and spread)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    data = load_dataset(args.data, download=False)
    train, val = data.train.to(device), data.val.to(device)
    names = ("hand-written", "plain-pyro", "ppgen")
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for seed in range(args.seeds):  # seed-major, so a change of load on the machine hits all three alike
        for k in names:
            runs[k].append(run_one(k, data, train, val, args.epochs, seed, device))
    rows = {k: (statistics.median(s for s, _ in v), statistics.mean(e for _, e in v),
                statistics.stdev(e for _, e in v) if len(v) > 1 else float("nan")) for k, v in runs.items()}
    print(f"{'loop':<14}{'s/epoch':>10}{'val ELBO':>12}{'sd':>8}   ({args.data}, {args.epochs} epochs, "
          f"{args.seeds} seeds, {device})")
    for k, (s, e, sd) in rows.items():
        print(f"{k:<14}{s:>10.2f}{e:>12.2f}{sd:>8.2f}")
    out = []
    for ref in ("hand-written", "plain-pyro"):
        out.append({"bench": "epoch", "case": f"ppgen/{ref} seconds", "value": rows["ppgen"][0], "unit": "s/epoch",
                    "reference": rows[ref][0], "ratio": rows["ppgen"][0] / rows[ref][0],
                    "target": 1.10 if ref == "hand-written" else 0.75, "better": "lower", "device": str(device)})
        out.append({"bench": "epoch", "case": f"ppgen-{ref} val ELBO (mean over seeds)", "value": rows["ppgen"][1],
                    "unit": "nats", "reference": rows[ref][1], "ratio": rows["ppgen"][1] / rows[ref][1],
                    "target": "within 0.5 nats", "better": "higher", "device": str(device)})
    for r in out:
        print(json.dumps(r))
    return out


if __name__ == "__main__":
    main()
