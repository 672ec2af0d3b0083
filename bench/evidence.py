"""Benchmark: ppgen's per-datapoint IS evidence vs a hand-written PyTorch IWAE evaluation.

Both evaluate the same trained VAE (default runs/fm, else an untrained Fashion-MNIST-shaped VAE
on random binary data) with the same K and the same chunking, in one process. Reports the wall
time ratio ppgen / hand-written (target <= 1.2) and the peak resident memory of ppgen at several
K, measured as the growth of the process's peak RSS (on CUDA: the allocator's peak) over K = 500, 2000, 5000 in increasing order
(target: flat in K, since work is chunked over K; the timing runs come after this).

    .venv/bin/python bench/evidence.py [--quick] [--run runs/fm] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from pathlib import Path

import torch


def load(run: str, device: str, n: int):
    from ppgen.models.vae import VAE

    if Path(run, "checkpoint.pt").exists():
        from ppgen.train import load_vae

        vae, config, _ = load_vae(run, device)
        data = config.data.load(False).test[:n].to(device)
        return vae, data, run
    torch.manual_seed(0)
    vae = VAE(784, 20, (400,)).to(device)
    return vae, torch.bernoulli(torch.full((n, 784), 0.3, device=device)), "untrained VAE, random data"


@torch.no_grad()
def hand_written(vae, x: torch.Tensor, k: int, batch: int, chunk: int) -> torch.Tensor:
    """Plain PyTorch IWAE evaluation (Burda et al. 2016): per-datapoint log p(x), shape (N,)."""
    out = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        loc, scale = vae.encoder(xb)
        lws = []
        for k0 in range(0, k, chunk):
            kc = min(chunk, k - k0)
            eps = torch.randn(kc, *loc.shape, device=x.device)
            z = loc + scale * eps
            logits = vae.decoder(z)
            log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
                logits, xb.expand_as(logits), reduction="none"
            ).sum(-1)
            log_prior = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_q = (-0.5 * eps.pow(2) - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
            lws.append(log_prior + log_lik - log_q)
        out.append(torch.logsumexp(torch.cat(lws), 0) - math.log(k))
    return torch.cat(out)


def ppgen_eval(vae, x, k, batch, chunk):
    from ppgen.infer.evidence import log_evidence

    return log_evidence(vae.model, vae.guide, x, k, batch_size=batch, particle_chunk=chunk)


def peak_mib(device: torch.device) -> float:
    """Peak memory so far (MiB): the process's peak RSS on the CPU, the allocator's peak on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB -> MiB


def peak_growth_mib(vae, x, ks, batch, chunk) -> dict:
    """Growth of the peak memory (MiB, :func:`peak_mib`) over the baseline, after evaluating each K
    in increasing order (a peak never drops, so each value is the peak up to that K)."""
    ppgen_eval(vae, x[:2], 20, batch, chunk)  # imports (ArviZ is loaded at K >= 10) and first calls
    before = peak_mib(x.device)
    out = {}
    for k in sorted(ks):
        ppgen_eval(vae, x, k, batch, chunk)
        out[k] = peak_mib(x.device) - before
    return out


def main(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads)  # the same for both; 1 keeps a shared CPU's noise down
    n, k = (100, 500) if args.quick else (200, 5000)
    batch, chunk = 100, 500
    vae, x, source = load(args.run, args.device, n)
    ks = (500, 2000) if args.quick else (500, 2000, 5000)
    peaks = peak_growth_mib(vae, x[:batch], ks, batch, chunk)  # first, before the timing runs
    times, estimates = {"ppgen": [], "torch": []}, {}
    hand_written(vae, x[:batch], 2 * chunk, batch, chunk)  # first kernel launches and allocations
    for _ in range(2 if args.quick else 3):
        for name, fn in (("torch", hand_written), ("ppgen", lambda *a: ppgen_eval(*a).log_px)):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            est = fn(vae, x, k, batch, chunk)
            if x.is_cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            estimates[name] = est
    t_ppgen, t_torch = min(times["ppgen"]), min(times["torch"])
    results = [
        {"bench": "evidence", "case": f"IS log p(x), {n} images, K={k} ({source})", "value": t_ppgen,
         "unit": "s", "reference": t_torch, "ratio": t_ppgen / t_torch, "target": 1.2, "better": "lower",
         "device": args.device},
    ]
    base, memory = max(peaks[ks[0]], 1.0), "CUDA memory" if x.is_cuda else "RSS"
    for kk in ks[1:]:
        results.append(
            {"bench": "evidence",
             "case": f"peak {memory} growth at K={kk} vs K={ks[0]} ({batch} images, chunk {chunk})",
             "value": peaks[kk], "unit": "MiB", "reference": base, "ratio": peaks[kk] / base, "target": 1.2,
             "better": "lower", "device": args.device}
        )
    print(f"{'case':<70} {'ppgen':>10} {'reference':>10} {'ratio':>7}")
    for r in results:
        print(f"{r['case']:<70} {r['value']:>10.2f} {r['reference']:>10.2f} {r['ratio']:>7.3f}")
    same = torch.allclose(estimates["ppgen"].double(), estimates["torch"].double().cpu(), atol=1e-3)
    print(f"mean log p(x): ppgen {float(estimates['ppgen'].mean()):.3f}, hand-written "
          f"{float(estimates['torch'].mean()):.3f} (same seed; per-image estimates identical: {same})")
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run")
    parser.add_argument("--run", default="runs/fm", help="trained VAE run (default runs/fm)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    main(parser.parse_args())
