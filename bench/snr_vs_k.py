"""Signal-to-noise ratio of ``iwae`` and ``dreg`` gradients against the number of particles K.

Reproduces the experiment of Rainforth et al. (2018), "Tighter variational bounds are not
necessarily better" (their Section 4 / Figure 2), with ppgen's estimators run through Pyro:

    z ~ N(mu, I_20),   x | z ~ N(z, I_20),   q(z | x) = N(A x + b, 2/3 I_20)

with 1024 datapoints drawn from the model, ``mu`` at its maximum-likelihood value (the data
mean), ``A = I / 2`` and ``b = mu / 2`` (the optimal guide mean for any K), then every parameter
perturbed by ``N(0, sigma^2)`` so the true gradients are not zero. At the first datapoint, for
each K from 1 to 1000, R independent gradient draws give per element ``SNR = |E g| / sd(g)``;
a group's SNR is the root mean square over its elements with the sampling noise of the mean
taken out (``E[m^2] = mu^2 + sigma^2 / R``, so ``m^2 / v - 1 / R`` per element). Rainforth et
al. show that for ``iwae`` the encoder's (A, b) SNR falls like ``K^(-1/2)`` while the decoder's
(``mu``) grows like ``K^(1/2)``; Tucker et al. (2019) show that ``dreg`` restores ``K^(1/2)``
for the encoder. The script fits the log-log slope over K = 30..1000 and prints it.

How R draws come from one call: the model/guide below hold R copies of the parameters, one per
copy of the datapoint in the ``"data"`` plate (``pyro.param`` of shape ``(R, ...)``), and the
bound is a sum over datapoints, so one ``loss_and_grads`` of ``make_elbo(name, K)`` returns R
independent gradient draws, each copy's in its own rows. That is ppgen's estimator as any user
would run it, only batched; nothing of the estimator is re-implemented here.

``E g`` is the same for both estimators (both are unbiased for the gradient of the same bound;
``tests/infer/test_multisample.py``), so it is estimated once per K from all draws of both,
weighted by inverse variance, and each estimator's SNR divides it by that estimator's own
``sd``. This matters for ``iwae``'s encoder, whose SNR at K = 1000 is about 0.003: from its own
draws alone the mean would need millions of them, while ``dreg``'s draws pin it down.

The perturbation is ``sigma = 0.01`` (the log weights' variance stays about 1.5, so K >= 30 is
in the asymptotic regime; at ``sigma = 0.03`` dreg's encoder slope over 30..1000 is still 0.3,
not yet asymptotic). 10000 draws per point take about a minute on one core (float32).

Ends with one JSON line per (estimator, group): ``value = |slope - theory|`` (target <= 0.1),
``reference`` the theoretical slope, ``ratio = slope / theory`` and the ``slope`` itself;
saves the figure to ``docs/snr_vs_k.png``. Run: ``python bench/snr_vs_k.py [--reps R] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from ppgen.infer.estimators import make_elbo

DIM, N_DATA = 20, 1024
KS = [1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000]
FIT_FROM = 30
THEORY = {("iwae", "encoder"): -0.5, ("iwae", "decoder"): 0.5, ("dreg", "encoder"): 0.5, ("dreg", "decoder"): 0.5}


def problem(sigma: float, seed: int = 0) -> dict:
    """The datapoint and the perturbed parameters (float64, shared by every estimator and K)."""
    g = torch.Generator().manual_seed(seed)
    mu_true = torch.randn(DIM, generator=g, dtype=torch.float64)
    data = mu_true + math.sqrt(2.0) * torch.randn(N_DATA, DIM, generator=g, dtype=torch.float64)  # x ~ N(mu, 2 I)
    mu = data.mean(0)
    noise = lambda *shape: sigma * torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "x": data[0],
        "mu": mu + noise(DIM),
        "A": 0.5 * torch.eye(DIM, dtype=torch.float64) + noise(DIM, DIM),
        "b": 0.5 * mu + noise(DIM),
    }


def model(x: torch.Tensor) -> None:
    """``x`` of shape ``(R, 20)``: R copies of one datapoint, each with its own ``mu``."""
    mu = pyro.param("mu")
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(mu, 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)


def guide(x: torch.Tensor) -> None:
    """``q(z | x) = N(A x + b, 2/3 I)`` with R copies of ``A (R, 20, 20)`` and ``b (R, 20)``."""
    a, b = pyro.param("A"), pyro.param("b")
    loc = torch.einsum("rij,rj->ri", a, x) + b
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, math.sqrt(2.0 / 3.0)).to_event(1))


def draws(name: str, k: int, start: dict, reps: int, chunk: int, dtype) -> dict[str, torch.Tensor]:
    """``reps`` gradient draws of the loss w.r.t. each parameter: ``{group: (reps, elements)}``."""
    elbo = make_elbo(name, k, True, 1)
    out: dict[str, list] = {"encoder": [], "decoder": []}
    for i in range(0, reps, chunk):
        r = min(chunk, reps - i)
        pyro.clear_param_store()
        for key, value in start.items():
            if key != "x":
                pyro.param(key, value.to(dtype).expand(r, *value.shape).clone())
        x = start["x"].to(dtype).expand(r, DIM)
        elbo.loss_and_grads(model, guide, x)
        grad = {key: pyro.param(key).unconstrained().grad for key in ("A", "b", "mu")}
        out["encoder"].append(torch.cat([grad["A"].reshape(r, -1), grad["b"]], 1).double())
        out["decoder"].append(grad["mu"].double())
    return {key: torch.cat(v) for key, v in out.items()}


def pooled_mean(samples: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-variance weighted mean over estimators that share one expectation, and its
    variance, per element: each entry of ``samples`` is ``(R, n)``."""
    precision = sum(g.shape[0] / g.var(0) for g in samples)
    mean = sum(g.mean(0) * g.shape[0] / g.var(0) for g in samples) / precision
    return mean, 1.0 / precision


