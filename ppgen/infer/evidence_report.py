"""Evidence report of a trained run: ELBO, IWAE ladder, IS ``log p(x)``, k-hat, AIS and BDMC.

What ``ppgen evidence RUN`` and the demo call: evaluates one split of a run's dataset, writes
``evidence.json`` and two figures (IWAE bound vs K, k-hat histogram) and returns the numbers.

With ``proposal="auto"`` (or ``gaps=True``) the draws come from refined local proposals chosen
by k-hat within a stated budget (:func:`ppgen.infer.trusted.trusted_evidence`); ``gaps=True``
adds the approximation and amortization gaps (:func:`ppgen.infer.trusted.inference_gaps`), the
per-datapoint estimates with their trust verdicts, and ``figures/gaps.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Union

import torch

from ppgen.infer.ais import ais_log_evidence, bdmc, guide_start
from ppgen.infer.batches import as_batch
from ppgen.infer.evidence import khat_threshold, khat_untrusted, log_evidence
from ppgen.infer.traces import DATA
from ppgen.infer.trusted import default_candidates, inference_gaps, trusted_evidence
from ppgen.plots import save_figure

__all__ = ["EvidenceConfig", "evidence_report", "format_report", "plot_ladder", "plot_khat", "plot_gaps", "plot_khat_arviz"]


@dataclasses.dataclass(frozen=True)
class EvidenceConfig:
    """Settings of an evidence evaluation (``ppgen evidence`` flags map 1:1 onto the fields)."""

    samples: int = 5000  # K importance samples per datapoint
    split: str = "test"  # "test" or "val"
    limit: Optional[int] = None  # evaluate only the first `limit` datapoints (None: all)
    batch_size: int = 100  # datapoints per chunk
    particle_chunk: int = 500  # particles per vectorized pass
    ais_steps: int = 0  # AIS annealing steps (0: no AIS)
    ais_chains: int = 16  # AIS chains per datapoint
    ais_limit: int = 100  # datapoints for AIS and BDMC (the first ones of the split)
    ais_start: str = "encoder"  # AIS/BDMC path from "encoder" (the guide's q(z|x)) or "prior"
    seed: int = 0  # seeds the draws
    device: str = "cpu"  # "cpu" or "cuda"
    proposal: str = "guide"  # "guide" (IS from the guide) or "auto" (refined q* proposals chosen by k-hat)
    gaps: bool = False  # report L[q], L[q*], approximation and amortization gaps (implies proposal "auto")
    budget: float = 1.5  # "auto": at most this many times the cost of plain IS with `samples` draws
    refine_steps: int = 50  # "auto": Adam steps of each datapoint's q*
    refine_samples: int = 16  # "auto": draws per refine step
    pilot: int = 50  # "auto": datapoints the candidate proposals are compared on
    drop_keys: tuple[str, ...] = ()  # model runs on dict data: keys left out of the model call (labels: log p(x))

    def __post_init__(self) -> None:
        for name in ("samples", "batch_size", "particle_chunk", "ais_chains", "ais_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {self.split!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive integer or None, got {self.limit!r}")
        if not isinstance(self.ais_steps, int) or self.ais_steps < 0:
            raise ValueError(f"ais_steps must be a non-negative integer, got {self.ais_steps!r}")
        if self.ais_start not in ("encoder", "prior"):
            raise ValueError(f"ais_start must be 'encoder' or 'prior', got {self.ais_start!r}")
        if self.proposal not in ("guide", "auto"):
            raise ValueError(f"proposal must be 'guide' or 'auto', got {self.proposal!r}")
        if self.gaps and self.proposal == "guide":
            raise ValueError("gaps need the refined proposals: use proposal='auto' (the default with --gaps)")
        for name in ("refine_samples", "pilot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ValueError(f"refine_steps must be a non-negative integer, got {self.refine_steps!r}")


def evidence_report(
    model, guide, data: torch.Tensor, config: EvidenceConfig, out: Union[str, Path, None] = None, progress: bool = False
) -> dict:
    """Evaluate ``data`` (shape ``(N, ...)``, on the model's device) and write ``out/evidence.json``
    and ``out/figures/{iwae_ladder,khat}.png`` when ``out`` is given. Returns the JSON dict."""
    if config.limit is not None:
        data = data[: config.limit]
    t0 = time.perf_counter()
    common = dict(batch_size=config.batch_size, particle_chunk=config.particle_chunk, seed=config.seed, progress=progress)
    extra, gaps = {}, None
    if config.proposal == "auto":
        t = trusted_evidence(model, guide, data, config.samples, budget=config.budget, pilot=config.pilot,
                             candidates=default_candidates(config.refine_steps, config.refine_samples), extend=True,
                             **common)
        r = t.result
        extra["choice"] = {"chosen": t.chosen, "pilot_share_untrusted": t.pilot, **t.plan}
        trusted = ~khat_untrusted(r.khat, r.num_samples)
        extra["datapoints"] = {"log_px": r.log_px.tolist(), "stderr": r.stderr.tolist(), "khat": r.khat.tolist(),
                               "trusted": trusted.tolist()}
        if config.gaps:
            gaps = inference_gaps(r)
            extra["gaps"] = gaps.summary()
            extra["datapoints"].update({k: getattr(gaps, k).tolist() for k in
                                        ("elbo_q", "elbo_q_se", "elbo_qstar", "elbo_qstar_se", "approximation",
                                         "approximation_se", "amortization", "amortization_se")})
    else:
        r = log_evidence(model, guide, data, config.samples, **common)
    report = {"config": dataclasses.asdict(config), **r.summary(), "is_seconds": time.perf_counter() - t0, **extra}
    if r.local is not None:  # "elbo" stays the encoder's L[q]; the proposal's mean log weight apart
        report["proposal_mean_log_weight"] = report["elbo"]
        report["elbo"] = float(r.local["elbo_q"].mean())
        report["gap"] = report["log_px"] - report["elbo"]
    if config.ais_steps > 0:
        report.update(ais_entries(model, guide, data, r, config))
    if out is not None:
        write_report(report, r, out)
        if gaps is not None:
            plot_gaps(gaps, report, Path(out) / "figures" / "gaps.png")
    return report


def ais_entries(model, guide, data, r, config: EvidenceConfig, data_plate: str = DATA) -> dict:
    """The ``"ais"`` and ``"bdmc"`` entries of an evidence report: AIS and BDMC on the first
    ``config.ais_limit`` datapoints of ``data``, next to the IS result ``r`` on the same points,
    their paths starting at ``config.ais_start`` (the guide's q(z|x), or the prior). ``data`` is
    a tensor, a tuple or a dict of model arguments (:func:`ppgen.infer.batches.as_batch`); BDMC
    simulates one observed tensor, so for a tuple or dict the report has no ``"bdmc"`` entry."""
    batch = as_batch(data, "data", model)
    n = min(config.ais_limit, batch.size)
    sub = batch.rows(slice(0, n)).data
    start = guide_start(guide) if config.ais_start == "encoder" else None
    t0 = time.perf_counter()
    a = ais_log_evidence(model, sub, config.ais_chains, config.ais_steps, batch_size=config.batch_size,
                         seed=config.seed, start=start, data_plate=data_plate)
    ais = {
        "n": n,
        "start": config.ais_start,
        "log_px": float(a.log_px.mean()),
        "is_log_px_same_points": float(r.log_px[:n].mean()),
        # the encoder's ELBO (L[q] when the draws came from a refined proposal)
        "elbo_same_points": float((r.elbo if r.local is None else r.local["elbo_q"])[:n].mean()),
        "accept": float(a.accept.mean()),
        "seconds": time.perf_counter() - t0,
        # per datapoint: IS and AIS within 3 combined standard errors of each other
        "share_within_3se_of_is": float(((r.log_px[:n] - a.log_px).abs()
                                         <= 3 * (r.stderr[:n].pow(2) + a.stderr.pow(2)).sqrt()).double().mean()),
    }
    if batch.form != "tensor":
        return {"ais": ais}
    b = bdmc(model, sub, config.ais_chains, config.ais_steps, batch_size=config.batch_size, seed=config.seed + 1,
             start=start, data_plate=data_plate)
    return {"ais": ais, "bdmc": {"n": n, "lower": float(b.lower.mean()), "upper": float(b.upper.mean()), "gap": b.gap}}


def write_report(report: dict, r, out: Union[str, Path]) -> None:
    """``out/evidence.json`` and the figures ``out/figures/{iwae_ladder,khat}.png`` of ``report``
    and its IS result ``r``."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "evidence.json").write_text(json.dumps(report, indent=1 if "datapoints" in report else 2) + "\n")
    plot_ladder(report, out / "figures" / "iwae_ladder.png")
    plot_khat(r.khat, out / "figures" / "khat.png", r.num_samples)


def format_report(report: dict) -> str:
    """A plain-text table of :func:`evidence_report`'s numbers (nats per datapoint)."""
    rows = [
        ("datapoints", f"{report['n']}"),
        ("ELBO", f"{report['elbo']:.3f}"),
        *((f"IWAE K={k}" if report.get("proposal", "guide") == "guide" else f"IS bound K={k} ({report['proposal']})",
           f"{v:.3f}") for k, v in report["ladder"].items()),
        (f"IS log p(x), K={report['num_samples']}", f"{report['log_px']:.3f} +- {report['log_px_stderr']:.3f}"),
        ("IS - ELBO gap", f"{report['gap']:.3f}"),
        ("median ESS", f"{report['median_ess']:.1f}"),
        khat_row(report),
        ("IS seconds", f"{report['is_seconds']:.1f}"),
    ]
    if "choice" in report:
        c = report["choice"]
        rows += [
            ("proposal (fewest k-hat > threshold)", c["chosen"]),
            (f"pilot share untrusted ({c['pilot']} points)", ", ".join(f"{k} {v:.2f}" for k, v in c["pilot_share_untrusted"].items())),
            ("cost / budget (model evals per point)", f"{c['planned_evals']:.0f} / {c['budget_evals']:.0f} (K = {c['num_samples']})"),
        ]
    if "gaps" in report:
        g = report["gaps"]
        rows += [
            ("L[q] (encoder ELBO)", f"{g['elbo_q']:.3f} +- {g['elbo_q_se']:.3f}"),
            ("L[q*] (refined ELBO)", f"{g['elbo_qstar']:.3f} +- {g['elbo_qstar_se']:.3f}"),
            ("approximation gap log p(x) - L[q*]", f"{g['approximation']:.3f} +- {g['approximation_se']:.3f}"),
            ("amortization gap L[q*] - L[q]", f"{g['amortization']:.3f} +- {g['amortization_se']:.3f}"),
            ("larger gap", g["dominant"]),
        ]
    if "ais" in report:
        a, b = report["ais"], report.get("bdmc")
        rows += [
            (f"AIS log p(x) (first {a['n']}, from the {a.get('start', 'prior')})", f"{a['log_px']:.3f}"),
            (f"IS on the same {a['n']}", f"{a['is_log_px_same_points']:.3f}"),
            ("AIS - IS", f"{a['log_px'] - a['is_log_px_same_points']:.3f}"),
            ("share of points where AIS and IS agree within 3 SE", f"{a.get('share_within_3se_of_is', float('nan')):.2f}"),
            ("AIS acceptance", f"{a['accept']:.2f}"),
        ]
        if b is not None:  # BDMC simulates data in one tensor only
            rows += [("BDMC lower / upper (simulated)", f"{b['lower']:.3f} / {b['upper']:.3f}"),
                     ("BDMC gap", f"{b['gap']:.3f}")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def khat_row(report: dict) -> tuple[str, str]:
    """The table row of the k-hat verdict: the share of datapoints whose k-hat exceeds the
    sample-size threshold ``min(1 - 1/log10 K, 0.7)`` (or was not fitted, ``K < 10``)."""
    t = report["khat_threshold"]
    name = "share k-hat > {:.2f} (K={})".format(t, report["num_samples"]) if t is not None else "share untrusted (K < 10: no k-hat)"
    return name, f"{report['khat_share_untrusted']:.3f}"


def plot_ladder(report: dict, path: Path) -> Path:
    """IWAE bound vs K (log axis), with the ELBO and AIS as reference lines."""
    import matplotlib.pyplot as plt

    ks = [int(k) for k in report["ladder"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ks, list(report["ladder"].values()), marker="o", label="IWAE bound (nested prefixes)")
    ax.axhline(report["elbo"], color="gray", ls="--", label="ELBO")
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("nats per datapoint")
    ax.set_title(f"IWAE bound vs K ({report['n']} datapoints)")
    ax.legend()
    return save_figure(fig, path)


def plot_khat(khat: torch.Tensor, path: Path, num_samples: int) -> Path:
    """Histogram of per-datapoint Pareto k-hat ``(N,)`` from ``num_samples`` weights each, with the
    sample-size threshold ``min(1 - 1/log10 K, 0.7)`` (Vehtari et al. 2024) and 0.7."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    values = khat[torch.isfinite(khat)].numpy()
    ax.hist(values, bins=40, color="tab:blue", alpha=0.8)
    share = float(khat_untrusted(khat, num_samples).double().mean())
    if num_samples >= 10:
        t = khat_threshold(num_samples)
        lines = [(t, "red", f"trusted up to k = {t:.2f} (K = {num_samples})")]
        if t < 0.7:
            lines.append((0.7, "gray", "k = 0.7 (large-K limit)"))
        for x, c, label in lines:
            ax.axvline(x, color=c, ls="--", label=label)
        title = f"PSIS k-hat: {share:.0%} of datapoints above {t:.2f}"
    else:
        title = f"PSIS k-hat not fitted: K = {num_samples} < 10 weights ({share:.0%} untrusted)"
    ax.set_xlabel("Pareto k-hat of the importance weights")
    ax.set_ylabel("datapoints")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return save_figure(fig, path)


def plot_gaps(gaps, report: dict, path: Path) -> Path:
    """Histograms of the per-datapoint approximation and amortization gaps (trusted datapoints;
    all if none is trusted), their means in the legend."""
    import matplotlib.pyplot as plt

    import numpy as np

    keep = gaps.trusted if gaps.trusted.any() else torch.ones_like(gaps.trusted)
    values = {name: getattr(gaps, name)[keep].numpy() for name in ("approximation", "amortization")}
    both = np.concatenate(list(values.values()))
    bins = np.linspace(both.min(), both.max(), 41)  # one set of bins for both gaps
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for (name, v), color in zip(values.items(), ("tab:blue", "tab:orange")):
        ax.hist(v, bins=bins, histtype="step", lw=2, color=color, label=f"{name} gap (mean {v.mean():.2f} nats)")
    ax.set_xlabel("nats per datapoint")
    ax.set_ylabel("datapoints")
    chosen = report.get("choice", {}).get("chosen", report.get("proposal", ""))
    ax.set_title(f"Inference gaps, {int(keep.sum())} of {len(keep)} datapoints trusted\n(IS from {chosen})", fontsize=9)
    ax.legend()
    return save_figure(fig, path)


def plot_khat_arviz(khat: torch.Tensor, path, title: str = "", *, num_samples: int):
    """ArviZ's ``plot_khat`` of per-datapoint k-hat ``(N,)`` (e.g. :attr:`EvidenceResult.khat`)
    from ``num_samples`` weights each, with lines at 0, the sample-size threshold
    :func:`khat_threshold` and 1, and the share of datapoints per band, written to the PNG
    ``path``. ``-inf`` (equal weights) is drawn at 0. Returns the path.

    :param num_samples: ``K >= 10``, the weights behind each k-hat (sets the threshold).
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppgen.plots import save_figure
    import numpy as np

    threshold = khat_threshold(num_samples)
    k = khat.detach().double().cpu().numpy().reshape(-1)
    if k.size == 0 or not np.isfinite(np.where(np.isneginf(k), 0.0, k)).any():
        raise ValueError(f"khat must hold at least one finite value, got {k.size} values")
    k = np.where(np.isneginf(k), 0.0, k)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az
        import xarray as xr

        # As an ELPDData, ArviZ draws its bands at good_k: our sample-size threshold, not 0.7.
        elpd = az.ELPDData(
            data=[xr.DataArray(k[np.isfinite(k)], dims=["datapoint"]), threshold], index=["pareto_k", "good_k"]
        )
        az.plot_khat(elpd, show_hlines=True, show_bins=True, ax=ax, markersize=8)
    ax.set_xlabel("datapoint")
    ax.set_title(title or f"PSIS k-hat per datapoint ({k.size} datapoints, trusted up to {threshold:.2f})")
    return save_figure(fig, path)
