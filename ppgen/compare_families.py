"""``ppgen compare-families``: the VAE, the GAN and the score model trained for the same wall
time on the same network sizes, judged in one feature space, with error bars over seeds.

**Equal budgets.** Each family trains through its own ``ppgen train`` code path
(:func:`ppgen.train.train_vae`, :func:`ppgen.gan.train_gan`, :func:`ppgen.score.train_score`) with its
own defaults (objective, batch size, learning rates, stabilizers), except for the shared sizes:
latent width and hidden widths of the MLPs. The budget counts training-loop time only: the sum
of the loops' per-epoch ``seconds`` (the score loop's includes its validation loss on 512
points; figures, checkpoints and evaluation are outside it). The loops stop at epoch
granularity, so a run trains epoch by epoch, resuming its own run directory, with as many
epochs per segment as the last segment's seconds per epoch say fit in half the time left
before the next time checkpoint (``S * j / checkpoints``), then all of it once under three
epochs are left; it stops when the time left is under half an epoch. At a steady speed each
checkpoint, and the end, is reached to within half an epoch; a machine that slows down k-fold
during a segment overruns by at most (k - 1) times that segment's planned time (stored, per
segment, in compare.json). The first epoch always runs,
even when it alone overruns ``S``. Optimizer steps are counted from the loops' logs (the GAN's
are generator steps; its discriminator takes ``d_steps`` per generator step).

**Judged alike.** At every time checkpoint the run's samples (``n_samples``; the same number of
test images, at most the whole test split) are scored in the feature space of the dataset's
cached classifier (:func:`ppgen.metrics.classifier_metrics`): Frechet distance, precision and
recall (Kynkaenniemi et al. 2019), and the label total variation; for the VAE also the
importance-sampled ``log p(x)`` of binarized test images (Burda et al. 2016; ``K =
evidence_samples``). Every metric is reported as mean +- sd (``n - 1`` in the denominator)
over the seeds, whose values are stored next to it. The validation split scored against the
test split is the yardstick row: what real data of the same size reaches.

**Outputs** in ``out``: ``runs/<family>-seed<s>/`` (ordinary run directories), ``compare.json``
(config, every checkpoint of every run, the table), ``compare.md`` (the report section) and
``figures/`` (a sample grid per family, metric-against-time curves, label balance bars).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ppgen.data import DATASETS, DataConfig

__all__ = ["FAMILIES", "METRICS", "CompareConfig", "compare_families", "summarize", "write_section"]

FAMILIES = ("vae", "gan", "score")
#: metric key -> (table heading, better direction)
METRICS = {"frechet_distance": ("Frechet distance", "lower"), "precision": ("precision", "higher"),
           "recall": ("recall", "higher"), "label_tv": ("label TV", "lower"), "log_px": ("log p(x) (IS)", "higher")}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """Settings of ``ppgen compare-families`` (flags map 1:1 onto the fields)."""

    data: str = "fashion-mnist"  # dataset name (ppgen.data.DATASETS)
    data_dir: Optional[str] = None  # folder with torchvision's dataset folders
    split_seed: int = 0  # seed of the train/validation split
    seconds: float = 60.0  # training-loop wall time per family and seed (epoch granularity)
    seeds: int = 3  # seeds 0 .. seeds-1 of every family
    checkpoints: int = 4  # evaluations at seconds * j / checkpoints, j = 1..checkpoints
    families: tuple[str, ...] = FAMILIES  # which of vae, gan, score
    latent_dim: int = 20  # latent width of the VAE and the GAN
    hidden: tuple[int, ...] = (400,)  # hidden widths of every MLP (encoder/decoder, G/D, score net)
    n_samples: int = 2000  # samples per evaluation, and as many test images (capped at the test split)
    k: int = 3  # neighbour of the precision/recall balls
    evidence_samples: int = 100  # K importance samples per test image for the VAE's log p(x); 0: none
    evidence_limit: int = 500  # test images in the VAE's log p(x)
    cache_dir: Optional[str] = None  # folder of cached feature classifiers
    device: str = "cpu"  # "cpu" or "cuda": training, sampling and metrics

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ValueError(f"data must be an image dataset ({', '.join(DATASETS)}), got {self.data!r}")
        if not (isinstance(self.seconds, (int, float)) and 0 < self.seconds < math.inf):
            raise ValueError(f"seconds must be a positive finite budget, got {self.seconds!r}")
        for name, low in (("seeds", 1), ("checkpoints", 1), ("n_samples", 2), ("k", 1), ("evidence_samples", 0),
                          ("evidence_limit", 1), ("latent_dim", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not self.families or set(self.families) - set(FAMILIES) or len(set(self.families)) != len(self.families):
            raise ValueError(f"families must name some of {', '.join(FAMILIES)} once each, got {self.families!r}")
        if self.k >= self.n_samples:
            raise ValueError(f"k ({self.k}) must be below n_samples ({self.n_samples})")


def run_config(family: str, config: CompareConfig, seed: int, epochs: int):
    """The run config of ``family`` at the shared sizes, with ``seed`` and ``epochs``; every other
    setting is the family's default (what ``ppgen train <family>`` does without flags)."""
    if family == "vae":
        from ppgen.infer.svi import SVIConfig
        from ppgen.models.vae import VAEConfig
        from ppgen.train import VAERunConfig

        return VAERunConfig(data=DataConfig(config.data, "dynamic", config.data_dir, config.split_seed),
                            model=VAEConfig(config.latent_dim, config.hidden),
                            svi=SVIConfig(epochs=epochs, seed=seed, device=config.device))
    if family == "gan":
        from ppgen.gan import GANConfig, LoopConfig

        return GANConfig(data=DataConfig(config.data, "none", config.data_dir, config.split_seed),
                         latent_dim=config.latent_dim, hidden=config.hidden,
                         loop=LoopConfig(epochs=epochs, seed=seed, device=config.device))
    from ppgen.score import ScoreConfig

    return ScoreConfig(data=config.data, data_dir=config.data_dir, split_seed=config.split_seed, hidden=config.hidden,
                       epochs=epochs, seed=seed, device=config.device)


