"""Evaluating a declared-model run (``ppgen train model``): evidence (per datapoint, AIS, or the
joint evidence of a model with global latents), samples, and gradient statistics, each reading
the run as :mod:`ppgen.user_models` trained it (the user's file imported again).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ppgen.data import DataConfig
from ppgen.devices import resolve_device
from ppgen.infer.batches import as_batch
from ppgen.infer.svi import evaluate_elbo
from ppgen.user_data import _first_rows, drop_keys, without_keys
from ppgen.user_models import ModelRunConfig, _open, _setup, load_model_run

__all__ = ["model_evidence_report", "format_joint_report", "sample_model_run", "measure_model_run"]


def model_evidence_report(path: Union[str, Path], config, progress: bool = False,
                          num_outer: Optional[int] = 100) -> dict:
    """``ppgen evidence`` on a model run: importance-sampled ``log p(x_n)``
    (:func:`ppgen.log_evidence`, with the run's ``data_plate``) on the split ``config.split``,
    written to ``path/evidence.json`` and ``path/figures/{iwae_ladder,khat}.png`` like a VAE run's.

    :param config: :class:`ppgen.infer.evidence_report.EvidenceConfig`; with ``ais_steps > 0``
        also AIS and BDMC on the first ``ais_limit`` datapoints, as for a VAE run (a model on one
        data tensor with its datapoints in ``pyro.plate("data")`` only).
    A model with latents outside the data plate (global latents) has no per-datapoint
    evidence: with ``num_outer`` it gets the joint ``log p(x_1..N)`` of the split by nested
    importance sampling (:func:`ppgen.joint_log_evidence`, ``num_outer`` outer draws of the
    globals, ``config.samples`` inner draws per datapoint), reported per datapoint (divided by
    ``N``) next to the ELBO of the whole split; the report's ``"evidence"`` is ``"joint"`` then.

    A guide that gives probability 0 to values of a discrete latent that the model allows (a
    label the guide pins, as a semi-supervised guide does in rows whose label is given) is
    refused: importance sampling then estimates the evidence of the values it proposes only
    (``log p(x, y)``), never ``log p(x)``, however many samples; the message says what to do.

    :raises ValueError: global latents and ``num_outer`` None (the message points to
        :func:`ppgen.joint_log_evidence`), global latents with dict or tuple data, or a guide
        whose support misses values the model allows.
    """
    from ppgen.infer.evidence import log_evidence
    from ppgen.infer.evidence_report import write_report
    from ppgen.infer.support import GuideSupportError

    model, guide, run_config, data = load_model_run(path, config.device)
    split = getattr(data, config.split)
    if config.limit is not None:
        split = _first_rows(split, config.limit)
    split = drop_keys(model, split, config.drop_keys, f"the {config.split} split of {path}")
    split = as_batch(split, f"{config.split} data", model).to(resolve_device(config.device)).data
    t0 = time.perf_counter()
    global_sites = _global_latents(model, guide, split, run_config.data_plate)
    if global_sites and num_outer is None:
        raise ValueError(
            f"the model of {path} has latents outside its datapoint plate ({', '.join(global_sites)}): its "
            "evidence does not factor per datapoint; use ppgen.joint_log_evidence (ppgen evidence "
            "--outer-samples S: nested importance sampling of the joint log p(x_1..N))"
        )
    try:  # both estimators refuse a guide that pins a label before they sample; the CLI's own advice
        if global_sites:
            return _joint_report(model, guide, split, config, run_config, num_outer, path, t0)
        r = log_evidence(model, guide, split, config.samples, batch_size=config.batch_size,
                         particle_chunk=config.particle_chunk, seed=config.seed, progress=progress,
                         data_plate=run_config.data_plate)
    except GuideSupportError as e:
        raise ValueError(
            f"{path}: {e.problem} If these are labels given as data (a semi-supervised model), evaluate with "
            "--drop-keys naming the label keys (e.g. --drop-keys ys,labelled), or train with --train-only "
            "ys,labelled so that validation and test leave them out too; otherwise give every value the model "
            "allows a positive probability in the guide") from None
    report = {"config": dataclasses.asdict(config), "evidence": "per-datapoint", **r.summary(),
              "is_seconds": time.perf_counter() - t0}
    if config.ais_steps > 0:
        report.update(_ais(model, guide, split, r, config, run_config))
    write_report(report, r, path)
    return report


def _ais(model: Callable, guide: Callable, data: Any, r, config, run_config: ModelRunConfig) -> dict:
    """The ``"ais"`` and ``"bdmc"`` entries of an evidence report, as ``ppgen evidence`` writes
    them for a VAE run (:func:`ppgen.infer.ais.ais_log_evidence`, :func:`ppgen.infer.ais.bdmc`;
    BDMC for data in one tensor only)."""
    from ppgen.infer.evidence_report import ais_entries

    return ais_entries(model, guide, data, r, config, run_config.data_plate)


def _global_latents(model: Callable, guide: Callable, data: Any, data_plate: str) -> list[str]:
    """Names of the guide's latent sites outside the datapoint plate (off the random stream)."""
    from pyro import poutine
    from pyro.poutine.util import site_is_subsample

    from ppgen.infer.networks import eval_mode
    from ppgen.infer.traces import find_data_plate

    batch = as_batch(data, "data", model)
    plate = find_data_plate(model, guide, batch.args, batch.kwargs, batch.size, data_plate).data_plate
    cuda = [batch.device] if batch.device.type == "cuda" else []
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=cuda), eval_mode(model, guide):
        g = poutine.trace(guide).get_trace(*batch.args, **batch.kwargs)
    return [name for name, site in g.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
            and not site["infer"].get("is_auxiliary")
            and all(f.name != plate for f in site["cond_indep_stack"])]


