"""Variance, signal-to-noise ratio and bias of ELBO gradient estimators on one model/guide pair.

At fixed parameters, :func:`gradient_stats` draws ``R`` independent gradient estimates per
estimator (each one ``loss_and_grads`` call, read from ``.grad``, so ``TraceGraph_ELBO`` works)
and summarises them per parameter, per layer and per group (``encoder``/``decoder``/...):

- ``variance``: trace of the gradient covariance, ``sum_i Var[g_i]`` (per element, summed);
- ``snr``: mean over elements of ``|E g_i| / sd(g_i)`` (Rainforth et al. 2018, "Tighter
  variational bounds are not necessarily better");
- ``bias2`` and ``mse``: ``sum_i (E g_i - g*_i)^2`` and ``E ||g - g*||^2`` against a reference
  ``g*``: exact when the caller gives it (conjugate models), else the mean of many reparameterized
  draws, whose own standard error enters ``max_z``, the largest ``|E g_i - g*_i| / SE_i``
  (SE floored at 1e-5 of the group's largest gradient component, float32 rounding);
- ``seconds``: wall time per draw, and ``work_variance = variance * seconds``, the variance of
  an average over one second of draws ("variance at equal compute", Glynn & Whitt 1992).

Gradients are those of the loss (negative ELBO) with respect to Pyro's *unconstrained* parameters.
"""

from __future__ import annotations

import math
import re
import time
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ppgen.infer.estimators import get_estimator, make_elbo, prepare_guide

__all__ = ["GradientStats", "gradient_stats", "param_groups", "format_table"]


class _Welford:
    """Running mean and sum of squared deviations in float64 (exactly 0 for constant draws)."""

    def __init__(self, like: torch.Tensor):
        self.n = 0
        self.mean = torch.zeros_like(like, dtype=torch.float64)
        self.m2 = torch.zeros_like(like, dtype=torch.float64)

    def add(self, g: torch.Tensor) -> None:
        g = g.detach().to(torch.float64)
        self.n += 1
        delta = g - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (g - self.mean)

    @property
    def var(self) -> torch.Tensor:
        return self.m2 / max(self.n - 1, 1)


class GradientStats(NamedTuple):
    """What :func:`gradient_stats` returns.

    :param rows: one dict per (estimator, level, name) with keys ``estimator, level`` (``"param"``,
        ``"layer"``, ``"group"`` or ``"all"``), ``name, numel, mean_abs, variance, snr, bias2, mse,
        max_z, seconds, work_variance``.
    :param mean: ``mean[estimator][param]``: elementwise mean gradient (float64, param's shape).
    :param var: ``var[estimator][param]``: elementwise variance of one draw.
    :param reference: ``reference[param]``: the reference gradient.
    :param reference_se: elementwise standard error of the reference (zeros if exact).
    :param num_draws: draws per estimator.
    """

    rows: list[dict]
    mean: dict[str, dict[str, torch.Tensor]]
    var: dict[str, dict[str, torch.Tensor]]
    reference: dict[str, torch.Tensor]
    reference_se: dict[str, torch.Tensor]
    num_draws: int

    def row(self, estimator: str, name: str = "all", level: Optional[str] = None) -> dict:
        """The row of ``estimator`` for parameter/layer/group ``name`` (``"all"``: every parameter)."""
        for r in self.rows:
            if r["estimator"] == estimator and r["name"] == name and (level is None or r["level"] == level):
                return r
        raise KeyError(f"no row for estimator {estimator!r}, name {name!r}")


def param_groups(name: str) -> tuple[str, str]:
    """``(group, layer)`` of a Pyro parameter name: ``"encoder$$$net.0.weight"`` ->
    ``("encoder", "encoder.net.0")``; a plain ``pyro.param`` name is its own group and layer."""
    if "$$$" not in name:
        return name, name
    group, path = name.split("$$$", 1)
    layer = re.sub(r"\.(weight|bias)$", "", path)
    return group, f"{group}.{layer}"


