"""The checks every model of this folder goes through, unchanged: ppgen's tools on a Pyro pair.

Each model file defines ``model`` and ``guide`` the way Pyro's examples write them and hands them
here. :func:`run_checks` trains the pair with :func:`ppgen.train_svi`, estimates the held-out
evidence with :func:`ppgen.log_evidence` (or :func:`ppgen.joint_log_evidence` for a model with
global latents), measures gradient noise with :func:`ppgen.infer.variance.gradient_stats`,
trains :class:`ppgen.AmortizedGuide` built from the model alone, and compares ppgen's estimate of
one datapoint's evidence with Pyro's own sequential :class:`pyro.infer.Importance` run on the
same pair.  A step that ppgen cannot take is listed in ``skip`` by the model file with the reason
printed, never silently dropped.
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Callable, Optional

import pyro
import torch
from pyro import poutine


def importance_log_evidence(model: Callable, guide: Callable, args: tuple, kwargs: dict,
                            num_samples: int, seed: int = 54321) -> tuple[float, float]:
    """Pyro's sequential importance sampler (one trace per sample): ``log p`` and its
    delta-method standard error ``sd(w) / (sqrt(K) mean(w))``."""
    state = torch.get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        with torch.no_grad():
            posterior = pyro.infer.Importance(model, guide=guide, num_samples=num_samples).run(*args, **kwargs)
    finally:
        torch.set_rng_state(state)
    log_w = torch.stack([torch.as_tensor(w, dtype=torch.float64).reshape(()) for w in posterior.log_weights])
    log_z = torch.logsumexp(log_w, 0) - math.log(num_samples)
    w = (log_w - log_w.max()).exp()
    se = float(w.std() / (math.sqrt(num_samples) * w.mean()))
    return float(log_z), se


def _rows(data, index):
    """Rows ``index`` of a tensor, of every tensor of a tuple, or of every tensor of a dict."""
    if isinstance(data, torch.Tensor):
        return data[index]
    if isinstance(data, tuple):
        return tuple(d[index] if isinstance(d, torch.Tensor) else d for d in data)
    return {k: v[index] if isinstance(v, torch.Tensor) else v for k, v in data.items()}


def _call_args(data) -> tuple[tuple, dict]:
    if isinstance(data, torch.Tensor):
        return (data,), {}
    if isinstance(data, tuple):
        return data, {}
    return (), dict(data)


def _evidence(name, model, guide, held_out, out, *, smoke, global_latents, evidence_k, importance_k, data_plate,
              **evidence_kwargs):
    from ppgen import joint_log_evidence, log_evidence
    from ppgen.infer.networks import eval_mode
    from ppgen.infer.svi import evaluate_elbo

    one = _rows(held_out, slice(0, 1))
    if global_latents:
        n_eval = 8 if smoke else 50
        part = _rows(held_out, slice(0, n_eval))
        r = joint_log_evidence(model, guide, part, num_outer=100 if smoke else 300, num_inner=20 if smoke else 50,
                               data_plate=data_plate)
        out.update(log_px=r.log_px / n_eval, log_px_se=r.stderr / n_eval, khat_untrusted=float(not r.trusted),
                   evidence_n=n_eval, evidence_khat=r.khat)
        # The ELBO of the same datapoints as one data set (the globals' KL shared by them).
        out["evidence_elbo"] = out["part_elbo"] = evaluate_elbo(model, guide, part, num_particles=200, seed=7)
        # One datapoint given the globals at the guide's point g*: log p(x_1 | g*), which both
        # ppgen (inner draws) and Pyro's Importance (the model with g* observed) estimate.
        mine = joint_log_evidence(model, guide, one, num_outer=1, num_inner=importance_k, data_plate=data_plate,
                                  seed=1)
        out["one_ppgen"] = float(mine.log_px_given_globals[0])
        out["one_ppgen_se"] = float(mine.log_px_given_globals_stderr[0])
        point = {k: v.detach() for k, v in mine.globals_point.items()}
        log_prior = sum(float(poutine.trace(poutine.condition(model, data=point)).get_trace(one).nodes[k]["fn"]
                              .log_prob(v).sum()) for k, v in point.items())
        model_given = poutine.condition(model, data=point)
        guide_given = poutine.block(poutine.condition(guide, data=point), hide=list(point))
        with eval_mode(model, guide):
            lz, se = importance_log_evidence(model_given, guide_given, (one,), {}, importance_k)
        out["one_importance"], out["one_importance_se"] = lz - log_prior, se
    else:
        part = _rows(held_out, slice(0, 50 if smoke else 200))
        r = log_evidence(model, guide, part, evidence_k, data_plate=data_plate, **evidence_kwargs)
        s = r.summary()
        out.update(log_px=s["log_px"], log_px_se=s["log_px_stderr"], khat_untrusted=s["khat_share_untrusted"],
                   evidence_elbo=s["elbo"], evidence_n=s["n"])
        # The ELBO of the same datapoints from independent draws (Trace_ELBO, no particle plate).
        out["part_elbo"] = evaluate_elbo(model, guide, part, num_particles=20, seed=7)
        mine = log_evidence(model, guide, one, importance_k, data_plate=data_plate, seed=1, **evidence_kwargs)
        out["one_ppgen"], out["one_ppgen_se"] = float(mine.log_px[0]), float(mine.stderr[0])
    print(f"[{name}] IS log p(x) {out['log_px']:.3f} +- {out['log_px_se']:.4f} per datapoint "
          f"(n = {out['evidence_n']}; their ELBO {out['part_elbo']:.3f}); k-hat untrusted share {out['khat_untrusted']:.0%}")
    if not global_latents:
        args, kwargs = _call_args(one)
        with eval_mode(model, guide):
            out["one_importance"], out["one_importance_se"] = importance_log_evidence(model, guide, args, kwargs,
                                                                                      importance_k)
    se = math.hypot(out["one_ppgen_se"], out["one_importance_se"])
    out["one_z"] = (out["one_ppgen"] - out["one_importance"]) / max(se, 1e-12)
    print(f"[{name}] one datapoint: ppgen {out['one_ppgen']:.3f} +- {out['one_ppgen_se']:.3f}, "
          f"pyro.infer.Importance {out['one_importance']:.3f} +- {out['one_importance_se']:.3f} (z = {out['one_z']:+.2f})")


def run_checks(name: str, model: Callable, guide: Callable, train, held_out, *, smoke: bool,
               epochs: int, lr: float = 1e-3, batch_size: int = 64, estimator: str = "reparam",
               data_plate: str = "data", global_latents: bool = False, evidence_k: int = 500,
               importance_k: int = 2000, autoguide_kwargs: Optional[dict] = None,
               autoguide_data=None, autoguide_estimator: str = "reparam", autoguide_svi: Optional[dict] = None,
               gradient_estimators: tuple = ("reparam", "score"), skip: Optional[dict] = None,
               sequential_evidence: Optional[str] = None, seed: int = 0) -> dict:
    """Train, evaluate and compare ``model``/``guide`` with ppgen (module docstring).

    :param train: / :param held_out: data in the form the model takes it (tensor, tuple, dict).
    :param autoguide_svi: ``SVIConfig`` fields that differ for the automatic guide's training.
    :param skip: ``{step: reason}`` for steps ppgen cannot take on this model; each is printed.
    :param sequential_evidence: why the model cannot take ppgen's vectorized particle plate; then
        ``log_evidence`` is asked for its sequential path (``vectorize=False``), or, where this
        ppgen has none, the evidence steps are skipped with that reason.
    :returns: the measured numbers.
    """
    from ppgen import AmortizedGuide, SVIConfig, log_evidence, train_svi
    from ppgen.infer.svi import evaluate_elbo
    from ppgen.infer.variance import gradient_stats

    skip = dict(skip or {})
    evidence_kwargs: dict = {}
    if sequential_evidence is not None:
        if "vectorize" in inspect.signature(log_evidence).parameters:
            evidence_kwargs["vectorize"] = False
            print(f"[{name}] log_evidence(..., vectorize=False): {sequential_evidence}")
        else:
            skip["log_evidence"] = (f"{sequential_evidence}; this ppgen's log_evidence has no sequential path "
                                    "(vectorize=False)")
    out: dict = {"model": name, "skipped": skip}
    for step, why in skip.items():
        print(f"[{name}] SKIPPED {step}: {why}")
    start = time.perf_counter()
    pyro.set_rng_seed(seed)
    out["elbo_before"] = evaluate_elbo(model, guide, held_out)
    config = SVIConfig(estimator=estimator, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    result = train_svi(model, guide, train, held_out, config, progress=False, data_plate=data_plate)
    out["elbo"] = result.val_elbo
    out["train_seconds"] = time.perf_counter() - start
    print(f"[{name}] held-out ELBO {out['elbo_before']:.2f} -> {out['elbo']:.2f} nats after {epochs} epochs "
          f"({out['train_seconds']:.1f} s)")

    # Evidence of held-out data, and of one datapoint against Pyro's sequential Importance.
    if "log_evidence" not in skip:
        _evidence(name, model, guide, held_out, out, smoke=smoke, global_latents=global_latents,
                  evidence_k=evidence_k, importance_k=importance_k, data_plate=data_plate, **evidence_kwargs)

    # Gradient noise of the trained pair on one minibatch.
    if "gradient_stats" not in skip:
        batch = _rows(train, slice(0, 16))
        g = gradient_stats(model, guide, batch, estimators=gradient_estimators, num_draws=10 if smoke else 50,
                           reference_draws=50 if smoke else 500, warmup=2 if smoke else 20, data_plate=data_plate)
        out["gradient_variance"] = {e: g.row(e)["variance"] for e in gradient_estimators}
        print(f"[{name}] gradient variance (all parameters): "
              + ", ".join(f"{e} {v:.3g}" for e, v in out["gradient_variance"].items()))

    # The automatic guide, built from the model alone.
    if "AmortizedGuide" not in skip:
        auto = AmortizedGuide(model, name=f"{name}_auto", data_plate=data_plate, **(autoguide_kwargs or {}))
        auto_train = train if autoguide_data is None else autoguide_data[0]
        auto_held = held_out if autoguide_data is None else autoguide_data[1]
        pyro.set_rng_seed(seed)
        auto(*_call_args(_rows(auto_train, slice(0, 2)))[0], **_call_args(_rows(auto_train, slice(0, 2)))[1])
        out["auto_elbo_before"] = evaluate_elbo(model, auto, auto_held)
        cfg = SVIConfig(**{"estimator": autoguide_estimator, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                           "seed": seed, **(autoguide_svi or {})})
        out["auto_elbo"] = train_svi(model, auto, auto_train, auto_held, cfg, progress=False,
                                     data_plate=data_plate).val_elbo
        print(f"[{name}] AmortizedGuide held-out ELBO {out['auto_elbo_before']:.2f} -> {out['auto_elbo']:.2f}")
    out["seconds"] = time.perf_counter() - start
    print(f"[{name}] {out['seconds']:.1f} s in all")
    return out