def _joint_report(model, guide, data, config, run_config: ModelRunConfig, num_outer: int, path, t0: float) -> dict:
    """:func:`model_evidence_report` for a model with global latents (nested IS; see there)."""
    from ppgen.infer.nested_evidence import joint_log_evidence

    if not isinstance(data, torch.Tensor):
        raise ValueError("joint evidence (a model with global latents) takes one data tensor; this run's data is a "
                         f"{'dict' if isinstance(data, dict) else 'tuple'} of arguments: call ppgen.joint_log_evidence "
                         "from Python with your own arguments")
    r = joint_log_evidence(model, guide, data, num_outer=num_outer, num_inner=config.samples,
                           batch_size=config.batch_size, seed=config.seed, data_plate=run_config.data_plate)
    n = len(data)
    seconds = time.perf_counter() - t0
    elbo = evaluate_elbo(model, guide, data, batch_size=n, num_particles=10, seed=config.seed)  # globals once
    report = {
        "config": {**dataclasses.asdict(config), "outer_samples": num_outer}, "evidence": "joint", "n": n,
        "num_samples": r.num_inner, "num_outer": r.num_outer, "elbo": elbo,
        "log_px": r.log_px / n, "log_px_stderr": r.stderr / n, "log_px_joint": r.log_px, "log_px_joint_stderr": r.stderr,
        "gap": r.log_px / n - elbo, "ess": r.ess, "khat": _finite_or_none(r.khat), "khat_threshold": r.khat_threshold,
        "khat_share_untrusted": None if r.khat_threshold is None else float(not r.trusted),
        "inner_stderr": _finite_or_none(r.inner_stderr), "is_seconds": seconds,
    }
    (Path(path) / "evidence.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _finite_or_none(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def format_joint_report(report: dict) -> str:
    """A plain-text table of a joint-evidence report (:func:`model_evidence_report`, global latents)."""
    khat = "n/a (fewer than 10 outer draws)" if report["khat"] is None else (
        f"{report['khat']:.2f} ({'trusted' if not report['khat_share_untrusted'] else 'untrusted'}: "
        f"threshold {report['khat_threshold']:.2f})")
    rows = [
        ("datapoints", f"{report['n']}"),
        ("ELBO per datapoint", f"{report['elbo']:.3f}"),
        (f"joint log p(X) / N, S={report['num_outer']} K={report['num_samples']}",
         f"{report['log_px']:.3f} +- {report['log_px_stderr']:.3f}"),
        ("joint log p(X)", f"{report['log_px_joint']:.2f} +- {report['log_px_joint_stderr']:.2f}"),
        ("outer ESS", f"{report['ess']:.1f}"),
        ("outer k-hat", khat),
        ("seconds", f"{report['is_seconds']:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@torch.no_grad()
def sample_model_run(path: Union[str, Path], n: int, out: Union[str, Path, None] = None, seed: int = 0,
                     device: str = "cpu") -> tuple[dict, Path]:
    """``ppgen sample`` on a model run: ``n`` draws from the trained model's joint distribution.

    The model runs under ``poutine.uncondition`` (every observed site is drawn from its
    distribution instead of scored) on a template batch of ``n`` training datapoints (rows
    repeated when ``n`` exceeds the split): latents come from the prior, observations from the
    likelihood (``pyro.factor`` terms are no observations and are left out). The template
    (without the run's ``train_only`` keys) gives the batch its shape; a model that reads the *values* of its
    arguments beyond the observed sites (a conditional model, covariates) is sampled given the
    template's values there.

    Built-in image data: a PNG grid of the one observed site (``out`` or
    ``RUN/figures/samples-N.png``). Data files: ``{site: (n, ...)}`` of every observed site, saved
    with ``torch.save`` (``out`` or ``RUN/samples-N.pt``).

    :returns: ``({observed site: draws}, path written)``.
    """
    from pyro import poutine

    from ppgen.infer.traces import check_positive_int

    check_positive_int("n", n)
    model, _, config, data = load_model_run(path, device)
    train = as_batch(without_keys(data.train, config.data.train_only), "train data", model)
    template = train.rows(torch.arange(n) % train.size).to(resolve_device(device))
    torch.manual_seed(seed)
    trace = poutine.trace(poutine.uncondition(model)).get_trace(*template.args, **template.kwargs)
    names = _observed_sites(model, template)
    observed = {name: site["value"].detach().cpu() for name, site in trace.nodes.items() if name in names}
    if not observed:
        raise ValueError(f"the model of {path} observes no site (no pyro.sample(..., obs=...)); nothing to draw")
    if not config.data.is_file:
        if len(observed) != 1:
            raise ValueError(f"the model of {path} observes {sorted(observed)}; ppgen sample draws an image grid "
                             "of one observed site only")
        (draws,) = observed.values()
        shape = DataConfig(config.data.name).image_shape
        if draws.shape != (n, math.prod(shape)):
            raise ValueError(f"the observed site {next(iter(observed))!r} has shape {tuple(draws.shape)}, not "
                             f"({n}, {math.prod(shape)}) images of {config.data.name}")
        from ppgen.plots import save_image_grid

        target = Path(out) if out else Path(path) / "figures" / f"samples-{n}.png"
        return observed, save_image_grid(draws.clamp(0, 1), shape, target)
    target = Path(out) if out else Path(path) / f"samples-{n}.pt"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(observed, target)
    return observed, target


def _observed_sites(model: Callable, template) -> set[str]:
    """Names of the sites ``model`` observes on ``template`` (one conditioned trace, off the random stream)."""
    from pyro import poutine

    with torch.random.fork_rng(), poutine.block():
        tr = poutine.trace(model).get_trace(*template.args, **template.kwargs)
    return {name for name, site in tr.nodes.items() if site["type"] == "sample" and site["is_observed"]
            and not site["infer"].get("is_auxiliary")}  # pyro.factor terms are no draws


def measure_model_run(
    run_path: Union[str, Path],
    estimators: Sequence[str],
    checkpoints: str = "all",
    num_draws: int = 100,
    batch_size: int = 128,
    reference_draws: int = 500,
    warmup: int = 100,
    seed: int = 0,
    device: str = "cpu",
    particles: Union[int, Sequence[int]] = 1,
) -> list:
    """:func:`ppgen.infer.variance.gradient_stats` of model run ``run_path`` at initialization and
    each checkpoint, on its first ``batch_size`` validation datapoints; the counterpart of
    :func:`ppgen.infer.variance_runs.measure_run` (same arguments and result) for declared models."""
    from ppgen.infer.variance import gradient_stats
    from ppgen.infer.variance_runs import list_checkpoints

    _, config = _open(run_path, "measure")
    out = []
    for point in list_checkpoints(run_path, checkpoints):
        model, guide, data = _setup(config, device, point.path, run_path)
        batch = as_batch(_first_rows(data.val, batch_size), "validation data", model).to(resolve_device(device)).data
        stats = gradient_stats(model, guide, batch, estimators, num_draws=num_draws, reference_draws=reference_draws,
                               warmup=warmup, seed=seed, particles=particles, data_plate=config.data_plate)
        out.append((point, stats))
    return out

