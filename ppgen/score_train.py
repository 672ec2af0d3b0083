"""Training and sampling runs for score models: config, loop, checkpoint/resume, figures.

The loop is plain PyTorch: draw a batch, evaluate one objective of :mod:`ppgen.score`, step
Adam; once per epoch log the validation loss and write an atomic checkpoint through
:class:`ppgen.runs.Run` so ``--resume`` continues where the run stopped. Under ``torchrun`` it is
data-parallel (:mod:`ppgen.devices`): each process trains on its shard of every global batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from ppgen.data import DATASETS, TOYS, DataConfig, toy_sample
from ppgen.langevin import annealed_langevin, langevin
from ppgen.plots import save_figure
from ppgen.devices import adam, distributed, resolve_device
from ppgen.runs import (
    Interrupted,
    Run,
    StopSignal,
    check_resumable,
    config_from_dict,
    config_to_dict,
    rng_state,
    seed_everything,
    seeded,
    set_rng_state,
)
from ppgen.score import OBJECTIVES, ScoreNet, UNetScore, geometric_sigmas, ism_loss, ncsn_loss, ssm_loss

__all__ = ["ScoreConfig", "ScoreRun", "train_score", "load_score", "sample_score", "sample_run", "run_samples",
           "plot_toy_field", "write_figures"]


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Everything ``ppgen train score`` needs; stored as the run's config.json."""

    data: str = "8gaussians"  # image dataset (ppgen.data.DATASETS, grey levels) or 2-D toy (TOYS)
    data_dir: Optional[str] = None  # folder with torchvision's dataset folders
    split_seed: int = 0  # train/validation split seed (toys: seed of the drawn points)
    toy_n: int = 20000  # training points drawn from a 2-D toy
    objective: str = "dsm"  # ism | ism-hutchinson | ssm | dsm (noise-conditional, geometric ladder)
    arch: str = "mlp"  # mlp, or unet (images, dsm only)
    hidden: tuple[int, ...] = (128, 128)  # MLP hidden widths
    width: int = 32  # U-Net base channels
    sigma_max: float = 1.0  # largest noise level of the dsm ladder
    sigma_min: float = 0.01  # smallest noise level of the dsm ladder
    n_sigmas: int = 10  # number of levels (1: single-level DSM at sigma_max)
    projections: int = 1  # random projections per point (ssm, ism-hutchinson)
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # points per step
    lr: float = 1e-3  # Adam learning rate
    seed: int = 0  # seed of initialization, batches and noise
    device: str = "cpu"  # cpu or cuda
    langevin_steps: int = 100  # Langevin steps per noise level (noise-free objectives: in total)
    eta: float = 0.1  # Langevin step at the smallest level, in units of sigma_min^2
    family: str = "score"  # model family, for `ppgen sample` and reports

    def __post_init__(self) -> None:
        if self.data not in DATASETS and self.data not in TOYS:
            raise ValueError(f"unknown data {self.data!r}; choose one of {', '.join([*DATASETS, *TOYS])}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        if self.arch not in ("mlp", "unet"):
            raise ValueError(f"arch must be 'mlp' or 'unet', got {self.arch!r}")
        if self.arch == "unet" and (self.objective != "dsm" or self.data in TOYS):
            raise ValueError("arch 'unet' is noise-conditional and takes images: use it with --objective dsm on an image dataset")
        if not 0 < self.sigma_min <= self.sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        for name in ("n_sigmas", "projections", "epochs", "batch_size", "langevin_steps", "toy_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def conditional(self) -> bool:
        return self.objective == "dsm"

    @property
    def sigmas(self) -> torch.Tensor:
        return geometric_sigmas(self.sigma_max, self.sigma_min, self.n_sigmas)

    @property
    def image_shape(self) -> Optional[tuple[int, ...]]:
        return None if self.data in TOYS else DataConfig(self.data).image_shape

    def build(self) -> nn.Module:
        dim = 2 if self.data in TOYS else math.prod(self.image_shape)
        if self.arch == "unet":
            return UNetScore(self.image_shape, self.width)
        return ScoreNet(dim, self.hidden, conditional=self.conditional)

    def loss(self, net: nn.Module, x: torch.Tensor, noise: Optional[dict] = None) -> torch.Tensor:
        """The objective on batch ``x`` (B, D), with the ``noise`` of :meth:`draw_noise` (rows of
        this batch) or, when None, noise drawn from torch's global stream."""
        noise = noise or {}
        if self.objective == "ism":
            return ism_loss(net, x)
        if self.objective == "ism-hutchinson":
            return ism_loss(net, x, "hutchinson", self.projections, noise.get("directions"))
        if self.objective == "ssm":
            return ssm_loss(net, x, self.projections, projections=noise.get("directions"))
        return ncsn_loss(net, x, self.sigmas.to(x.device), noise.get("levels"), noise.get("eps"))

    def draw_noise(self, n: int, dim: int, generator: torch.Generator) -> dict:
        """The noise :meth:`loss` needs for ``n`` datapoints of dimension ``dim``, drawn from
        ``generator`` (on the training device), batch first: ``{"directions": (n, P, dim)}``
        (Gaussian for ssm, Rademacher for ism-hutchinson), ``{"levels": (n,), "eps": (n, dim)}``
        for dsm, nothing for exact ism."""
        device = generator.device
        if self.objective == "ism":
            return {}
        if self.objective in ("ssm", "ism-hutchinson"):
            v = torch.randn(n, self.projections, dim, generator=generator, device=device)
            return {"directions": v.sign() if self.objective == "ism-hutchinson" else v}
        return {"levels": torch.randint(self.n_sigmas, (n,), generator=generator, device=device),
                "eps": torch.randn(n, dim, generator=generator, device=device)}


class ScoreRun(NamedTuple):
    """A trained score network with its config, run directory, data and per-epoch history."""

    net: nn.Module
    config: ScoreConfig
    run: Optional[Run]  # None in a torchrun process other than rank 0
    train: torch.Tensor  # (N, D) training data
    history: list


def load_data(config: ScoreConfig, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` tensors ``(N, D)``: toy draws, or image grey levels in [0, 1]."""
    if config.data in TOYS:
        return toy_sample(config.data, config.toy_n, config.split_seed), toy_sample(config.data, 2000, config.split_seed + 1)
    data = DataConfig(config.data, "none", config.data_dir, config.split_seed).load(download)
    return data.train, data.val


_RESUMABLE = {"epochs", "device", "langevin_steps", "eta"}
_NOISE_SEED = 1 << 32  # offset of the objective's noise stream from the seed of the weights


def train_score(
    config: ScoreConfig,
    out: Union[str, Path],
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    download: bool = True,
    figures: bool = True,
) -> ScoreRun:
    """Train ``config.build()`` on ``config.objective``, writing run directory ``out``
    (config.json, metrics.jsonl with one line per epoch, checkpoint.pt, figures/samples.png).

    Each epoch visits the training set in a permutation seeded by ``(seed, epoch)`` in batches of
    ``config.batch_size`` (the last partial batch is dropped). The objective's noise comes from
    a generator of its own, drawn for the whole batch, so the weights do not depend on how many
    processes share it: under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes its rows of
    every batch and its noise, gradients and losses are averaged before each Adam step, and only
    rank 0 validates, writes ``out`` and shows progress (other ranks' ``ScoreRun.run`` is None).

    The training loss is summed on the device and read once per epoch: a NaN or infinite loss
    stops the run at the end of that epoch (or at an interrupt) with a ``FloatingPointError``
    naming the last good checkpoint, and is never checkpointed. SIGINT/SIGTERM checkpoints
    before the next batch and raises :class:`ppgen.runs.Interrupted`; ``resume`` continues that
    epoch with the same data order and noise."""
    job = distributed(resolve_device(config.device))
    rank, device = job.rank, job.place(resolve_device(config.device))
    run = Run(out, resume=resume, overwrite=overwrite) if rank == 0 or resume else None
    if resume:
        check_resumable(run.load_config(), config_to_dict(config), may_change=_RESUMABLE)
    if rank == 0:
        run.save_config(config_to_dict(config))
    train, val = load_data(config, download)
    n, bs = len(train), config.batch_size
    if bs > n:
        raise ValueError(f"batch_size {bs} is larger than the training set ({n} points); use --batch-size {n} or smaller")
    steps, lo_hi = n // bs, {"lo": train.min(0).values, "hi": train.max(0).values}  # lo_hi: the data's box
    local = job.shard(bs)  # this process's rows of every batch: [lo, lo + local)
    lo = rank * local
    seed_everything(config.seed)  # the same initial weights in every process
    net = config.build().to(device)
    params = list(net.parameters())
    opt = adam(params, config.lr)
    noise = torch.Generator(device=device).manual_seed(config.seed + _NOISE_SEED)
    order = torch.Generator()
    start, history, first = 0, [], 0
    if resume and run.checkpoint_path.exists():
        ckpt = run.load_checkpoint(map_location="cpu")
        net.load_state_dict(ckpt["net"])
        opt.load_state_dict(ckpt["optim"])
        set_rng_state(ckpt["rng"])
        if "noise" in ckpt:
            noise.set_state(ckpt["noise"])
        start, first = int(ckpt["epoch"]), int(ckpt.get("batch", 0))
        if rank == 0:
            run.truncate_metrics(lambda r: r.get("epoch", 0) <= start)
        history = [r for r in run.metrics() if r.get("epoch", 0) <= start]
    data, x_val = train.to(device), val[:512].to(device)

    def state(epoch: int, **partial) -> dict:
        return {"net": net.state_dict(), "optim": opt.state_dict(), "epoch": epoch, "rng": rng_state(),
                "noise": noise.get_state(), **lo_hi, **partial}

    def check(total: torch.Tensor, epoch: int) -> float:
        value = float(total)  # the one host sync of an epoch
        if not math.isfinite(value):
            if rank != 0:
                where = "rank 0 names the last good checkpoint"
            elif run.checkpoint_path.exists():
                where = f"the last good checkpoint is {run.checkpoint_path} (end of epoch {epoch - 1})"
            else:
                where = "no checkpoint was written yet"
            raise FloatingPointError(f"score loss became {value} in epoch {epoch}; training stopped and {where}. "
                                     "Lower --lr.")
        return value

    with StopSignal() as stop:
        for epoch in range(start, config.epochs):
            t0, total = time.perf_counter(), torch.zeros((), device=device)
            order.manual_seed(config.seed * 100_003 + epoch + 1)
            perm = torch.randperm(n, generator=order).to(device)
            batches = range(first, steps)
            if progress and rank == 0:
                from tqdm import tqdm

                batches = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False)
            for i in batches:
                requested = job.agree_stop(stop.requested, device)
                if requested:
                    check(total, epoch + 1)
                    if rank != 0:
                        raise Interrupted(f"{requested}: stopped in epoch {epoch + 1}")
                    run.save_checkpoint(state(epoch, batch=i))
                    raise Interrupted(f"{requested}: stopped in epoch {epoch + 1}; checkpoint saved in "
                                      f"{run.path}. Resume with the same command plus --resume.")
                x = data[perm[i * bs + lo : i * bs + lo + local]]
                drawn = config.draw_noise(bs, x.shape[1], noise)  # the whole batch's noise, then our rows
                loss = config.loss(net, x, {k: v[lo : lo + local] for k, v in drawn.items()})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                (loss,) = job.average(params, loss.detach())  # the mean over the whole batch
                opt.step()
                total += loss
            train_loss = check(total, epoch + 1) / (steps - first)
            first = 0
            record = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "train_loss": train_loss}
            if rank == 0:
                with seeded(12345, device):  # the same validation noise every epoch
                    record["val_loss"] = float(config.loss(net, x_val).detach())
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            if rank == 0:
                run.log(record)
                run.save_checkpoint(state(epoch + 1))
    result = ScoreRun(net, config, run if rank == 0 else None, train, history)
    if figures and rank == 0:
        write_figures(result)
    return result


def load_score(path: Union[str, Path], device: str = "cpu") -> tuple[nn.Module, ScoreConfig, dict]:
    """Rebuild the network of run ``path``; returns ``(net, config, checkpoint)``."""
    run = Run(path, resume=True)
    config = config_from_dict(ScoreConfig, run.load_config())
    ckpt = run.load_checkpoint(map_location=resolve_device(device))
    net = config.build().to(device)
    net.load_state_dict(ckpt["net"])
    return net.eval(), config, ckpt


def sample_score(
    net: nn.Module,
    config: ScoreConfig,
    n: int,
    lo: torch.Tensor,
    hi: torch.Tensor,
    steps: Optional[int] = None,
    keep_every: int = 0,
    seed: int = 0,
):
    """Langevin samples from a trained score net, started uniformly in the data's box ``[lo, hi]``.

    Noise-conditional nets use annealed Langevin over ``config.sigmas`` (with a final Tweedie
    denoising step); noise-free ones plain Langevin with step ``eta * sigma_min^2``.

    :param steps: steps per level (default ``config.langevin_steps``).
    :returns: :class:`ppgen.langevin.LangevinResult` ``(x (n, D), trajectory)``.
    """
    device = next(net.parameters()).device
    steps = steps or config.langevin_steps
    g = torch.Generator(device=device).manual_seed(seed)
    lo, hi = lo.to(device), hi.to(device)
    x0 = lo + (hi - lo) * torch.rand(n, lo.shape[0], generator=g, device=device)
    eta = config.eta * config.sigma_min**2
    if config.conditional:
        return annealed_langevin(net, x0, config.sigmas.to(device), eta, steps, denoise=True,
                                 keep_every=keep_every, generator=g)
    return langevin(net, x0, eta, steps, keep_every=keep_every, generator=g)


def plot_toy_field(net: nn.Module, config: ScoreConfig, samples: torch.Tensor, data: torch.Tensor, path: Path) -> Path:
    """Quiver plot of the learned score (at the smallest noise level) over data and Langevin samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = float(data.abs().max()) * 1.15
    g = torch.linspace(-lim, lim, 25)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    device = next(net.parameters()).device
    with torch.no_grad():
        args = (torch.full((len(grid),), config.sigma_min, device=device),) if config.conditional else ()
        s = net(grid.to(device), *args).cpu()
    s = s / (s.norm(dim=-1, keepdim=True) + 1e-8) * s.norm(dim=-1, keepdim=True).clamp(max=1).pow(0.5)
    fig, axes = plt.subplots(1, 2, figsize=(10, 5), dpi=110)
    axes[0].scatter(*data[:2000].T, s=2, alpha=0.3, c="tab:gray")
    axes[0].quiver(grid[:, 0], grid[:, 1], s[:, 0], s[:, 1], color="tab:blue", angles="xy")
    axes[0].set_title(f"learned score ({config.objective}), data in grey")
    axes[1].scatter(*samples[:2000].cpu().T, s=2, alpha=0.4, c="tab:red")
    axes[1].set_title("Langevin samples")
    for ax in axes:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    return save_figure(fig, path)


def write_figures(done: ScoreRun, n: int = 64, path: Optional[Path] = None, steps: Optional[int] = None,
                  seed: int = 0) -> Path:
    """Write a sample figure: a scatter + score field for toys, an image grid otherwise."""
    from ppgen.plots import save_image_grid

    net, config = done.net.eval(), done.config
    lo, hi = done.train.min(0).values, done.train.max(0).values
    if config.image_shape is None:
        x = sample_score(net, config, max(n, 2000), lo, hi, steps, seed=seed).x
        return plot_toy_field(net, config, x, done.train, path or done.run.figures / "samples.png")
    x = sample_score(net, config, n, lo, hi, steps, seed=seed).x.clamp(0, 1)
    return save_image_grid(x.cpu(), config.image_shape, path or done.run.figures / "samples.png")


def sample_run(path: Union[str, Path], out: Union[str, Path], n: int = 64, steps: Optional[int] = None,
               seed: int = 0, device: str = "cpu", download: bool = False) -> Path:
    """Langevin samples from the score run in ``path`` written to the PNG ``out``."""
    net, config, _ = load_score(path, device)
    train = load_data(config, download)[0] if config.image_shape is None else None
    if train is None:
        ckpt = Run(path, resume=True).load_checkpoint()
        train = torch.stack([ckpt["lo"], ckpt["hi"]])  # only its bounding box is used for images
    return write_figures(ScoreRun(net, config, Run(path, resume=True), train, []), n, Path(out), steps, seed)


def run_samples(path: Union[str, Path], n: int, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, DataConfig]:
    """``(samples (n, D) in [0, 1], DataConfig)`` of an image score run, the signature of
    ``ppgen.metrics.RUN_SAMPLERS`` so ``ppgen metrics`` can score it."""
    net, config, ckpt = load_score(path, device)
    if config.image_shape is None:
        raise ValueError(f"{path} is a 2-D toy run; image metrics need an image dataset")
    x = torch.cat([sample_score(net, config, min(500, n - i), ckpt["lo"], ckpt["hi"], seed=seed + i).x
                   for i in range(0, n, 500)])
    return x.clamp(0, 1).cpu(), DataConfig(config.data, "none", config.data_dir, config.split_seed)