def _train(family: str, cfg, path: Path, fresh: bool, download: bool) -> list[dict]:
    """Train ``cfg`` (fresh, or resuming ``path`` up to its epochs); the run's per-epoch history."""
    kwargs = dict(resume=not fresh, overwrite=fresh, progress=False, download=download)
    if family == "vae":
        from ppgen.train import train_vae

        return list(train_vae(cfg, path, **kwargs).result.history)
    if family == "gan":
        from ppgen.gan import train_gan

        return list(train_gan(cfg, path, **kwargs)[1].history)
    from ppgen.score import train_score

    return list(train_score(cfg, path, figures=False, **kwargs).history)


def _steps(family: str, history: list[dict]) -> int:
    if family == "gan":
        return sum(int(h["g_steps"]) for h in history)
    return int(history[-1]["step"])


def _parameters(family: str, cfg, dim: int, shape: tuple, path: Path) -> int:
    """Trainable parameters of everything the family trains (VAE: encoder + decoder; GAN: G + D;
    the score net as the run in ``path`` built it, its preconditioning resolved from the data)."""
    if family == "vae":
        nets = [cfg.model.build(dim, shape)]
    elif family == "gan":
        nets = list(cfg.build(dim, shape))
    else:
        from ppgen.score import load_score

        nets = [load_score(path)[0]]
    return sum(p.numel() for net in nets for p in net.parameters())


def _evaluate(family: str, path: Path, clf, test: torch.Tensor, vae_test: torch.Tensor, config: CompareConfig,
              seed: int) -> tuple[dict, torch.Tensor]:
    """Metrics of the run in ``path`` now, and its samples (CPU)."""
    from ppgen.metrics import RUN_SAMPLERS, classifier_metrics

    samples, _ = RUN_SAMPLERS[family](path, len(test), config.device, seed)
    out = classifier_metrics(clf, samples, test, config.k)
    if family == "vae" and config.evidence_samples:
        from ppgen.infer.evidence import log_evidence
        from ppgen.train import load_vae

        vae, _, _ = load_vae(path, config.device)
        summary = log_evidence(vae.model, vae.guide, vae_test, config.evidence_samples, seed=seed).summary()
        out.update(log_px=summary["log_px"], log_px_stderr=summary["log_px_stderr"], elbo=summary["elbo"])
    return out, samples


