"""Per-step time of ppgen's SVI step against a hand-written PyTorch VAE and plain Pyro SVI,
eager and compiled.

Same 784-400-20 networks, batch 128, Adam, the same sampled-KL ELBO (one z per datapoint).
The hand-written reference uses torch's default Adam, as such a loop is usually written; a second
hand-written loop with the fused Adam that ppgen uses shows what is left of Pyro's own overhead.
Compiled rows: ppgen with ``SVIConfig(compile=True)`` (the loss of Pyro's model/guide pair as one
``torch.compile(fullgraph=True)`` graph, fused Adam, the device-side non-finite check) against the
hand-written step with the same fused Adam, eager and with its loss compiled the same way. ppgen
is timed through ``step.on_device`` (what the training loop calls: no host read per step); the
hand-written steps return their loss tensor without reading it either.

All contestants are timed in interleaved rounds in one process, so load on the machine affects
them alike; the ratios are of medians. On CUDA each timing is bracketed by
``torch.cuda.synchronize()`` and ``--reduce-overhead`` adds a ppgen row compiled with
``mode="reduce-overhead"`` (CUDA graphs). ``--compile-time`` measures building a compiled step
(compile plus its check against eager) in a fresh process, cold (empty inductor cache) and warm
(the cache the cold run left). Run: ``python bench/svi_step.py [--device cuda] [--quick]
[--compiled] [--compile-time] [--reduce-overhead]``; ``OMP_NUM_THREADS=1`` for CPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from torch.nn import functional as F

from ppgen.infer.svi import SVIConfig, make_svi_step
from ppgen.models.vae import VAE

D, Z, H, B = 784, 20, 400, 128


def hand_written(vae: VAE, lr: float, fused: bool = False, compiled: bool = False, mode=None):
    """The lean reference: log densities written out, no distribution objects or validation.
    ``fused`` picks torch's fused Adam kernel (ppgen's choice) over torch's default; ``compiled``
    compiles the loss (forward and, through AOTAutograd, backward) as ppgen's compiled step does."""
    opt = torch.optim.Adam(vae.parameters(), lr=lr, fused=fused or None)

    def loss_fn(x):
        loc, scale = vae.encoder(x)
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_lik = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
        # log p(z) - log q(z|x) for z = loc + scale * eps; the 0.5 log(2 pi) terms cancel
        log_ratio = (-0.5 * z.pow(2) + 0.5 * eps.pow(2) + scale.log()).sum()
        return -(log_lik + log_ratio)

    fn = torch.compile(loss_fn, fullgraph=True, mode=mode, options=None if mode else {"fallback_random": True}) \
        if compiled else loss_fn

    def step(x):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        loss = fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def plain_pyro(vae: VAE, lr: float):
    # As Pyro's VAE example does it: pyro.optim.Adam and svi.step.
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    return svi.step


def ppgen_step(vae: VAE, lr: float, x: torch.Tensor, compile: bool = False, mode=None):
    step, _ = make_svi_step(vae.model, vae.guide, SVIConfig(lr=lr, compile=compile and mode is None), x)
    if mode is not None:
        step.compile(x, mode=mode)
    if compile and not step.compiled:
        raise RuntimeError(f"ppgen's step did not compile: {step.why_eager}")
    return step.on_device


