"""Variance, signal-to-noise ratio and bias of ELBO gradient estimators on one model/guide pair.

At fixed parameters, :func:`gradient_stats` draws ``R`` independent gradient estimates per
estimator and particle count ``K`` (each one ``loss_and_grads`` call with ``K`` vectorized
particles, read from ``.grad``, so ``TraceGraph_ELBO`` works) and summarises them per parameter,
per layer and per group (``encoder``/``decoder``/...). With ``m_i`` and ``v_i`` the mean and the
(unbiased) variance of element ``i`` over the ``R`` draws, and ``n`` elements in a row:

- ``variance``: trace of the gradient covariance, ``sum_i v_i`` (per element, summed);
- ``snr``: mean over elements of ``|m_i| / sqrt(v_i)`` (Rainforth et al. 2018, "Tighter
  variational bounds are not necessarily better"). It has a noise floor: for a gradient element
  whose true mean is 0, ``|m_i| / sd`` is ``|N(0, 1)| / sqrt(R)``, so ``snr`` reads about
  ``sqrt(2 / (pi R))`` (0.11 at R = 50) however little signal there is;
- ``snr_corrected``: the root-mean-square SNR with that noise taken out. The draws are split
  into two interleaved halves ``A`` and ``B`` (``R/2`` each); ``U_A = m_A^2 - v_A / (R/2)`` is
  unbiased for ``E[g_i]^2`` whatever the distribution of the draws, and independent of ``v_B``,
  so ``(U_A / v_B + U_B / v_A) / 2`` has expectation exactly 0 for a zero-mean element, and
  ``E[g_i]^2 / Var[g_i]`` times ``E[sigma^2 / v]`` (``1 + O(1/R)``) otherwise. Its mean over the
  row's elements goes under the root; when that mean is negative by noise the row reports
  ``-sqrt(|mean|)`` ("below the noise floor"), so it is centred on 0 for a zero-mean gradient,
  with noise of order ``(4/n)^(1/4) / sqrt(R)`` over ``n`` elements. (Dividing ``m^2 - v/R`` by
  the ``v`` of the *same* draws is not enough: ``m`` and ``v`` are correlated for skewed draws,
  as a scale gradient's ``eps^2 - 1`` is, and the bias, of order ``skew^2 / R^2`` per element,
  survives the average.) It is a root *mean square*: at least the mean SNR of the true values,
  equal when every element has the same SNR; it needs ``R >= 8``, else it is NaN;
- ``bias2``: the squared bias ``||E g - g*||^2`` against a reference ``g*``, debiased:
  ``sum_i [(m_i - g*_i)^2 - v_i / R - se_i^2]``, where ``se_i`` is the reference's own standard
  error (0 for an exact reference). The plain plug-in ``sum_i (m_i - g*_i)^2`` (``bias2_plugin``)
  carries ``tr Cov / R + sum se^2`` of noise and so falls like ``1/R`` for an unbiased estimator;
  the debiased value is unbiased and can be negative by noise. For heavy-tailed draws (score
  function) it is right-skewed at small ``R``: most samples miss the rare large draws, which
  shifts their mean and shrinks their variance, and the rare sample that has one reads far
  negative. The reference is exact when the
  caller gives it (conjugate models), else the mean of many single-particle reparameterized
  draws, whose standard error also enters ``max_z``, the largest ``|m_i - g*_i| / SE_i`` (SE
  floored at 1e-5 of the group's largest gradient component, float32 rounding). For an
  estimator of another objective (``iwae`` with ``K > 1``) the bias is the gap to the ELBO
  gradient;
- ``mse``: ``mean_r ||g_r - g*||^2`` (it includes the reference's own error ``sum se^2``);
- ``seconds``: wall time per draw, and ``work_variance = variance * seconds``, the variance of
  an average over one second of draws ("variance at equal compute", Glynn & Whitt 1992).

Each (estimator, K) starts from the param store as the caller left it: the decaying-average
baselines Pyro keeps in the store (``__baseline_avg_downstream_cost_*``) are restored between
estimators and removed at the end, so results do not depend on the order of ``estimators`` and
nothing is left behind.

Gradients are those of the loss (negative ELBO) with respect to Pyro's *unconstrained* parameters.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from ppgen.infer.batches import as_batch
from ppgen.infer.estimators import get_estimator, make_elbo, prepare_guide
from ppgen.infer.particles import check_vectorizable
from ppgen.infer.traces import DATA, DataPlate, find_data_plate

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

    :param rows: one dict per (estimator, particles, level, name) with keys ``estimator,
        particles, label, level`` (``"param"``, ``"layer"``, ``"group"`` or ``"all"``), ``name,
        numel, mean_abs, variance, snr, snr_corrected, bias2, bias2_plugin, mse, max_z, seconds,
        work_variance`` (see the module docstring).
    :param mean: ``mean[label][param]``: elementwise mean gradient (float64, param's shape). The
        label is the estimator's name, or ``"<name> K=<K>"`` when ``particles`` was a list.
    :param var: ``var[label][param]``: elementwise variance of one draw.
    :param reference: ``reference[param]``: the reference gradient.
    :param reference_se: elementwise standard error of the reference (zeros if exact).
    :param num_draws: draws per estimator.
    :param particles: the particle counts measured.
    """

    rows: list[dict]
    mean: dict[str, dict[str, torch.Tensor]]
    var: dict[str, dict[str, torch.Tensor]]
    reference: dict[str, torch.Tensor]
    reference_se: dict[str, torch.Tensor]
    num_draws: int
    particles: tuple[int, ...] = (1,)

    def row(self, estimator: str, name: str = "all", level: Optional[str] = None,
            particles: Optional[int] = None) -> dict:
        """The row of ``estimator`` (a name or a label) for parameter/layer/group ``name``
        (``"all"``: every parameter); ``particles`` picks one K of a sweep."""
        found = [r for r in self.rows
                 if estimator in (r["estimator"], r["label"]) and r["name"] == name
                 and (level is None or r["level"] == level) and (particles is None or r["particles"] == particles)]
        if not found:
            raise KeyError(f"no row for estimator {estimator!r}, name {name!r}, particles {particles!r}")
        if len({r["particles"] for r in found}) > 1:
            raise ValueError(f"estimator {estimator!r} was measured at particles {sorted({r['particles'] for r in found})}: "
                             f"pass particles=K or the label '{estimator} K=<K>'")
        return found[0]


