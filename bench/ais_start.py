"""Benchmark: AIS started at the encoder's q(z|x) vs AIS from the prior vs IS, on a trained VAE.

On the first ``--images`` test images of a trained VAE run (default runs/fm), in one process:
importance sampling with the encoder as proposal (``--is-samples`` K, k-hat per image), AIS
(:func:`ppgen.infer.ais.ais_log_evidence`, ``--chains`` chains, sigmoid schedule) started at
the encoder (``start=guide_start(vae.guide)``) for each of ``--encoder-steps`` and started at
the prior for each of ``--prior-steps``. AIS is a stochastic lower bound, so the highest mean
log p(x) of all AIS runs serves as the reference; each run's error is its distance below it.
For each prior-start T' the bench states the fewest encoder-start steps T whose mean is within
one combined standard error of (or above) the prior start's mean at T' ("steps needed"), and
how far the best encoder-start AIS lies from IS on the images whose k-hat IS trusts (and on all).
With ``--bdmc-steps``, BDMC (:func:`ppgen.infer.ais.bdmc`) on as many images simulated from the
VAE, from the encoder and from the prior: lower <= log p(x*) <= upper, the gap bounding AIS's
error there. ``--budget-s`` skips a run whose projected time (from the slowest seconds per step
seen so far in runs of 10 steps or more) would overrun the budget, and says so.

    .venv/bin/python bench/ais_start.py [--quick] [--run runs/fm] [--device cuda] [--out FILE]

Humans read the table; tools read the JSON lines at the end (also written to ``--out`` as each
result arrives, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def load(run: str, device: str, n: int, images: str = ""):
    """The run's VAE and its first ``n`` test images (or the ``(N, D)`` tensor saved at ``images``)."""
    from ppgen.train import load_vae

    vae, config, _ = load_vae(run, device)
    data = torch.load(images, weights_only=True) if images else config.data.load(False).test
    return vae, data[:n].to(device), f"{run}, {config.data.name} test"