def _collect_params(model: Callable, guide: Callable, args: tuple) -> dict[str, torch.Tensor]:
    with poutine.trace(param_only=True) as capture, torch.no_grad():
        Trace_ELBO().loss(model, guide, *args)
    params = {}
    for name, site in capture.trace.nodes.items():
        value = site["value"].unconstrained()
        if value.requires_grad:
            params[name] = value
    if not params:
        raise ValueError("the model/guide pair has no parameters to take gradients of")
    return params


def _draw(elbo, model, guide, args, params) -> tuple[dict[str, torch.Tensor], float]:
    for p in params.values():
        p.grad = None
    t0 = time.perf_counter()
    elbo.loss_and_grads(model, guide, *args)
    grads = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    return grads, time.perf_counter() - t0


def _reference(model, guide, args, params, draws: int, seed: int):
    torch.manual_seed(seed + 7919)
    elbo, acc = Trace_ELBO(), {k: _Welford(p) for k, p in params.items()}
    for _ in range(draws):
        grads, _ = _draw(elbo, model, guide, args, params)
        for k, g in grads.items():
            acc[k].add(g)
    return {k: a.mean for k, a in acc.items()}, {k: (a.var / draws).sqrt() for k, a in acc.items()}


def gradient_stats(
    model: Callable,
    guide: Callable,
    batch: Union[torch.Tensor, tuple],
    estimators: Sequence[str] = ("reparam", "score"),
    num_draws: int = 100,
    reference: Union[str, Mapping[str, torch.Tensor]] = "reparam",
    reference_draws: int = 1000,
    warmup: int = 20,
    seed: int = 0,
) -> GradientStats:
    """Measure the gradient estimators ``estimators`` of ``model``/``guide`` at the current
    parameters (Pyro's param store is read, never stepped).

    :param model: Pyro model; called as ``model(*batch)`` (a tensor batch is ``(batch,)``).
    :param guide: Pyro guide with the same signature, written reparameterized; each estimator
        prepares it (:func:`ppgen.infer.estimators.prepare_guide`).
    :param batch: the data tensor ``(B, ...)``, or a tuple of model arguments.
    :param estimators: names registered in :data:`ppgen.infer.estimators.ESTIMATORS`.
    :param num_draws: ``R``, independent single-sample gradient draws per estimator.
    :param reference: ``"reparam"`` (mean of ``reference_draws`` reparameterized draws, with its
        standard error), or a dict ``param name -> exact gradient`` of the loss w.r.t. the
        unconstrained parameter.
    :param warmup: draws made and discarded first, so baselines (decaying average, network) adapt.
    :param seed: torch seed of the draws; the caller's random state is restored afterwards.
    :returns: :class:`GradientStats`.
    """
    args = batch if isinstance(batch, tuple) else (batch,)
    if isinstance(estimators, str):
        estimators = [e.strip() for e in estimators.split(",") if e.strip()]
    if not estimators:
        raise ValueError("estimators must name at least one estimator, got an empty list")
    for name in estimators:
        get_estimator(name)
    for key, value in (("num_draws", num_draws), ("reference_draws", reference_draws)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{key} must be an integer >= 2, got {value!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        params = _collect_params(model, guide, args)
        if isinstance(reference, str):
            if reference != "reparam":
                raise ValueError(f"reference must be 'reparam' or a dict of exact gradients, got {reference!r}")
            ref, ref_se = _reference(model, guide, args, params, reference_draws, seed)
        elif isinstance(reference, Mapping):
            missing = set(params) - set(reference)
            if missing:
                raise ValueError(f"reference lacks gradients for parameters {sorted(missing)}")
            ref = {k: torch.as_tensor(reference[k], dtype=torch.float64, device=p.device).reshape(p.shape)
                   for k, p in params.items()}
            ref_se = {k: torch.zeros_like(v) for k, v in ref.items()}
        else:
            raise TypeError(f"reference must be 'reparam' or a dict, got {type(reference).__name__}")
        means, variances, rows = {}, {}, []
        for est in estimators:
            torch.manual_seed(seed)
            elbo, prepared = make_elbo(est), prepare_guide(est, guide)
            for _ in range(warmup):
                _draw(elbo, model, prepared, args, params)
            acc = {k: _Welford(p) for k, p in params.items()}
            sq_err = {k: torch.zeros((), dtype=torch.float64) for k in params}
            seconds = 0.0
            for _ in range(num_draws):
                grads, dt = _draw(elbo, model, prepared, args, params)
                seconds += dt
                for k, g in grads.items():
                    acc[k].add(g)
                    sq_err[k] += ((g.double() - ref[k]) ** 2).sum().cpu()
            means[est] = {k: a.mean for k, a in acc.items()}
            variances[est] = {k: a.var for k, a in acc.items()}
            rows += _summarise(est, means[est], variances[est], sq_err, ref, ref_se, num_draws, seconds / num_draws)
        for p in params.values():
            p.grad = None
    return GradientStats(rows, means, variances, ref, ref_se, num_draws)


def _summarise(est, mean, var, sq_err, ref, ref_se, n, seconds) -> list[dict]:
    levels: dict[tuple[str, str], list[str]] = {}
    for k in mean:
        group, layer = param_groups(k)
        for key in {("param", k), ("layer", layer), ("group", group), ("all", "all")}:
            levels.setdefault(key, []).append(k)
    rows = []
    for (level, name), keys in levels.items():
        m = torch.cat([mean[k].flatten() for k in keys]).cpu()
        v = torch.cat([var[k].flatten() for k in keys]).cpu()
        r = torch.cat([ref[k].flatten() for k in keys]).cpu()
        se = torch.cat([(var[k] / n + ref_se[k] ** 2).sqrt().flatten() for k in keys]).cpu()
        sd, diff = v.sqrt(), m - r
        live = (m != 0) | (sd != 0)  # parameters the loss does not touch have no SNR
        snr = (m.abs()[live] / sd[live]).mean().item() if live.any() else float("nan")
        # float32 gradients carry rounding of ~1e-6 relative: floor the standard error there, so a
        # deterministic estimator (enum) or a dead unit is not flagged for its last bits
        floor = 1e-5 * float(r.abs().max() + m.abs().max()) + 1e-30
        z = diff.abs() / se.clamp(min=floor)
        variance = v.sum().item()
        rows.append({
            "estimator": est, "level": level, "name": name, "numel": m.numel(),
            "mean_abs": m.abs().mean().item(), "variance": variance, "snr": snr,
            "bias2": (diff ** 2).sum().item(), "mse": sum(sq_err[k].item() for k in keys) / n,
            "max_z": z.max().item(), "seconds": seconds, "work_variance": variance * seconds,
        })
    order = {"all": 0, "group": 1, "layer": 2, "param": 3}
    return sorted(rows, key=lambda r: (order[r["level"]], r["name"]))


def format_table(stats: GradientStats, levels: Sequence[str] = ("all", "group"), relative_to: Optional[str] = None) -> list[str]:
    """Markdown table of ``stats`` rows at ``levels``; with ``relative_to`` (an estimator name),
    variance and SNR are also given as ratios to that estimator's row of the same name."""
    head = "| estimator | group | variance | SNR | bias^2 | MSE | ms/draw | variance x s |"
    if relative_to:
        head += f" var / {relative_to} | SNR / {relative_to} |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in stats.rows:
        if r["level"] not in levels:
            continue
        line = (f"| {r['estimator']} | {r['name']} | {r['variance']:.3g} | {r['snr']:.3g} | {r['bias2']:.3g} | "
                f"{r['mse']:.3g} | {1000 * r['seconds']:.2f} | {r['work_variance']:.3g} |")
        if relative_to:
            base = stats.row(relative_to, r["name"], r["level"])
            line += f" {_ratio(r['variance'], base['variance']):.3g} | {_ratio(r['snr'], base['snr']):.3g} |"
        lines.append(line)
    return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else (math.nan if a == 0 else math.inf)