def param_groups(name: str) -> tuple[str, str]:
    """``(group, layer)`` of a Pyro parameter name: ``"encoder$$$net.0.weight"`` ->
    ``("encoder", "encoder.net.0")``; a plain ``pyro.param`` name is its own group and layer."""
    if "$$$" not in name:
        return name, name
    group, path = name.split("$$$", 1)
    layer = re.sub(r"\.(weight|bias)$", "", path)
    return group, f"{group}.{layer}"


def _collect_params(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    with poutine.trace(param_only=True) as capture, torch.no_grad():
        Trace_ELBO().loss(model, guide, *args, **kwargs)
    params = {}
    for name, site in capture.trace.nodes.items():
        value = site["value"].unconstrained()
        if value.requires_grad:
            params[name] = value
    if not params:
        raise ValueError("the model/guide pair has no parameters to take gradients of")
    return params


@contextmanager
def _store_as_found() -> Iterator[None]:
    """Give the block the param store as it is now, and leave it so afterwards: entries the block
    adds (Pyro's ``__baseline_avg_downstream_cost_*`` baselines) are removed, entries it replaces
    are put back. The parameters themselves are never replaced by the ELBOs, only read."""
    store = pyro.get_param_store()
    before = dict(store.named_parameters())  # name -> unconstrained tensor
    values = {k: store[k] for k in before}  # constrained values, for putting back a replaced one
    try:
        yield
    finally:
        now = dict(store.named_parameters())
        for name in now:
            if name not in before:
                del store[name]
            elif now[name] is not before[name]:
                store[name] = values[name]


def _draw(elbo, model, guide, args, params, kwargs, plate) -> tuple[dict[str, torch.Tensor], float]:
    for p in params.values():
        p.grad = None
    t0 = time.perf_counter()
    with DataPlate(plate):
        elbo.loss_and_grads(model, guide, *args, **kwargs)
    grads = {k: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for k, p in params.items()}
    return grads, time.perf_counter() - t0


def _reference(model, guide, args, kwargs, plate, params, draws: int, seed: int):
    torch.manual_seed(seed + 7919)
    elbo, acc = Trace_ELBO(), {k: _Welford(p) for k, p in params.items()}
    for _ in range(draws):
        grads, _ = _draw(elbo, model, guide, args, params, kwargs, plate)
        for k, g in grads.items():
            acc[k].add(g)
    return {k: a.mean for k, a in acc.items()}, {k: (a.var / draws).sqrt() for k, a in acc.items()}


def _particle_counts(particles) -> tuple[list[int], bool]:
    """``particles`` as a list of counts, and whether it was a sweep (a list)."""
    sweep = not isinstance(particles, int)
    counts = [particles] if not sweep else list(particles) if isinstance(particles, (list, tuple)) else None
    if counts is None:
        raise TypeError(f"particles must be an int or a list of ints, got {type(particles).__name__}")
    if not counts or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in counts):
        raise ValueError(f"particles must be a positive integer or a non-empty list of them, got {particles!r}")
    if len(set(counts)) != len(counts):
        raise ValueError(f"particles lists a count twice: {particles!r}")
    return counts, sweep


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
    particles: Union[int, Sequence[int]] = 1,
    data_plate: str = DATA,
) -> GradientStats:
    """Measure the gradient estimators ``estimators`` of ``model``/``guide`` at the current
    parameters (Pyro's param store is read, never stepped, and left as it was found). Networks
    stay in the mode the caller left them (these are gradients of the training objective; call
    ``.eval()`` first to measure those of the evaluation-mode ELBO).

    :param model: Pyro model; called as ``model(x)`` for a tensor batch, ``model(*batch)`` for a
        tuple and ``model(**batch)`` for a dict.
    :param guide: Pyro guide with the same signature, written reparameterized; each estimator
        prepares it (:func:`ppgen.infer.estimators.prepare_guide`).
    :param batch: the data tensor ``(B, ...)``, a tuple of model arguments aligned on dim 0, or
        a dict of keyword arguments (:func:`ppgen.infer.batches.as_batch`).
    :param estimators: names registered in :data:`ppgen.infer.estimators.ESTIMATORS`.
    :param num_draws: ``R``, independent gradient draws per estimator and particle count.
    :param reference: ``"reparam"`` (mean of ``reference_draws`` single-particle reparameterized
        draws, with its standard error), or a dict ``param name -> exact gradient`` of the loss
        w.r.t. the unconstrained parameter.
    :param warmup: draws made and discarded first, so baselines (decaying average, network) adapt.
        Each (estimator, K) warms up its own baselines from the store's state at the call.
    :param seed: torch seed of the draws; the caller's random state is restored afterwards.
    :param particles: ``K``, samples per gradient draw, drawn in one vectorized pass (for ``iwae``
        the K of the bound of Burda et al. 2016; for the others the average of K single-sample
        estimates). A list sweeps: every estimator is measured at each K, rows carry their
        ``particles`` and the ``mean``/``var`` labels read ``"<name> K=<K>"``.
    :param data_plate: name of the plate over datapoints, for the estimators that read terms per
        datapoint (iwae, dreg, vimco, score-nn-baseline); a model without a plate of that name
        uses its single plate of the batch's size (:func:`ppgen.infer.traces.find_data_plate`).
    :returns: :class:`GradientStats`.
    """
    data = as_batch(batch, "batch", model)
    args, kwargs = data.args, data.kwargs
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
    counts, sweep = _particle_counts(particles)
    device = data.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # The datapoint plate and the plate nesting, from one trace off the random stream; a pair
        # without a datapoint plate is fine for the estimators that do not need one.
        found = find_data_plate(model, guide, args, kwargs, data.size, data_plate, required=False)
        plate = found.data_plate or data_plate
        params = _collect_params(model, guide, args, kwargs)  # registers the pair's parameters, as any trace does
        if isinstance(reference, str):
            if reference != "reparam":
                raise ValueError(f"reference must be 'reparam' or a dict of exact gradients, got {reference!r}")
            ref, ref_se = _reference(model, guide, args, kwargs, plate, params, reference_draws, seed)
        elif isinstance(reference, Mapping):
            missing = set(params) - set(reference)
            if missing:
                raise ValueError(f"reference lacks gradients for parameters {sorted(missing)}")
            ref = {k: torch.as_tensor(reference[k], dtype=torch.float64, device=p.device).reshape(p.shape)
                   for k, p in params.items()}
            ref_se = {k: torch.zeros_like(v) for k, v in ref.items()}
        else:
            raise TypeError(f"reference must be 'reparam' or a dict, got {type(reference).__name__}")
        nesting = found.nesting if max(counts) > 1 else None
        means, variances, rows, checked = {}, {}, [], False
        for est in estimators:
            for k in counts:
                label = f"{est} K={k}" if sweep else est
                with _store_as_found():  # this estimator's baselines start from the caller's store
                    torch.manual_seed(seed)
                    elbo = make_elbo(est, k, k > 1, nesting if k > 1 else None)
                    if getattr(elbo, "vectorize_particles", False) and found.data_plate is not None and not checked:
                        check_vectorizable(model, guide, args, kwargs, found.nesting, plate, data.size, device,
                                           f"estimator {est!r} with {k} particle(s)")
                        checked = True
                    prepared = prepare_guide(est, guide)
                    for _ in range(warmup):
                        _draw(elbo, model, prepared, args, params, kwargs, plate)
                    acc = {name: _Welford(p) for name, p in params.items()}
                    halves = [{name: _Welford(p) for name, p in params.items()} for _ in range(2)]
                    sq_err = {name: torch.zeros((), dtype=torch.float64) for name in params}
                    seconds = 0.0
                    for r in range(num_draws):
                        grads, dt = _draw(elbo, model, prepared, args, params, kwargs, plate)
                        seconds += dt
                        for name, g in grads.items():
                            acc[name].add(g)
                            halves[r % 2][name].add(g)
                            sq_err[name] += ((g.double() - ref[name]) ** 2).sum().cpu()
                means[label] = {name: a.mean for name, a in acc.items()}
                variances[label] = {name: a.var for name, a in acc.items()}
                snr2 = _snr2_split(halves) if num_draws >= 8 else None
                rows += _summarise(est, k, label, means[label], variances[label], sq_err, ref, ref_se,
                                   num_draws, seconds / num_draws, snr2)
        for p in params.values():
            p.grad = None
    return GradientStats(rows, means, variances, ref, ref_se, num_draws, tuple(counts))


