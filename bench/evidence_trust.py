"""Benchmark: evidence you can trust. Plain IS from the encoder vs ppgen's trusted path.

On the first ``--n`` test images of a trained VAE (default runs/fm, the Fashion-MNIST VAE), in
one process and on one device:

- plain: :func:`ppgen.infer.evidence.log_evidence` from the guide with ``K = --samples``;
- trusted: :func:`ppgen.infer.trusted.trusted_evidence` (refined per-datapoint q*, widened
  candidates compared on a pilot, the one with the fewest k-hat above threshold, within
  ``--budget`` times plain IS's cost) and the inference gaps it measures.

Prints a table, then one JSON object per line (DESIGN.md "Benchmarks speak JSON"): the wall-time
ratio trusted / plain (target <= 1.5), the share of images with k-hat above the sample-size
threshold (target <= 0.05, reference: plain IS), the mean log p(x) of each, and the
approximation and amortization gaps (Cremer et al. 2018).

    .venv/bin/python bench/evidence_trust.py --n 500 [--run runs/fm] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/fm", help="a trained VAE run directory")
    p.add_argument("--n", type=int, default=500, help="test images (the first N)")
    p.add_argument("--samples", type=int, default=5000, help="K of plain IS (sets the budget)")
    p.add_argument("--budget", type=float, default=1.5, help="trusted path's cost limit, times plain IS")
    p.add_argument("--refine-steps", type=int, default=50)
    p.add_argument("--refine-samples", type=int, default=16)
    p.add_argument("--factors", default="1.2,1.3,1.4", help="widening factors of q* to choose from")
    p.add_argument("--pilot", type=int, default=50, help="images the candidates are compared on")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--ais-images", type=int, default=0,
                   help="also run AIS started at the encoder's q(z|x) on the first N images and compare (0: off)")
    p.add_argument("--ais-steps", type=int, default=500)
    p.add_argument("--ais-chains", type=int, default=16)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ppgen.infer.evidence import khat_untrusted, log_evidence
    from ppgen.infer.trusted import default_candidates, inference_gaps, trusted_evidence
    from ppgen.train import load_vae

    vae, config, _ = load_vae(args.run, args.device)
    x = config.data.load(False).test[: args.n].to(args.device)
    vae.check_data(x)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    factors = [float(f) for f in args.factors.split(",")]
    candidates = default_candidates(args.refine_steps, args.refine_samples, factors=factors)
    common = dict(batch_size=args.batch_size, particle_chunk=500)
    # warm-up (first calls, allocator) on a few images, not timed
    log_evidence(vae.model, vae.guide, x[:4], 100, **common)
    trusted_evidence(vae.model, vae.guide, x[:4], 1000, candidates=default_candidates(2, 2), pilot=2, **common)

    # wall time, and the process's CPU time (on a shared CPU the wall time depends on the others'
    # load, the CPU time of a one-thread run does not)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    plain = log_evidence(vae.model, vae.guide, x, args.samples, seed=0, **common)
    sync()
    t_plain, c_plain = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    trusted = trusted_evidence(vae.model, vae.guide, x, args.samples, candidates=candidates, budget=args.budget,
                               pilot=args.pilot, seed=0, **common)
    sync()
    t_trusted, c_trusted = time.perf_counter() - t0, time.process_time() - c0
    r = trusted.result
    share_plain = float(khat_untrusted(plain.khat, plain.num_samples).double().mean())
    share_trusted = float(khat_untrusted(r.khat, r.num_samples).double().mean())
    g = inference_gaps(r).summary()
    both = ~khat_untrusted(plain.khat, plain.num_samples) & ~khat_untrusted(r.khat, r.num_samples)
    diff = r.log_px - plain.log_px
    z = diff / (r.stderr.pow(2) + plain.stderr.pow(2)).sqrt()
    device = str(x.device) if x.device.type == "cpu" else torch.cuda.get_device_name(x.device)

    print(f"{args.n} test images of {args.run}, device {device}, K = {args.samples}")
    print(f"CPU time of this process: plain {c_plain:.1f} s, trusted {c_trusted:.1f} s, ratio {c_trusted / c_plain:.2f}")
    print(f"plain IS (guide)  {t_plain:8.1f} s  share k-hat > thr {share_plain:.3f}  log p(x) {float(plain.log_px.mean()):.3f}")
    print(f"trusted ({trusted.chosen}, K = {r.num_samples})  {t_trusted:8.1f} s  share k-hat > thr {share_trusted:.3f}  "
          f"log p(x) {float(r.log_px.mean()):.3f}")
    print(f"pilot shares: {trusted.pilot}; plan {trusted.plan['planned_evals']:.0f} / budget "
          f"{trusted.plan['budget_evals']:.0f} model evaluations per image")
    print(f"trusted - plain log p(x): mean {float(diff.mean()):.3f}; on the {int(both.sum())} images both trust: "
          f"{float(diff[both].mean()) if both.any() else float('nan'):.3f}; |z| > 3 on {float((z.abs() > 3).double().mean()):.3f}")
    print(f"L[q] {g['elbo_q']:.3f}  L[q*] {g['elbo_qstar']:.3f}  approximation gap {g['approximation']:.3f} +- "
          f"{g['approximation_se']:.3f}  amortization gap {g['amortization']:.3f} +- {g['amortization_se']:.3f}")
    line = dict(bench="evidence_trust", device=device)
    rows = [
        dict(case=f"wall time, trusted / plain IS (K={args.samples}, {args.n} images)", value=t_trusted, unit="s",
             reference=t_plain, ratio=t_trusted / t_plain, target=args.budget, better="lower"),
        dict(case=f"process CPU time, trusted / plain IS (K={args.samples}, {args.n} images)", value=c_trusted,
             unit="s", reference=c_plain, ratio=c_trusted / c_plain, target=args.budget, better="lower"),
        dict(case="share of images with k-hat > threshold", value=share_trusted, unit="share", reference=share_plain,
             ratio=share_trusted / share_plain if share_plain else None, target=0.05, better="lower"),
        dict(case="mean log p(x), trusted path vs plain IS", value=float(r.log_px.mean()), unit="nats",
             reference=float(plain.log_px.mean()), ratio=None, target=None, better="higher"),
        dict(case="approximation gap log p(x) - L[q*]", value=g["approximation"], unit="nats",
             reference=g["approximation_se"], ratio=None, target=None, better="lower"),
        dict(case="amortization gap L[q*] - L[q]", value=g["amortization"], unit="nats",
             reference=g["amortization_se"], ratio=None, target=None, better="lower"),
    ]
    if args.ais_images:
        from ppgen.infer.ais import ais_log_evidence
        from ppgen.infer.proposals import Guide

        m = min(args.ais_images, args.n)
        t0 = time.perf_counter()
        a = ais_log_evidence(vae.model, x[:m], args.ais_chains, args.ais_steps, batch_size=args.batch_size, seed=2,
                             start=Guide().as_start(vae.model, vae.guide))
        sync()
        t_ais = time.perf_counter() - t0
        d = r.log_px[:m] - a.log_px
        within = (d.abs() <= 3 * (r.stderr[:m].pow(2) + a.stderr.pow(2)).sqrt()).double().mean()
        print(f"AIS from q(z|x) on {m} images ({args.ais_steps} steps x {args.ais_chains} chains, {t_ais:.1f} s): "
              f"log p(x) {float(a.log_px.mean()):.3f}; trusted IS - AIS {float(d.mean()):.3f}; within 3 SE on "
              f"{float(within):.2f}")
        rows.append(dict(case=f"trusted IS - AIS from q(z|x), {m} images", value=float(d.mean()), unit="nats",
                         reference=float(a.log_px.mean()), ratio=None, target=None, better="lower",
                         share_within_3se=float(within), ais_seconds=t_ais))
    for row in rows:
        print(json.dumps({**line, **row, "chosen": trusted.chosen}))


if __name__ == "__main__":
    main()