def _train_to(family: str, config: CompareConfig, seed: int, path: Path, target: float, state: dict,
              download: bool) -> bool:
    """Train the run in ``path`` until its loop time is within half an epoch of ``target``
    seconds; ``state`` (epochs, history) is updated. Returns whether anything was trained."""
    trained = False
    while True:
        history = state["history"]
        spent = sum(h["seconds"] for h in history)
        recent = history[-state["segments"][-1]["epochs"]:] if history else []  # follows the machine's load
        per_epoch = sum(h["seconds"] for h in recent) / len(recent) if recent else None
        if per_epoch is not None and target - spent <= 0.5 * per_epoch:
            return trained
        left = None if per_epoch is None else (target - spent) / per_epoch  # epochs that would fit
        # half of what is left, measured afresh each time, then the rest once under 3 epochs are left:
        # a machine that slows down k-fold overruns by at most (k - 1) times half the time left
        more = 1 if left is None else max(1, round(left if left < 3 else 0.5 * left))
        state["epochs"] += more
        cfg = run_config(family, config, seed, state["epochs"])
        t0 = time.perf_counter()
        state["history"] = _train(family, cfg, path, not history, download)
        state["wall"] += time.perf_counter() - t0
        state["segments"].append({"target": target, "spent_before": spent, "epochs": more, "per_epoch_estimate": per_epoch,
                                  "spent_after": sum(h["seconds"] for h in state["history"])})
        trained = True


def _stats(values: list) -> dict:
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else math.nan,
            "values": values}


def summarize(runs: dict) -> dict:
    """The table: ``family -> {column -> {mean, sd, values}}`` from the last checkpoint of each
    seed's run (``runs[family]`` is the list of runs, one per seed, each with ``checkpoints``)."""
    table = {}
    for family, per_seed in runs.items():
        last = [run["checkpoints"][-1] for run in per_seed]
        row = {"parameters": per_seed[0]["parameters"]}
        for key in ("steps", "train_seconds", "wall_seconds", *METRICS):
            if all(key in c for c in last):
                row[key] = _stats([c[key] for c in last])
        table[family] = row
    return table


