"""Whole training runs of the conditional VAE (with its regression baseline) and of M2, as
``ppgen train cvae`` and ``ppgen train m2`` run them: data + model + SVI loop + run directory.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple, Union

import torch

from ppgen.data import DataConfig, Dataset, binarize
from ppgen.infer.evidence import log_evidence
from ppgen.infer.svi import SVIConfig, SVIResult, train_svi
from ppgen.models.cvae import CVAE, CVAEConfig, RegressionBaseline, baseline_nll
from ppgen.models.m2 import DISCRETE_ESTIMATORS, M2, M2Config, cluster_accuracy
from ppgen.plots import save_image_grid
from ppgen.devices import resolve_device
from ppgen.runs import Run, config_to_dict, seed_everything

__all__ = ["CVAERunConfig", "CVAERun", "train_cvae", "train_baseline", "M2RunConfig", "M2Run", "train_m2"]


@dataclasses.dataclass(frozen=True)
class CVAERunConfig:
    """Everything ``ppgen train cvae`` needs; stored as the run's config.json."""

    data: DataConfig = DataConfig()  # dataset (binarized: the CVAE's likelihood is Bernoulli)
    model: CVAEConfig = CVAEConfig()  # CVAE architecture and observed quadrants
    svi: SVIConfig = SVIConfig(epochs=30, batch_size=64)  # loop settings, shared by the baseline
    eval_samples: int = 1000  # K importance samples per test image for the CVAE's log p(y | x)
    family: str = "cvae"  # model family, for reports

    def __post_init__(self) -> None:
        if self.data.binarization == "none":
            raise ValueError("the CVAE has a Bernoulli likelihood: use a binarization ('dynamic' or 'static'), not 'none'")
        if isinstance(self.eval_samples, bool) or not isinstance(self.eval_samples, int) or self.eval_samples < 1:
            raise ValueError(f"eval_samples must be a positive integer, got {self.eval_samples!r}")


class CVAERun(NamedTuple):
    """A trained CVAE and baseline with their conditional NLLs (nats per test image)."""

    cvae: CVAE
    baseline: RegressionBaseline
    data: Dataset
    result: SVIResult
    metrics: dict
    run: Run


def train_baseline(baseline: RegressionBaseline, data: Dataset, config: SVIConfig, dynamic: bool) -> list[float]:
    """Fit the regression baseline by Adam on pixel cross-entropy; returns the mean training
    loss (nats per image) of every epoch. Same epochs, batch size and learning rate as the CVAE."""
    device = next(baseline.parameters()).device
    train = data.train.to(device)
    optimizer = torch.optim.Adam(baseline.parameters(), lr=config.lr)
    batches, losses = len(train) // config.batch_size, []
    for _ in range(config.epochs):
        perm, total = torch.randperm(len(train), device=device), 0.0
        for i in range(batches):
            x = train[perm[i * config.batch_size : (i + 1) * config.batch_size]]
            loss = baseline_nll(baseline, binarize(x) if dynamic else x).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        losses.append(total / batches)
    return losses


def train_cvae(config: CVAERunConfig, out: Union[str, Path], overwrite: bool = False, progress: bool = True,
               download: bool = True) -> CVAERun:
    """Train the CVAE by SVI and its regression baseline, then score both on the test split:
    conditional NLL ``-log p(y | x)`` per image (importance-sampled for the CVAE, K =
    ``eval_samples``; ``cvae_nll_stderr`` is its Monte Carlo error, ``baseline_nll_stderr`` the
    spread over images, ``nll_difference`` the paired per-image difference). Writes config.json, metrics.jsonl, checkpoint.pt, cvae.json and
    figures/completions.png (rows: truth, input, baseline, three CVAE draws)."""
    run = Run(out, overwrite=overwrite)
    run.save_config(config_to_dict(config))
    data = config.data.load(download)
    from ppgen.data import check_binary

    check_binary(data.val, "validation data")
    device = resolve_device(config.svi.device)
    seed_everything(config.svi.seed)
    cvae = config.model.build(data.image_shape).to(device)
    baseline = RegressionBaseline(cvae, config.model.hidden).to(device)
    result = train_svi(cvae.model, cvae.guide, data.train, data.val, config.svi, run=run,
                       transform=binarize if data.dynamic else None, progress=progress)
    seed_everything(config.svi.seed)
    base_losses = train_baseline(baseline, data, config.svi, data.dynamic)
    test = data.test.to(device)
    with torch.no_grad():
        ev = log_evidence(cvae.model, cvae.guide, test, config.eval_samples, seed=config.svi.seed)
        base = baseline_nll(baseline, test)
    metrics = {
        "cvae_nll": -float(ev.log_px.mean()),
        "cvae_nll_stderr": float(ev.stderr.pow(2).sum().sqrt() / len(test)),
        "cvae_elbo_nll": -float(ev.elbo.mean()),
        "baseline_nll": float(base.mean()),
        "baseline_nll_stderr": float(base.std() / math.sqrt(len(test))),
        # Paired per-image difference (CVAE - baseline) and its standard error across test images.
        "nll_difference": float((-ev.log_px - base.double().cpu()).mean()),
        "nll_difference_stderr": float((-ev.log_px - base.double().cpu()).std() / math.sqrt(len(test))),
        "baseline_train_loss": base_losses[-1],
        "eval_samples": config.eval_samples,
        "test_images": len(test),
        "pixels_completed": len(cvae.y_index),
    }
    run.log({"epoch": config.svi.epochs, **metrics})
    (run.path / "cvae.json").write_text(__import__("json").dumps(metrics, indent=2))
    torch.save({"baseline": baseline.state_dict()}, run.path / "baseline.pt")
    n = 8
    torch.manual_seed(0)
    x = test[:n]
    masked = x.clone()
    masked[:, cvae.y_index] = 0.5
    rows = [x, masked, baseline.complete(x), *cvae.complete(x, 3)]
    save_image_grid(torch.cat(rows), data.image_shape, run.figures / "completions.png", nrow=n)
    return CVAERun(cvae, baseline, data, result, metrics, run)