def snr(g: torch.Tensor, mean: torch.Tensor, mean_var: torch.Tensor) -> float:
    """Root-mean-square over elements of ``|E g| / sd(g)``: ``g`` is ``(R, n)``, ``E g`` estimated
    by ``mean`` whose own variance ``mean_var`` is taken out of its square."""
    v = g.var(0)
    keep = v > 0
    s2 = ((mean[keep] ** 2 - mean_var[keep]) / v[keep]).mean()
    return math.copysign(math.sqrt(abs(float(s2))), float(s2))


def slope(ks: list[int], values: list[float]) -> float:
    """Least-squares slope of log SNR against log K over ``K >= FIT_FROM``."""
    pts = [(math.log(k), math.log(v)) for k, v in zip(ks, values) if k >= FIT_FROM and v > 0]
    n = len(pts)
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    return sum((px - mx) * (py - my) for px, py in pts) / sum((px - mx) ** 2 for px, _ in pts)


def plot(ks: list[int], table: dict, slopes: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    titles = ("encoder (A, b)", "decoder (mu): one estimator under both")
    for ax, group, title in zip(axes, ("encoder", "decoder"), titles):
        for name, style in (("iwae", "o-"), ("dreg", "s-")):
            values = table[name, group]
            ax.loglog(ks, values, style, label=f"{name}: slope {slopes[name, group]:+.2f} (K >= {FIT_FROM})")
        ref_k = torch.tensor([float(FIT_FROM), float(ks[-1])])
        for name, colour in (("iwae", "C0"), ("dreg", "C1")):
            theory = THEORY[name, group]
            v30 = table[name, group][ks.index(FIT_FROM)]
            ax.loglog(ref_k, v30 * (ref_k / FIT_FROM) ** theory, ":", color=colour, lw=1, label=f"K^{theory:+.1f}")
        ax.set_xlabel("particles K")
        ax.set_ylabel("gradient SNR |E g| / sd g (RMS over elements)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("SNR of IWAE-bound gradients vs K (Rainforth et al. 2018 setup; ppgen iwae vs dreg)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=10000, help="gradient draws per (estimator, K)")
    p.add_argument("--chunk", type=int, default=5000, help="most draws per loss_and_grads call")
    p.add_argument("--elements", type=int, default=50000,
                   help="draws x K per call (smaller chunks at large K stay in cache)")
    p.add_argument("--sigma", type=float, default=0.01, help="std of the perturbation from the optimum")
    p.add_argument("--seed", type=int, default=0, help="data, perturbation and draws")
    p.add_argument("--quick", action="store_true", help="a fifth of the draws")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "snr_vs_k.png"))
    args = p.parse_args(argv)
    reps = args.reps // 5 if args.quick else args.reps
    pyro.set_rng_seed(args.seed)
    start = problem(args.sigma, args.seed)
    t0 = time.perf_counter()
    table: dict = {}
    print(f"{'K':>6} " + " ".join(f"{n + ' ' + g:>14}" for n in ("iwae", "dreg") for g in ("encoder", "decoder")))
    for k in KS:
        row = []
        chunk = max(1, min(args.chunk, args.elements // k))
        g = {name: draws(name, k, start, reps, chunk, torch.float32) for name in ("iwae", "dreg")}
        for name in ("iwae", "dreg"):
            for group in ("encoder", "decoder"):
                mean, mean_var = pooled_mean([g["iwae"][group], g["dreg"][group]])
                table.setdefault((name, group), []).append(snr(g[name][group], mean, mean_var))
                row.append(table[name, group][-1])
        print(f"{k:>6} " + " ".join(f"{v:>14.4g}" for v in row), flush=True)
    seconds = time.perf_counter() - t0
    slopes = {key: slope(KS, values) for key, values in table.items()}
    print(f"\nlog-log slope of SNR against K over K = {FIT_FROM}..{KS[-1]} ({reps} draws per point, {seconds:.0f} s):")
    print(f"{'estimator':<10}{'group':<10}{'slope':>8}{'theory':>8}")
    for (name, group), s in slopes.items():
        print(f"{name:<10}{group:<10}{s:>+8.3f}{THEORY[name, group]:>+8.1f}")
    plot(KS, table, slopes, Path(args.out))
    print(f"figure: {args.out}")
    # value: distance of the fitted slope from theory (target <= 0.1); the slope itself rides along.
    results = [
        {"bench": "snr_vs_k", "case": f"{name}/{group}", "value": abs(s - THEORY[name, group]),
         "unit": "|slope - theory|", "reference": THEORY[name, group], "ratio": s / THEORY[name, group],
         "target": 0.1, "better": "lower", "device": "cpu", "slope": s, "draws": reps,
         "seconds": seconds}
        for (name, group), s in slopes.items()
    ]
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
