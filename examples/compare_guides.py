"""Compare trained VAE runs (e.g. diag / fullcov / iaf guides, with or without free bits) by
importance-sampled test log p(x) and posterior-collapse diagnostics.

    ppgen train vae --data fashion-mnist --posterior fullcov --epochs 3 --out runs/fm-fullcov
    python examples/compare_guides.py runs/fm-diag runs/fm-fullcov --samples 1000 --limit 1000

Prints a table, then one JSON object per run.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(args: argparse.Namespace) -> list[dict]:
    from ppgen.infer.evidence import log_evidence
    from ppgen.models.collapse import collapse_report
    from ppgen.train import load_vae

    rows = []
    for path in args.runs:
        vae, config, _ = load_vae(path, args.device)
        data = config.data.load(download=False)
        test = data.test[: args.limit].to(args.device)
        t0 = time.perf_counter()
        ev = log_evidence(vae.model, vae.guide, test, args.samples, batch_size=args.batch_size,
                          particle_chunk=args.particle_chunk, seed=args.seed).summary()
        seconds = time.perf_counter() - t0
        col = collapse_report(vae, test).summary()
        rows.append({
            "run": str(path), "posterior": config.model.posterior, "likelihood": config.model.likelihood,
            "free_bits": config.model.free_bits, "kl_warmup": config.model.kl_warmup,
            "epochs": config.svi.epochs, "n": ev["n"], "K": args.samples, "log_px": ev["log_px"],
            "log_px_stderr": ev["log_px_stderr"], "elbo": ev["elbo"], "gap": ev["gap"],
            "khat_share_untrusted": ev["khat_share_untrusted"], "active_units": col["active_units"],
            "latent_dim": col["latent_dim"], "kl_total": col["kl_total"], "kl_per_dim": col["kl_per_dim"],
            "seconds": seconds,
        })
    print(f"{'run':28s} {'post':8s} {'fb':>5s} {'log p(x)':>10s} {'+-':>6s} {'ELBO':>9s} {'gap':>6s} "
          f"{'k bad':>6s} {'AU':>6s} {'KL':>7s}")
    for r in rows:
        print(f"{r['run'][-28:]:28s} {r['posterior']:8s} {r['free_bits']:5.2f} {r['log_px']:10.2f} "
              f"{r['log_px_stderr']:6.2f} {r['elbo']:9.2f} {r['gap']:6.2f} {r['khat_share_untrusted']:6.2f} "
              f"{r['active_units']:3d}/{r['latent_dim']:<2d} {r['kl_total']:7.2f}")
    for r in rows:
        print(json.dumps(r))
    return rows


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="VAE run directories")
    p.add_argument("--samples", type=int, default=5000, help="K importance samples per datapoint")
    p.add_argument("--limit", type=int, default=None, help="first N test datapoints (default: all)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--particle-chunk", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse())