def time_steps(step, batches, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for x in batches:
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(batches)


def compile_seconds(device: str, cache: str) -> float:
    """Seconds to build a compiled ppgen step in a fresh process with inductor cache ``cache``."""
    code = (
        "import time, torch; from ppgen.infer.svi import SVIConfig, make_svi_step; from ppgen.models.vae import VAE\n"
        f"d = torch.device({device!r}); vae = VAE({D}, {Z}, ({H},)).to(d)\n"
        f"x = torch.bernoulli(torch.rand({B}, {D}, device=d)); t0 = time.perf_counter()\n"
        "step, _ = make_svi_step(vae.model, vae.guide, SVIConfig(compile=True), x)\n"
        "assert step.compiled, step.why_eager\n"
        "if d.type == 'cuda': torch.cuda.synchronize()\n"
        "print(time.perf_counter() - t0)\n"
    )
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def row(case: str, value: float, reference, target, device, unit: str = "s/step") -> dict:
    return {"bench": "svi_step", "case": case, "value": value, "unit": unit, "reference": reference,
            "ratio": value / reference if reference else None, "target": target, "better": "lower",
            "device": str(device)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--compiled", action="store_true", help="add the compiled rows")
    p.add_argument("--reduce-overhead", action="store_true", help="CUDA: add ppgen with mode='reduce-overhead'")
    p.add_argument("--compile-time", action="store_true", help="measure compile time, cold and warm cache")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rounds, steps = (3, 20) if args.quick else (7, 50)
    rounds = args.rounds or rounds
    torch.manual_seed(0)
    batches = [torch.bernoulli(torch.rand(B, D, device=device)) for _ in range(steps)]
    names = ["hand-written", "hand-fused", "plain-pyro", "ppgen"]
    if args.compiled:
        names += ["hand-fused-compiled", "ppgen-compiled"]
    if args.reduce_overhead and device.type == "cuda":
        names += ["hand-fused-cudagraphs", "ppgen-cudagraphs"]
    # Separate networks per contestant, same initial weights; each step function owns one.
    base = VAE(D, Z, (H,)).to(device)
    nets = {k: VAE(D, Z, (H,)).to(device) for k in names}
    for v in nets.values():
        v.load_state_dict(base.state_dict())
    makers = {
        "hand-written": lambda: hand_written(nets["hand-written"], 1e-3),
        "hand-fused": lambda: hand_written(nets["hand-fused"], 1e-3, fused=True),
        "plain-pyro": lambda: plain_pyro(nets["plain-pyro"], 1e-3),
        "ppgen": lambda: ppgen_step(nets["ppgen"], 1e-3, batches[0]),
        "hand-fused-compiled": lambda: hand_written(nets["hand-fused-compiled"], 1e-3, fused=True, compiled=True),
        "ppgen-compiled": lambda: ppgen_step(nets["ppgen-compiled"], 1e-3, batches[0], compile=True),
        "hand-fused-cudagraphs": lambda: hand_written(nets["hand-fused-cudagraphs"], 1e-3, fused=True,
                                                      compiled=True, mode="reduce-overhead"),
        "ppgen-cudagraphs": lambda: ppgen_step(nets["ppgen-cudagraphs"], 1e-3, batches[0], compile=True,
                                               mode="reduce-overhead"),
    }
    times: dict[str, list[float]] = {k: [] for k in names}
    # Compiled steps are built once (compiling is what --compile-time measures); the Pyro-based
    # eager steps are rebuilt each round, as they share Pyro's global param store (clearing it
    # replaces its dicts, so a compiled ppgen step gets the dicts it was built with back).
    store = pyro.get_param_store()
    built, stores = {}, {}
    for k in names:
        if "compiled" in k or "cudagraphs" in k:
            built[k] = makers[k]()
            stores[k] = store._params, store._param_to_name, store._constraints  # the dicts it was built with
    for _ in range(rounds):
        for name in names:
            fn = built.get(name) or makers[name]()
            if name in stores:  # give a compiled Pyro step back the param store it was built with
                store._params, store._param_to_name, store._constraints = stores[name]
            for _ in range(3):  # warm-up (CUDA graphs record on their first calls)
                fn(batches[0])
            times[name].append(time_steps(fn, batches, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'loop':<24}{'ms/step (median of ' + str(rounds) + ')':>28}")
    for k, v in med.items():
        print(f"{k:<24}{1000 * v:>28.3f}")
    results = [
        row("ppgen/hand-written", med["ppgen"], med["hand-written"], 1.10, device),
        row("ppgen/plain-pyro", med["ppgen"], med["plain-pyro"], 0.75, device),
        row("ppgen/hand-written-fused-adam", med["ppgen"], med["hand-fused"], None, device),
    ]
    if args.compiled:
        results += [
            row("ppgen-compiled/hand-written-fused-adam", med["ppgen-compiled"], med["hand-fused"], 1.05, device),
            row("ppgen-compiled/ppgen", med["ppgen-compiled"], med["ppgen"], 1.0, device),
            row("ppgen-compiled/hand-written-fused-adam-compiled", med["ppgen-compiled"],
                med["hand-fused-compiled"], None, device),
        ]
    if "ppgen-cudagraphs" in med:
        results += [
            row("ppgen-cudagraphs/hand-written-fused-adam", med["ppgen-cudagraphs"], med["hand-fused"], None, device),
            row("ppgen-cudagraphs/ppgen-compiled", med["ppgen-cudagraphs"], med.get("ppgen-compiled"), None, device),
            row("ppgen-cudagraphs/hand-written-fused-adam-cudagraphs", med["ppgen-cudagraphs"],
                med["hand-fused-cudagraphs"], None, device),
        ]
    if args.compile_time:
        with tempfile.TemporaryDirectory() as cache:
            cold = compile_seconds(args.device, cache)
            warm = compile_seconds(args.device, cache)
        print(f"compile (build a compiled step, fresh process): cold cache {cold:.1f} s, warm cache {warm:.1f} s")
        results += [row("compile-time-cold", cold, None, None, device, "s"),
                    row("compile-time-warm", warm, cold, None, device, "s")]
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