def timed(device: str, fn):
    """``(fn(), seconds)``, the device synchronized before and after."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def steps_needed(runs: dict, t_prior: int):
    """The fewest encoder-start steps whose mean log p(x) is no worse than the prior start's at
    ``t_prior`` beyond one combined standard error of the two means; ``None`` if none is."""
    p = runs["prior", t_prior]
    for t in sorted(t for name, t in runs if name == "encoder"):
        e = runs["encoder", t]
        if e["log_px"] >= p["log_px"] - math.hypot(e["se"], p["se"]):
            return t
    return None


def main(args: argparse.Namespace) -> list[dict]:
    from ppgen.infer.ais import ais_log_evidence, bdmc, guide_start
    from ppgen.infer.evidence import khat_threshold, log_evidence

    torch.set_num_threads(args.threads)
    out = open(args.out, "w") if args.out else None
    results = []

    def emit(row: dict) -> None:
        row = {"bench": "ais_start", "device": args.device, **row}
        results.append(row)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    vae, x, source = load(args.run, args.device, args.images, args.image_file)
    n = len(x)
    r, t_is = timed(args.device, lambda: log_evidence(
        vae.model, vae.guide, x, args.is_samples, batch_size=n, particle_chunk=500, seed=0))
    trusted = r.khat <= khat_threshold(args.is_samples)
    print(f"{n} images ({source}); IS K={args.is_samples}: {float(r.log_px.mean()):.3f} "
          f"+- {float(r.stderr.pow(2).sum().sqrt() / n):.3f}, k-hat trusted {int(trusted.sum())}/{n}, "
          f"{t_is:.1f} s", flush=True)
    print(f"{'start':<8} {'T':>6} {'log p(x)':>10} {'+-':>6} {'accept':>7} {'eps':>6} {'s':>7}", flush=True)
    runs, per_image, per_step, t_start = {}, {}, 0.0, time.perf_counter()

    def affordable(label: str, steps: int) -> bool:
        left = args.budget_s - (time.perf_counter() - t_start)
        if args.budget_s > 0 and per_step * steps > left:
            print(f"skipped {label}: projected {per_step * steps:.0f} s, {left:.0f} s of the budget left", flush=True)
            return False
        return True

    plan = [("encoder", t, guide_start(vae.guide)) for t in args.encoder_steps]
    plan += [("prior", t, None) for t in args.prior_steps]
    for name, t, start in plan:
        if not affordable(f"AIS from the {name}, T={t}", t):
            continue
        a, sec = timed(args.device, lambda: ais_log_evidence(
            vae.model, x, args.chains, t, args.leapfrog, args.step_size, batch_size=n, seed=0, start=start))
        se = float(a.stderr.pow(2).sum().sqrt() / n)
        runs[name, t] = {"log_px": float(a.log_px.mean()), "se": se, "seconds": sec}
        per_image[name, t] = a
        if t >= 10:  # short runs are dominated by the first call's warm-up
            per_step = max(per_step, sec / t)
        print(f"{name:<8} {t:>6} {runs[name, t]['log_px']:>10.3f} {se:>6.3f} {float(a.accept.mean()):>7.2f} "
              f"{float(a.step_size.mean()):>6.3f} {sec:>7.1f}", flush=True)
        emit({"case": f"AIS from the {name}, T={t}, {n} images, {args.chains} chains ({source})",
              "value": sec, "unit": "s", "reference": t_is, "ratio": sec / t_is, "target": None,
              "better": "lower", "log_px": runs[name, t]["log_px"], "log_px_stderr": se,
              "is_log_px": float(r.log_px.mean()), "accept": float(a.accept.mean())})
    for t in args.bdmc_steps:
        for name, start in (("encoder", guide_start(vae.guide)), ("prior", None)):
            if not affordable(f"BDMC from the {name}, T={t}", 2 * t):
                continue
            b, sec = timed(args.device, lambda: bdmc(
                vae.model, x, args.chains, t, args.leapfrog, args.step_size, batch_size=n, seed=1, start=start))
            per_step = max(per_step, sec / (2 * t))
            print(f"BDMC from the {name}, T={t}, {n} simulated images: lower {float(b.lower.mean()):.3f} "
                  f"upper {float(b.upper.mean()):.3f} gap {b.gap:.3f} nats, {sec:.1f} s", flush=True)
            emit({"case": f"BDMC gap from the {name}, T={t}, {n} images simulated from the VAE", "value": b.gap,
                  "unit": "nats", "reference": None, "ratio": None, "target": None, "better": "lower",
                  "lower": float(b.lower.mean()), "upper": float(b.upper.mean()), "seconds": sec})
    if not runs:
        return results
    best = max(v["log_px"] for v in runs.values())
    print(f"reference (best AIS mean): {best:.3f}; error below it per run:", flush=True)
    for (name, t), v in runs.items():
        print(f"  {name:<8} T={t:<6} {best - v['log_px']:.3f} nats ({v['seconds']:.1f} s)")
    for tp in args.prior_steps:
        if ("prior", tp) not in runs:
            continue
        t = steps_needed(runs, tp)
        if t is None:
            print(f"no encoder-start T in {args.encoder_steps} matches the prior start at T'={tp}")
            continue
        e, p = runs["encoder", t], runs["prior", tp]
        print(f"prior start T'={tp} ({p['log_px']:.3f}, {p['seconds']:.1f} s) is matched by the encoder "
              f"start at T={t} ({e['log_px']:.3f}, {e['seconds']:.1f} s): {tp / t:.0f}x fewer steps", flush=True)
        emit({"case": f"encoder-start steps that match the prior start at T'={tp} ({n} images)",
              "value": t, "unit": "steps", "reference": tp, "ratio": t / tp, "target": 0.1, "better": "lower",
              "seconds": e["seconds"], "reference_seconds": p["seconds"]})
    t_top = max(t for name, t in runs if name == "encoder")
    a = per_image["encoder", t_top]
    diff, se = a.log_px - r.log_px, (a.stderr.pow(2) + r.stderr.pow(2)).sqrt()
    for label, mask in (("k-hat-trusted", trusted), ("all", torch.ones_like(trusted))):
        m = int(mask.sum())
        if m == 0:
            print(f"no {label} images")
            continue
        d, s = float(diff[mask].mean()), float(se[mask].pow(2).sum().sqrt() / m)
        outside = int((diff[mask].abs() > 3 * se[mask]).sum())
        print(f"AIS from the encoder (T={t_top}) - IS on {m} {label} images: {d:+.3f} +- {s:.3f} nats; "
              f"{outside} images more than 3 SE apart", flush=True)
        emit({"case": f"AIS from the encoder (T={t_top}) minus IS K={args.is_samples}, {m} {label} images",
              "value": d, "unit": "nats", "reference": s, "ratio": abs(d) / s if s > 0 else None, "target": 3.0,
              "better": "lower", "images_over_3se": outside})
    for row in results:
        print(json.dumps(row))
    return results


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 images, short chains (a smoke run)")
    parser.add_argument("--run", default="runs/fm", help="trained VAE run (default runs/fm)")
    parser.add_argument("--image-file", default="", help="(N, D) tensor of images instead of the run's test split")
    parser.add_argument("--images", type=int, default=50, help="test images (default 50)")
    parser.add_argument("--chains", type=int, default=16, help="AIS chains per image (default 16)")
    parser.add_argument("--encoder-steps", type=_ints, default=[1, 3, 10, 30, 100, 300], help="AIS steps from the encoder")
    parser.add_argument("--prior-steps", type=_ints, default=[100, 300, 1000, 3000], help="AIS steps from the prior")
    parser.add_argument("--leapfrog", type=int, default=10, help="leapfrog steps per HMC transition (default 10)")
    parser.add_argument("--step-size", type=float, default=0.05, help="initial HMC step size (default 0.05)")
    parser.add_argument("--is-samples", type=int, default=5000, help="IS samples K (default 5000)")
    parser.add_argument("--bdmc-steps", type=_ints, default=[], help="BDMC steps, from each start (default none)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip runs projected past this many seconds (0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file as they arrive")
    args = parser.parse_args()
    if args.quick:
        args.images, args.encoder_steps, args.prior_steps, args.is_samples = 4, [2, 5], [5, 10], 200
        args.bdmc_steps = args.bdmc_steps or [5]
    if not Path(args.run, "checkpoint.pt").exists():
        sys.exit(f"no trained VAE at {args.run}/checkpoint.pt (train one with `ppgen train vae`)")
    main(args)
