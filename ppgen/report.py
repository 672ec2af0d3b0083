"""``ppgen report RUN [RUN ...] --out report/``: one self-contained HTML page and its Markdown twin.

The report reads what the other commands wrote into each run directory and computes little
itself:

- ``config.json`` (family, estimator), ``metrics.jsonl`` (training curves, training time, test
  ELBO), ``checkpoint.pt`` (parameter count), ``figures/{samples,reconstructions,iwae_ladder}.png``;
- ``evidence.json`` from ``ppgen evidence`` (ELBO, IS ``log p(x)`` with its standard error, share
  of datapoints whose k-hat fails the sample-size threshold, AIS);
- ``metrics.json`` from ``ppgen metrics`` (classifier Frechet distance, precision, recall, label
  total variation, Parzen log-likelihood);
- ``variance/variance.png`` from ``ppgen variance`` (gradient variance and SNR).

With ``compare`` (``--compare DIR``) it adds the family comparison that ``ppgen
compare-families`` wrote into ``DIR`` (compare.json's table and the figures) as its own section.

It draws latent interpolations, a 2-D latent scatter, the training curves, and an ArviZ k-hat
plot from a fresh, smaller importance-sampling pass (:class:`ReportConfig` ``khat_samples`` /
``khat_limit``; the table's k-hat share stays the one in evidence.json).

Outputs in ``out``: ``report.html`` (figures embedded as base64 PNG, no external file),
``report.md`` (same content, figures linked from ``figures/``), ``report.json`` (the table rows).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ppgen.runs import Run, config_from_dict

__all__ = ["ReportConfig", "collect_run", "write_report", "COLUMNS", "add_report", "cmd_report"]

PathLike = Union[str, Path]


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of ``ppgen report`` (flags map 1:1 onto the fields)."""

    out: str = "report"  # output folder: report.html, report.md, report.json, figures/
    title: str = "ppgen report"  # page title
    khat_samples: int = 500  # K importance samples per datapoint for the ArviZ k-hat plot (0: no plot)
    khat_limit: int = 300  # datapoints of the evidence split in that plot
    interpolation_steps: int = 10  # images per latent interpolation row
    seed: int = 0  # seeds interpolations and the k-hat pass
    device: str = "cpu"  # "cpu" or "cuda"
    compare: Optional[str] = None  # a `ppgen compare-families` folder to add as a section; None: none

    def __post_init__(self) -> None:
        for name in ("khat_samples", "khat_limit", "interpolation_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.interpolation_steps < 2:
            raise ValueError(f"interpolation_steps must be at least 2, got {self.interpolation_steps}")


#: Table columns: (key in a row, header, format).
COLUMNS = [
    ("run", "run", "{}"),
    ("family", "family", "{}"),
    ("estimator", "estimator / objective", "{}"),
    ("dataset", "data", "{}"),
    ("elbo", "ELBO (nats)", "{:.2f}"),
    ("is_log_px", "IS log p(x) ± SE", "{:.2f}"),
    ("khat_share", "k-hat untrusted", "{:.1%}"),
    ("approximation_gap", "approx. gap", "{:.2f}"),
    ("amortization_gap", "amort. gap", "{:.2f}"),
    ("ais_log_px", "AIS log p(x)", "{:.2f}"),
    ("frechet_distance", "classifier Frechet", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("label_tv", "label TV", "{:.3f}"),
    ("parzen_log_likelihood", "Parzen log-lik ± SE", "{:.1f}"),
    ("train_seconds", "training time (s)", "{:.1f}"),
    ("parameters", "parameters", "{:,}"),
]


def _read_json(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun the command that writes it") from None


def _count_parameters(family: str, ckpt: dict) -> int:
    """Trainable weights in a checkpoint: the Pyro param store (SVI runs), generator +
    discriminator (GAN), the score network (score runs); buffers are not counted."""
    if "params" in ckpt:
        tensors = list(ckpt["params"].values())
    else:
        keys = {"gan": ("generator", "discriminator"), "score": ("net",)}.get(family, ())
        tensors = [v for k in keys for name, v in ckpt.get(k, {}).items()
                   if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    return int(sum(t.numel() for t in tensors if isinstance(t, torch.Tensor)))


def _estimator(family: str, cfg: dict) -> str:
    if family == "gan":
        return f"{cfg['loop']['loss']} loss"
    if family == "score":
        return f"{cfg['objective']} ({cfg['arch']})"
    return str(cfg.get("svi", {}).get("estimator", "?"))


def _dataset(family: str, cfg: dict) -> str:
    return str(cfg["data"] if family == "score" else cfg.get("data", {}).get("name", "?"))


def collect_run(path: PathLike, config: ReportConfig, figures: PathLike) -> dict:
    """Table row, figures and training curves of the run directory ``path``; new PNGs are
    written to ``figures`` as ``<run>-<kind>.png``.

    :returns: ``{"row": {...}, "figures": [(caption, png path)], "curves": curve_series(...), "notes": [...]}``.
    """
    from ppgen.report_figures import curve_series, steps_per_epoch

    path, figures = Path(path), Path(figures)
    run = Run(path, resume=True)
    cfg = run.load_config()
    family = cfg.get("family")
    if not isinstance(family, str):
        raise ValueError(f"{path}/config.json has no 'family'; is {path} a ppgen run directory?")
    name = path.name
    records = run.metrics()
    epochs = [r for r in records if "seconds" in r]
    row = {"run": name, "family": family, "estimator": _estimator(family, cfg), "dataset": _dataset(family, cfg),
           "train_seconds": sum(float(r["seconds"]) for r in epochs) if epochs else None, "epochs": len(epochs)}
    row["parameters"] = _count_parameters(family, run.load_checkpoint()) if run.checkpoint_path.exists() else None
    tests = [r["test_elbo"] for r in records if "test_elbo" in r]
    row["elbo"], row["elbo_source"] = (tests[-1], "metrics.jsonl test_elbo") if tests else (None, None)
    notes, out_figs = [] if epochs else [f"{name}: no epoch records in metrics.jsonl (training not started?)"], []
    evidence = _read_json(path / "evidence.json")
    if evidence is not None:
        row.update(elbo=evidence["elbo"], elbo_source=f"evidence.json ({evidence['n']} {evidence['config']['split']} points)",
                   is_log_px=evidence["log_px"], is_log_px_se=evidence["log_px_stderr"],
                   is_samples=evidence["num_samples"], khat_share=evidence.get("khat_share_untrusted"))
        if "ais" in evidence:
            row.update(ais_log_px=evidence["ais"]["log_px"], ais_n=evidence["ais"]["n"])
        if "gaps" in evidence:  # ppgen evidence --gaps: log p(x) - L[q*] and L[q*] - L[q]
            row.update(approximation_gap=evidence["gaps"]["approximation"],
                       amortization_gap=evidence["gaps"]["amortization"])
    metrics = _read_json(path / "metrics.json")
    if metrics is not None:
        row.update(frechet_distance=metrics["frechet_distance"], parzen_log_likelihood=metrics["parzen_log_likelihood"],
                   parzen_log_likelihood_se=metrics["parzen_stderr"], precision=metrics.get("precision"),
                   recall=metrics.get("recall"), label_tv=metrics.get("label_tv"))
    for kind, caption in (("samples", "samples"), ("reconstructions", "test images (left) and reconstructions (right), in pairs"),
                          ("iwae_ladder", "IWAE bound against K (evidence.json)")):
        if (run.figures / f"{kind}.png").exists():
            out_figs.append((f"{name}: {caption}", _copy(run.figures / f"{kind}.png", figures / f"{name}-{kind}.png")))
    out_figs += _model_figures(family, path, cfg, config, figures, name, evidence, notes)
    if (path / "variance" / "variance.png").exists():
        out_figs.append((f"{name}: gradient variance and SNR per estimator (ppgen variance)",
                         _copy(path / "variance" / "variance.png", figures / f"{name}-variance.png")))
    per_epoch = 0
    if family == "score":
        from ppgen.score import ScoreConfig, load_data

        per_epoch = steps_per_epoch(len(load_data(config_from_dict(ScoreConfig, cfg), download=False)[0]), cfg["batch_size"])
    return {"row": row, "figures": out_figs, "curves": curve_series(family, records, per_epoch), "notes": notes}


def _model_figures(family: str, path: Path, cfg: dict, config: ReportConfig, figures: Path, name: str,
                   evidence: Optional[dict], notes: list) -> list:
    """Figures that need the trained model: interpolations, 2-D latent scatter, ArviZ k-hat."""
    from ppgen.report_figures import gan_interpolation, latent_scatter, vae_interpolation

    out = []
    steps = config.interpolation_steps
    if family == "vae":
        from ppgen.train import load_vae

        vae, run_config, shape = load_vae(path, config.device)
        data = run_config.data.load(False)
        test = data.test.to(config.device)
        out.append((f"{name}: latent interpolations between encoder means of test images",
                    vae_interpolation(vae, test[:8], shape, figures / f"{name}-interpolation.png", steps)))
        if vae.z_dim == 2:
            out.append((f"{name}: 2-D latent means of the test split, coloured by label",
                        latent_scatter(vae, test, data.test_labels, figures / f"{name}-latent.png")))
        if config.khat_samples > 0:
            from ppgen.infer.evidence import log_evidence, plot_khat_arviz

            split = evidence["config"]["split"] if evidence else "test"
            x = getattr(data, split)[: config.khat_limit].to(config.device)
            vae.check_data(x)  # the stored split, as ppgen evidence scores it
            r = log_evidence(vae.model, vae.guide, x, config.khat_samples, seed=config.seed)
            title = f"{name}: PSIS k-hat, K={config.khat_samples}, first {len(x)} {split} images"
            out.append((f"{name}: Pareto k-hat per datapoint (ArviZ plot_khat; K={config.khat_samples}, "
                        f"{len(x)} {split} images)", plot_khat_arviz(r.khat, figures / f"{name}-khat.png", title,
                                                                num_samples=config.khat_samples)))
    elif family == "gan":
        from ppgen.gan import load_gan

        generator, gan_config = load_gan(path, config.device)
        out.append((f"{name}: generator along straight lines between prior draws",
                    gan_interpolation(generator, 4, gan_config.data.image_shape, figures / f"{name}-interpolation.png",
                                      steps, config.seed)))
    elif family not in ("score",):
        notes.append(f"{name}: family {family!r} has no model figures in the report")
    return out


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    text = fmt.format(value)
    if key == "is_log_px":
        se = row["is_log_px_se"]
        text += f" ± {se:.2f}" if se >= 0.01 else f" ± {se:.1g}"  # a tiny SE keeps one significant digit
    elif key == "parzen_log_likelihood":
        text += f" ± {row['parzen_log_likelihood_se']:.1f}"
    return text


def _png_uri(path: Path) -> str:
    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG"):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:nth-child(-n+4){text-align:left}figure{display:inline-block;margin:8px;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:13px;color:#555;max-width:560px}
.note{color:#555;font-size:13px}"""


def write_report(runs: Sequence[PathLike], config: ReportConfig = ReportConfig(),
                 extra_figures: Sequence[tuple[str, PathLike]] = (), intro: Sequence[str] = ()) -> Path:
    """Collect every run, then write ``report.html``, ``report.md`` and ``report.json`` into
    ``config.out``; ``extra_figures`` are ``(caption, png)`` pairs added in their own section
    (the demo's variance figure), ``intro`` Markdown/plain paragraphs under the title.

    :returns: the path of ``report.html``.
    """
    from ppgen.report_figures import training_curves

    if not runs:
        raise ValueError("runs must name at least one run directory")
    out = Path(config.out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    names = [Path(r).name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run directories must have distinct names, got {names}")
    collected = [collect_run(r, config, figures) for r in runs]
    rows = [c["row"] for c in collected]
    sections: list[tuple[str, list[tuple[str, Path]]]] = []
    curves = {c["row"]["run"]: (c["row"]["family"], c["curves"]) for c in collected if c["curves"]}
    if curves:
        sections.append(("Training curves", [("progress metric against optimizer steps and against training wall time",
                                              training_curves(curves, figures / "training-curves.png"))]))
    for c in (c for c in collected if c["figures"]):
        sections.append((f"Run {c['row']['run']} ({c['row']['family']})", c["figures"]))
    if extra_figures:
        sections.append(("More figures", [(cap, _copy(Path(p), figures / f"extra-{i}-{Path(p).name}"))
                                          for i, (cap, p) in enumerate(extra_figures)]))
    table: list = []
    if config.compare is not None:  # the family comparison: its table and figures, as a section
        from ppgen.compare_families import FAMILIES, table_lines

        done = Path(config.compare)
        table = table_lines(json.loads((done / "compare.json").read_text()))
        sections.append(("Comparing the three families (ppgen compare-families)", [
            (caption, _copy(done / "figures" / f"{name}.png", figures / f"compare-{name}.png"))
            for name, caption in (("curves", "metrics against training time, mean +- sd over seeds"),
                                  ("label_balance", "predicted-class shares of samples and test set"),
                                  *((f"samples-{f}", f"{f} samples (seed 0)") for f in FAMILIES))
            if (done / "figures" / f"{name}.png").exists()]))
    linked = sections  # every figure now lives in out/figures, so report.md's links work
    notes = [n for c in collected for n in c["notes"]] + _footnotes(rows)
    (out / "report.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(config.title, intro, rows, linked, notes, table))
    page = out / "report.html"
    page.write_text(_html(config.title, intro, rows, linked, notes, table))
    return page


def _copy(src: Path, target: Path) -> Path:
    """Copy the PNG ``src`` to ``target`` (unless it is that file) and return ``target``."""
    if not src.exists():
        raise FileNotFoundError(f"figure {src} does not exist")
    if src.resolve() != target.resolve():
        target.write_bytes(src.read_bytes())
    return target


def _footnotes(rows: list) -> list:
    notes = ["ELBO and log p(x) in nats per datapoint (higher is better); IS log p(x) from `ppgen evidence`"
             " (K importance samples, standard error of the mean over datapoints); k-hat untrusted is the share of"
             " datapoints whose Pareto k-hat exceeds min(1 - 1/log10 K, 0.7) or was not fitted (K < 10): their"
             " importance weights are unreliable (PSIS, Vehtari et al. 2024).",
             "Classifier Frechet distance (lower is better) and Parzen log-likelihood (Goodfellow et al. 2014;"
             " weak and biased, Theis et al. 2016) from `ppgen metrics`; — marks a number the run does not have."]
    for r in rows:
        if r.get("elbo_source"):
            notes.append(f"{r['run']}: ELBO from {r['elbo_source']}"
                         + (f"; IS with K={r['is_samples']}" if "is_samples" in r else "")
                         + (f"; AIS on the first {r['ais_n']} points" if "ais_n" in r else ""))
    return notes


def _markdown(title: str, intro: Sequence[str], rows: list, sections: list, notes: list, table: Sequence[str] = ()) -> str:
    lines = [f"# {title}", "", *[p + "\n" for p in intro],
             "| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    lines += ["", *[f"- {n}" for n in notes], ""]
    for heading, figs in sections:
        lines += [f"## {heading}", ""]
        if table and heading.startswith("Comparing the three families"):
            lines += [*table, ""]
        lines += [f"![{cap}](figures/{png.name})\n\n*{cap}*\n" for cap, png in figs]
    return "\n".join(lines) + "\n"


def _html(title: str, intro: Sequence[str], rows: list, sections: list, notes: list, table: Sequence[str] = ()) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for _, h, _ in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{e(_cell(r, k, f))}</td>" for k, _, f in COLUMNS) + "</tr>" for r in rows)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", *[f"<p>{e(p)}</p>" for p in intro],
             f"<table id='runs'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
             "<ul class='note'>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>"]
    for heading, figs in sections:
        parts.append(f"<h2>{e(heading)}</h2>")
        if table and heading.startswith("Comparing the three families"):  # Markdown rows -> an HTML table
            cells = [[c.strip() for c in line.strip("|").split("|")] for line in table if not line.startswith("|---")]
            parts.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in cells[0]) + "</tr></thead><tbody>"
                         + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
                         + "</tbody></table>")
        parts += [f"<figure><img alt='{e(cap)}' src='{_png_uri(png)}'><figcaption>{e(cap)}</figcaption></figure>"
                  for cap, png in figs]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- CLI


def add_report(sub) -> None:
    """Register ``ppgen report`` on the subparsers ``sub``."""
    p = sub.add_parser(
        "report", help="one self-contained HTML page (and report.md) comparing trained runs",
        description="Read each run's config, metrics.jsonl, evidence.json, metrics.json and figures "
        "and write OUT/report.html (figures embedded), OUT/report.md and OUT/report.json.")
    p.add_argument("runs", nargs="+", help="run directories (families vae, gan, score)")
    p.add_argument("--out", default="report", help="output folder (default: report)")
    p.add_argument("--title", default="ppgen report")
    p.add_argument("--khat-samples", type=int, default=500, help="K for the ArviZ k-hat plot of VAE runs (0: none)")
    p.add_argument("--khat-limit", type=int, default=300, help="datapoints in the k-hat plot")
    p.add_argument("--interpolation-steps", type=int, default=10, help="images per interpolation row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compare", default=None, help="a ppgen compare-families output folder to add as a section")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    config = ReportConfig(args.out, args.title, args.khat_samples, args.khat_limit, args.interpolation_steps,
                          args.seed, args.device, args.compare)
    page = write_report(args.runs, config)
    size = page.stat().st_size
    print(f"wrote {page} ({size / 1024:.0f} KiB, self-contained), {page.parent / 'report.md'} and "
          f"{page.parent / 'report.json'}")
    return 0