def compare_families(config: CompareConfig, out: Union[str, Path], download: bool = True, overwrite: bool = False,
                     log: Callable[[str], None] = print) -> dict:
    """Train and evaluate every family of ``config`` for every seed into ``out``; write
    compare.json, compare.md and figures/ (see the module docstring). Returns compare.json's content."""
    from ppgen.devices import resolve_device
    from ppgen.metrics import feature_classifier

    out = Path(out)
    if (out / "compare.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a comparison (compare.json); pass --overwrite to replace it "
                              "or choose another --out")
    device = resolve_device(config.device)
    data = DataConfig(config.data, "none", config.data_dir, config.split_seed).load(download)
    vae_test = DataConfig(config.data, "dynamic", config.data_dir, config.split_seed).load(download).test
    n = min(config.n_samples, len(data.test))
    if config.k >= n:
        raise ValueError(f"k ({config.k}) must be below the number of samples compared ({n} = min(n_samples, test split))")
    test = data.test[:n].to(device)
    vae_test = vae_test[: config.evidence_limit].to(device)
    clf, accuracy = feature_classifier(data, config.cache_dir, device=str(device))
    n_runs = len(config.families) * config.seeds
    log(f"compare-families on {config.data} ({device}): {len(config.families)} families x {config.seeds} seeds x "
        f"{config.seconds:g} s = {n_runs * config.seconds:.0f} s of training ({n_runs * config.seconds / 60:.1f} min), "
        f"plus {config.checkpoints} evaluations of {n} samples per run; the total is projected after seed 0")
    start = time.perf_counter()
    runs: dict = {family: [] for family in config.families}
    samples: dict = {}
    for seed in range(config.seeds):
        for family in config.families:
            path = out / "runs" / f"{family}-seed{seed}"
            state, checkpoints = {"epochs": 0, "history": [], "wall": 0.0, "segments": []}, []
            for j in range(1, config.checkpoints + 1):
                if not _train_to(family, config, seed, path, config.seconds * j / config.checkpoints, state, download):
                    continue  # an epoch outlasted this checkpoint: nothing new to evaluate
                t0 = time.perf_counter()
                metrics, x = _evaluate(family, path, clf, test, vae_test, config, seed)
                checkpoints.append({"epochs": state["epochs"], "steps": _steps(family, state["history"]),
                                    "train_seconds": sum(h["seconds"] for h in state["history"]),
                                    "epoch_seconds_max": max(h["seconds"] for h in state["history"]),
                                    "wall_seconds": state["wall"], "eval_seconds": time.perf_counter() - t0, **metrics})
            cfg = run_config(family, config, seed, state["epochs"])
            runs[family].append({"seed": seed, "path": str(path), "checkpoints": checkpoints, "segments": state["segments"],
                                 "parameters": _parameters(family, cfg, data.dim, data.image_shape, path)})
            if seed == 0:
                samples[family] = x[:64]
            last = checkpoints[-1]
            log(f"  {family} seed {seed}: {last['epochs']} epochs, {last['steps']} steps, "
                f"{last['train_seconds']:.1f} s training; FD {last['frechet_distance']:.2f}, precision "
                f"{last['precision']:.3f}, recall {last['recall']:.3f}, label TV {last['label_tv']:.3f}")
        if seed == 0 and config.seeds > 1:
            spent = time.perf_counter() - start
            log(f"seed 0 took {spent:.0f} s: projected total {spent * config.seeds:.0f} s "
                f"({spent * config.seeds / 60:.1f} min)")
    yard = classifier_yardstick(clf, data, n, config.k)
    result = {"config": dataclasses.asdict(config), "device": str(device), "n_compared": n,
              "classifier_test_accuracy": accuracy, "yardstick": yard, "runs": runs, "table": summarize(runs),
              "total_seconds": time.perf_counter() - start}
    (out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    write_section(result, out, samples, data.image_shape)
    return result


def classifier_yardstick(clf, data, n: int, k: int) -> dict:
    """The validation split's first ``n`` images scored against the test split's first ``n``."""
    from ppgen.metrics import classifier_metrics

    device = next(clf.parameters()).device
    return classifier_metrics(clf, data.val[:n].to(device), data.test[:n].to(device), k)


def _cell(stats: Optional[dict], fmt: str) -> str:
    if stats is None:
        return "-"
    sd = "" if math.isnan(stats["sd"]) else f" +- {stats['sd']:{fmt}}"
    return f"{stats['mean']:{fmt}}{sd}"


def table_lines(result: dict) -> list[str]:
    """The Markdown table of ``result`` (compare.json's content)."""
    fmts = {"frechet_distance": ".2f", "precision": ".3f", "recall": ".3f", "label_tv": ".3f", "log_px": ".2f"}
    head = ["family", "parameters", "optimizer steps", "training s"]
    head += [f"{name} {'(lower better)' if better == 'lower' else '(higher better)'}" for name, better in METRICS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for family, row in result["table"].items():
        cells = [family, f"{row['parameters']:,}", _cell(row.get("steps"), ".0f"), _cell(row.get("train_seconds"), ".1f")]
        cells += [_cell(row.get(key), fmts[key]) for key in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    yard = result["yardstick"]
    cells = ["validation vs test (yardstick)", "-", "-", "-"] + [
        f"{yard[key]:{fmts[key]}}" if key in yard else "-" for key in METRICS]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_section(result: dict, out: Union[str, Path], samples: dict, image_shape: tuple) -> Path:
    """compare.md and figures/ (sample grids of seed 0, curves against time, label balance)."""
    from ppgen.report_figures import family_time_curves
    from ppgen.metrics_pr import plot_label_balance
    from ppgen.plots import save_image_grid

    out, cfg = Path(out), result["config"]
    figures = out / "figures"
    for family, x in samples.items():
        save_image_grid(x, image_shape, figures / f"samples-{family}.png")
    family_time_curves(result["runs"], METRICS, figures / "curves.png")
    hists = {"test set": result["yardstick"]["label_hist_data"]}
    for family, per_seed in result["runs"].items():
        h = torch.tensor([run["checkpoints"][-1]["label_hist_samples"] for run in per_seed]).mean(0)
        hists[f"{family} (mean of {len(per_seed)} seeds)"] = h.tolist()
    plot_label_balance(hists, figures / "label_balance.png", title="predicted-class shares at the end of the budget")
    lines = ["## Comparing the three families", "",
             f"{cfg['data']}, {cfg['seconds']:g} s of training-loop time per family and seed (epoch granularity), "
             f"seeds 0..{cfg['seeds'] - 1}, device {result['device']}; MLPs of hidden widths {list(cfg['hidden'])}, "
             f"latent width {cfg['latent_dim']}. Metrics at the end of the budget, mean +- sd over seeds, on "
             f"{result['n_compared']} samples against as many test images in the feature space of the dataset's "
             f"classifier (test accuracy {result['classifier_test_accuracy']:.3f}); precision/recall with k = {cfg['k']}; "
             f"log p(x): VAE only, importance sampling with K = {cfg['evidence_samples']} on "
             f"{cfg['evidence_limit']} binarized test images. Total time {result['total_seconds']:.0f} s.", "",
             *table_lines(result), "",
             "![metrics against training time](figures/curves.png)", "",
             "![label balance](figures/label_balance.png)", ""]
    lines += [f"![{family} samples (seed 0)](figures/samples-{family}.png)" for family in samples] + [""]
    path = out / "compare.md"
    path.write_text("\n".join(lines))
    return path


# --------------------------------------------------------------------------- command line


def add_compare_families(sub) -> None:
    from ppgen.cli.common import int_list, name_list, positive_float, positive_int

    d = CompareConfig()
    p = sub.add_parser(
        "compare-families",
        help="train the VAE, GAN and score model for equal wall time on equal sizes; FD, precision, recall, "
        "label balance (and the VAE's log p(x)) as mean +- sd over seeds",
        description="Writes OUT/compare.md (the report section), OUT/compare.json, OUT/figures/ and the runs in OUT/runs/.")
    p.add_argument("--data", default=d.data, choices=list(DATASETS), help=f"image dataset (default: {d.data})")
    p.add_argument("--data-dir", default=None, help="folder holding torchvision's dataset folders")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/validation split")
    p.add_argument("--seconds", type=positive_float, default=d.seconds,
                   help="training-loop seconds per family and seed (stops at epoch granularity)")
    p.add_argument("--seeds", type=positive_int, default=d.seeds, help="seeds 0..N-1 per family")
    p.add_argument("--checkpoints", type=positive_int, default=d.checkpoints, help="evaluations along the budget")
    p.add_argument("--families", type=name_list, default=d.families, help="comma-separated, from vae,gan,score")
    p.add_argument("--latent-dim", type=positive_int, default=d.latent_dim, help="latent width of the VAE and GAN")
    p.add_argument("--hidden", type=int_list, default=d.hidden, help="hidden widths of every MLP, e.g. 400 or 512,256")
    p.add_argument("--n-samples", type=positive_int, default=d.n_samples,
                   help="samples per evaluation, against as many test images (capped at the test split)")
    p.add_argument("--k", type=positive_int, default=d.k, help="neighbour of the precision/recall balls")
    p.add_argument("--evidence-samples", type=int, default=d.evidence_samples,
                   help="K importance samples for the VAE's log p(x) (0: none)")
    p.add_argument("--evidence-limit", type=positive_int, default=d.evidence_limit, help="test images in log p(x)")
    p.add_argument("--cache-dir", default=None, help="folder of cached feature classifiers")
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a comparison already in --out")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.set_defaults(func=cmd_compare_families)


def cmd_compare_families(args) -> int:
    config = CompareConfig(args.data, args.data_dir, args.split_seed, args.seconds, args.seeds, args.checkpoints,
                           tuple(args.families), args.latent_dim, tuple(args.hidden), args.n_samples, args.k,
                           args.evidence_samples, args.evidence_limit, args.cache_dir, args.device)
    result = compare_families(config, args.out, not args.no_download, args.overwrite)
    print("\n".join(table_lines(result)))
    print(f"wrote {Path(args.out) / 'compare.md'}, compare.json and figures/ ({result['total_seconds']:.0f} s in all)")
    return 0