def _snr2_split(halves: list[dict[str, _Welford]]) -> dict[str, torch.Tensor]:
    """Per element, ``(U_A / v_B + U_B / v_A) / 2`` with ``U = m^2 - v / n`` of each half: zero
    in expectation for a zero-mean gradient element (module docstring). An element with no
    spread in one half but a mean is ``inf`` (deterministic); one with neither is ``nan``."""
    out = {}
    for name in halves[0]:
        (a, b) = (halves[0][name], halves[1][name])
        ua, ub = a.mean**2 - a.var / a.n, b.mean**2 - b.var / b.n
        out[name] = (ua / b.var + ub / a.var) / 2
    return out


def _summarise(est, particles, label, mean, var, sq_err, ref, ref_se, n, seconds, snr2) -> list[dict]:
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
        se_ref2 = torch.cat([(ref_se[k] ** 2).flatten() for k in keys]).cpu()
        se = (v / n + se_ref2).sqrt()
        sd, diff = v.sqrt(), m - r
        live = (m != 0) | (sd != 0)  # parameters the loss does not touch have no SNR
        if live.any():
            snr = (m.abs()[live] / sd[live]).mean().item()
            if snr2 is None:
                snr_corrected = math.nan
            else:
                s2 = torch.cat([snr2[k].flatten() for k in keys]).cpu()[live]
                s2 = s2[~s2.isnan()].mean().item() if (~s2.isnan()).any() else math.nan
                snr_corrected = math.copysign(math.sqrt(abs(s2)), s2) if math.isfinite(s2) else s2
        else:
            snr = snr_corrected = float("nan")
        # float32 gradients carry rounding of ~1e-6 relative: floor the standard error there, so a
        # deterministic estimator (enum) or a dead unit is not flagged for its last bits
        floor = 1e-5 * float(r.abs().max() + m.abs().max()) + 1e-30
        z = diff.abs() / se.clamp(min=floor)
        variance = v.sum().item()
        plugin = (diff ** 2).sum().item()
        rows.append({
            "estimator": est, "particles": particles, "label": label, "level": level, "name": name,
            "numel": m.numel(), "mean_abs": m.abs().mean().item(), "variance": variance, "snr": snr,
            "snr_corrected": snr_corrected, "bias2": plugin - (v / n + se_ref2).sum().item(),
            "bias2_plugin": plugin, "mse": sum(sq_err[k].item() for k in keys) / n,
            "max_z": z.max().item(), "seconds": seconds, "work_variance": variance * seconds,
        })
    order = {"all": 0, "group": 1, "layer": 2, "param": 3}
    return sorted(rows, key=lambda r: (order[r["level"]], r["name"]))