@dataclasses.dataclass(frozen=True)
class M2RunConfig:
    """Everything ``ppgen train m2`` needs; stored as the run's config.json."""

    data: DataConfig = DataConfig()  # dataset (binarized)
    model: M2Config = M2Config()  # architecture
    svi: SVIConfig = SVIConfig(estimator="enum")  # loop; estimator "enum" or "score-discrete"
    eval_samples: int = 1000  # K importance samples per test image for log p(x)
    labels_fraction: float = 0.0  # share of training images whose label is used (0: unsupervised)
    family: str = "m2"  # model family, for reports

    def __post_init__(self) -> None:
        if self.svi.estimator not in DISCRETE_ESTIMATORS.values():
            raise ValueError(
                f"M2 trains its class latent by {sorted(DISCRETE_ESTIMATORS.values())}, got estimator {self.svi.estimator!r}"
            )
        if self.data.binarization == "none":
            raise ValueError("M2 has a Bernoulli likelihood: use a binarization ('dynamic' or 'static'), not 'none'")
        if isinstance(self.eval_samples, bool) or not isinstance(self.eval_samples, int) or self.eval_samples < 1:
            raise ValueError(f"eval_samples must be a positive integer, got {self.eval_samples!r}")
        f = self.labels_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise ValueError(f"labels_fraction must be a number in [0, 1], got {f!r}")
        if self.model.alpha > 0 and f == 0:
            raise ValueError(f"alpha={self.model.alpha} weights a classifier term on labelled images, but "
                             "labels_fraction is 0: give labels_fraction > 0, or alpha 0 for unsupervised M2")


def labelled_subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask ``(n,)`` marking ``round(fraction * n)`` rows chosen at random (seeded)."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(fraction * n)]] = True
    return mask


def _binarize_images(batch: dict) -> dict:
    """Dynamic binarization of the images of a dict batch ``{x, y, labelled}``."""
    return {**batch, "x": binarize(batch["x"])}


class M2Run(NamedTuple):
    """A trained M2 model with its test metrics."""

    m2: M2
    data: Dataset
    result: SVIResult
    metrics: dict
    run: Run


def train_m2(config: M2RunConfig, out: Union[str, Path], overwrite: bool = False, progress: bool = True,
             download: bool = True) -> M2Run:
    """Train M2 (unsupervised, or semi-supervised on ``labels_fraction`` of the training labels with
    the classifier term ``alpha``: one dict batch ``{x, y, labelled}``, labelled and unlabelled rows
    mixed), then report test log p(x) (IS, K = ``eval_samples``), the accuracy of
    ``argmax q(y | x)`` against the labels and its cluster accuracy (best class matching). Writes
    config.json, metrics.jsonl, checkpoint.pt, m2.json and figures/samples.png (one class per
    column)."""
    run = Run(out, overwrite=overwrite)
    run.save_config(config_to_dict(config))
    data = config.data.load(download)
    device = resolve_device(config.svi.device)
    seed_everything(config.svi.seed)
    m2 = config.model.build(data.dim).to(device)
    m2.check_data(data.val)
    train, transform = data.train, binarize if data.dynamic else None
    if config.labels_fraction > 0:
        if int(data.train_labels.max()) >= m2.num_classes:
            raise ValueError(f"the labels of {config.data.name} go up to {int(data.train_labels.max())}, but "
                             f"num_classes is {m2.num_classes}: raise num_classes")
        mask = labelled_subset(len(train), config.labels_fraction, config.svi.seed)
        train = {"x": train, "y": data.train_labels, "labelled": mask}
        transform = _binarize_images if data.dynamic else None
    result = train_svi(m2.model, m2.guide, train, data.val, config.svi, run=run, transform=transform,
                       progress=progress)
    test = data.test.to(device)
    ev = log_evidence(m2.model, m2.guide, test, config.eval_samples, seed=config.svi.seed)
    metrics = {
        "test_log_px": float(ev.log_px.mean()),
        "test_log_px_stderr": float(ev.stderr.pow(2).sum().sqrt() / len(test)),
        "test_elbo": float(ev.elbo.mean()),
        "accuracy": float((m2.classify(test).cpu() == data.test_labels.cpu()).double().mean()),
        "cluster_accuracy": cluster_accuracy(m2.classify(test).cpu(), data.test_labels.cpu(), m2.num_classes),
        "eval_samples": config.eval_samples,
        "labels_used": round(config.labels_fraction * len(data.train)),
    }
    run.log({"epoch": config.svi.epochs, **metrics})
    (run.path / "m2.json").write_text(__import__("json").dumps(metrics, indent=2))
    torch.manual_seed(0)
    k = m2.num_classes
    save_image_grid(m2.sample(8 * k), data.image_shape, run.figures / "samples.png", nrow=k)
    return M2Run(m2, data, result, metrics, run)