def format_table(stats: GradientStats, levels: Sequence[str] = ("all", "group"), relative_to: Optional[str] = None) -> list[str]:
    """Markdown table of ``stats`` rows at ``levels``; with ``relative_to`` (an estimator name),
    variance and SNR are also given as ratios to that estimator's row of the same name (and the
    same particle count when it was measured there, else its first). ``SNR*`` is the
    noise-floor-corrected SNR and ``bias^2`` the debiased squared bias (module docstring)."""
    head = "| estimator | K | group | variance | SNR | SNR* | bias^2 | MSE | ms/draw | variance x s |"
    if relative_to:
        head += f" var / {relative_to} | SNR / {relative_to} |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in stats.rows:
        if r["level"] not in levels:
            continue
        line = (f"| {r['estimator']} | {r['particles']} | {r['name']} | {r['variance']:.3g} | {r['snr']:.3g} | "
                f"{r['snr_corrected']:.3g} | {r['bias2']:.3g} | {r['mse']:.3g} | {1000 * r['seconds']:.2f} | "
                f"{r['work_variance']:.3g} |")
        if relative_to:
            same_k = [b for b in stats.rows if b["estimator"] == relative_to and b["particles"] == r["particles"]]
            base = stats.row(relative_to, r["name"], r["level"], r["particles"] if same_k else stats.particles[0])
            line += f" {_ratio(r['variance'], base['variance']):.3g} | {_ratio(r['snr'], base['snr']):.3g} |"
        lines.append(line)
    return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else (math.nan if a == 0 else math.inf)
