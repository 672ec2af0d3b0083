"""Generative adversarial networks: losses by name and one explicit training loop.

The generator is the VAE's decoder class (:class:`ppgen.nets.Decoder`) followed by a sigmoid for
images, the discriminator is the encoder's trunk with a scalar head, so the GAN and the VAE can
be compared on the same networks (Goodfellow et al. 2014, "Generative Adversarial Nets").
Discriminators output logits ``d``; ``D(x) = sigmoid(d)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn import functional as F

from ppgen.data import DataConfig, binarize, toy_sample
from ppgen.nets import Decoder, make_decoder, make_encoder
from ppgen.plots import save_image_grid
from ppgen.devices import resolve_device
from ppgen.runs import (
    Interrupted,
    Run,
    StopSignal,
    check_resumable,
    config_from_dict,
    config_to_dict,
    rng_state,
    seed_everything,
    set_rng_state,
)

__all__ = [
    "LOSSES", "GANLoss", "get_loss", "Generator", "Discriminator", "make_generator", "make_discriminator",
    "LoopConfig", "GANConfig", "GANResult", "adversarial_loop", "train_gan", "load_gan", "train_toy_gan",
    "optimal_discriminator", "optimal_discriminator_gap",
]


# --------------------------------------------------------------------------- losses


class GANLoss(NamedTuple):
    """A named GAN objective on discriminator logits: both losses are minimized.

    ``d_loss(real (B,), fake (B,)) -> scalar`` and ``g_loss(fake (B,)) -> scalar``.
    """

    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]
    doc: str


def _d_bce(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # -log D(x) - log(1 - D(G(z))) with D = sigmoid(d): softplus(-d) = -log sigmoid(d).
    return F.softplus(-real).mean() + F.softplus(fake).mean()


#: name -> GANLoss. minimax and ns: Goodfellow et al. 2014 (eq. 1 and the "maximize log D(G(z))"
#: remark of section 3); hinge: Lim & Ye 2017, Miyato et al. 2018.
LOSSES: dict[str, GANLoss] = {
    "minimax": GANLoss(_d_bce, lambda fake: -F.softplus(fake).mean(),  # G minimizes log(1 - D(G(z)))
                       "original minimax game: G minimizes log(1 - D(G(z)))"),
    "ns": GANLoss(_d_bce, lambda fake: F.softplus(-fake).mean(),  # G minimizes -log D(G(z))
                  "non-saturating: G maximizes log D(G(z))"),
    "hinge": GANLoss(lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
                     lambda fake: -fake.mean(), "hinge loss (Lim & Ye 2017)"),
}


def get_loss(name: str) -> GANLoss:
    """The :class:`GANLoss` registered as ``name`` in :data:`LOSSES`."""
    if name not in LOSSES:
        raise ValueError(f"unknown GAN loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


# --------------------------------------------------------------------------- networks


class Generator(nn.Module):
    """``z (B, z_dim) -> x (B, D)``: a :class:`ppgen.nets.Decoder`, then ``sigmoid`` for images
    (pixel intensities in [0, 1]) or nothing for real-valued (toy) data."""

    def __init__(self, decoder: Decoder, sigmoid: bool = True):
        super().__init__()
        self.decoder, self.sigmoid = decoder, sigmoid
        self.z_dim, self.x_dim = decoder.z_dim, decoder.x_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return torch.sigmoid(out) if self.sigmoid else out

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``n`` samples ``G(z), z ~ N(0, I)``: shape ``(n, D)``."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.z_dim, generator=generator).to(device)
        return self(z)


class Discriminator(nn.Module):
    """``x (B, D) -> logits (B,)``: an encoder trunk, a leaky ReLU and a scalar linear head."""

    def __init__(self, trunk: nn.Module, hidden_dim: int, x_dim: int):
        super().__init__()
        self.trunk, self.x_dim = trunk, x_dim
        self.head = nn.Linear(hidden_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[-1] != self.x_dim:
            raise ValueError(f"discriminator expects inputs of shape (batch, {self.x_dim}), got {tuple(x.shape)}")
        return self.head(F.leaky_relu(self.trunk(x), 0.2)).squeeze(-1)


def make_generator(z_dim: int, x_dim: int, hidden: Sequence[int] = (400,), arch: str = "mlp",
                   image_shape: tuple = (1, 28, 28), sigmoid: bool = True) -> Generator:
    """The decoder of :func:`ppgen.nets.make_decoder` as a generator."""
    return Generator(make_decoder(z_dim, x_dim, hidden, arch, image_shape), sigmoid)


def make_discriminator(x_dim: int, hidden: Sequence[int] = (400,), arch: str = "mlp",
                       image_shape: tuple = (1, 28, 28)) -> Discriminator:
    """The trunk of :func:`ppgen.nets.make_encoder` with a scalar head."""
    trunk = make_encoder(x_dim, 1, hidden, arch, image_shape).trunk
    return Discriminator(trunk, hidden[-1], x_dim)


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Settings of :func:`adversarial_loop` (``ppgen train gan`` flags map 1:1 onto them)."""

    loss: str = "ns"  # objective name in LOSSES
    d_steps: int = 1  # discriminator steps per generator step (k of Goodfellow et al. Alg. 1)
    epochs: int = 10  # passes over the training data (counted in discriminator batches)
    batch_size: int = 64  # datapoints per discriminator step
    lr_g: float = 2e-4  # Adam learning rate of the generator
    lr_d: float = 2e-4  # Adam learning rate of the discriminator
    beta1: float = 0.5  # Adam beta1 (0.5 as in Radford et al. 2016, the usual GAN choice)
    beta2: float = 0.999  # Adam beta2
    seed: int = 0  # seed of initialization, shuffling and noise
    device: str = "cpu"  # "cpu" or "cuda"

    def __post_init__(self) -> None:
        get_loss(self.loss)
        for name in ("d_steps", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")


class GANResult(NamedTuple):
    """What :func:`adversarial_loop` returns: one dict per epoch (loss_D, loss_G, D_real, D_fake...)."""

    history: list


def adversarial_loop(
    generator: Generator,
    discriminator: Discriminator,
    train: torch.Tensor,
    config: LoopConfig,
    run: Optional[Run] = None,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    on_epoch: Optional[Callable[[int, torch.Tensor], None]] = None,
    progress: bool = False,
) -> GANResult:
    """Train ``generator`` against ``discriminator`` on ``train`` (N, D): Algorithm 1 of
    Goodfellow et al. 2014 with ``config.d_steps`` discriminator steps per generator step.

    With a ``run``: logs one metrics line per epoch, checkpoints after each epoch, and resumes from
    the checkpoint when ``run.resume``. SIGINT/SIGTERM checkpoints before the next batch and raises
    :class:`ppgen.runs.Interrupted`; resuming continues that epoch with the same data order (the
    weights follow the uninterrupted run; that epoch's logged averages cover the resumed part). ``on_epoch(epoch, G(fixed_noise))`` is called after each
    epoch (the fixed-noise sample grid). A non-finite loss stops the run with a
    ``FloatingPointError`` naming the last good checkpoint.
    """
    if train.ndim != 2 or train.shape[1] != generator.x_dim or discriminator.x_dim != generator.x_dim:
        raise ValueError(
            f"data of shape {tuple(train.shape)} does not match the networks: generator makes "
            f"(batch, {generator.x_dim}), discriminator takes (batch, {discriminator.x_dim})"
        )
    if not torch.isfinite(train).all():
        raise ValueError("training data contains NaN or Inf values")
    loss = get_loss(config.loss)
    device = resolve_device(config.device)
    generator.to(device), discriminator.to(device)
    opt_g = torch.optim.Adam(generator.parameters(), config.lr_g, betas=(config.beta1, config.beta2))
    opt_d = torch.optim.Adam(discriminator.parameters(), config.lr_d, betas=(config.beta1, config.beta2))
    fixed = torch.randn(64, generator.z_dim, generator=torch.Generator().manual_seed(config.seed)).to(device)
    start, history, order, first = 0, [], None, 0
    if run is not None and run.resume and run.checkpoint_path.exists():
        ckpt = run.load_checkpoint(map_location=device)
        generator.load_state_dict(ckpt["generator"]), discriminator.load_state_dict(ckpt["discriminator"])
        opt_g.load_state_dict(ckpt["opt_g"]), opt_d.load_state_dict(ckpt["opt_d"])
        set_rng_state(ckpt["rng"])
        start = int(ckpt["epoch"])
        if "order" in ckpt:  # stopped by a signal mid-epoch: continue that epoch where it stopped
            order, first = ckpt["order"], int(ckpt["batch"])
        run.truncate_metrics(lambda r: r.get("epoch", 0) <= start)
        history = run.metrics()
    n, bs, step = train.shape[0], config.batch_size, 0

    def state(epoch: int, **partial) -> dict:
        return {"generator": generator.state_dict(), "discriminator": discriminator.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "epoch": epoch, "rng": rng_state(),
                **partial}

    with StopSignal() as stop:
        for epoch in range(start + 1, config.epochs + 1):
            t0, sums = time.perf_counter(), {"loss_D": 0.0, "loss_G": 0.0, "D_real": 0.0, "D_fake": 0.0}
            counts = {"d": 0, "g": 0}
            if order is None:
                order, first = torch.randperm(n), 0
            batches = range(0, n - bs + 1 if n >= bs else 1, bs)
            for i, b in enumerate(batches):
                if i < first:
                    continue
                if stop.requested:
                    if run is None:
                        raise Interrupted(f"{stop.requested}: stopped at epoch {epoch}")
                    run.save_checkpoint(state(epoch - 1, order=order, batch=i))
                    raise Interrupted(f"{stop.requested}: stopped at epoch {epoch}, batch {i}; checkpoint saved "
                                      f"in {run.path}. Resume with the same command plus --resume.")
                x = train[order[b : b + bs]].to(device)
                x = transform(x) if transform is not None else x
                # Discriminator step: descend loss_D on a real batch and a detached fake batch.
                z = torch.randn(x.shape[0], generator.z_dim, device=device)
                real, fake = discriminator(x), discriminator(generator(z).detach())
                loss_d = loss.d_loss(real, fake)
                _check_finite(loss_d, "loss_D", epoch, run)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                sums["loss_D"] += loss_d.item()
                sums["D_real"] += torch.sigmoid(real).mean().item()
                sums["D_fake"] += torch.sigmoid(fake).mean().item()
                counts["d"] += 1
                if (i + 1) % config.d_steps:
                    continue
                # Generator step after every k discriminator steps: descend loss_G through D.
                z = torch.randn(bs, generator.z_dim, device=device)
                loss_g = loss.g_loss(discriminator(generator(z)))
                _check_finite(loss_g, "loss_G", epoch, run)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                sums["loss_G"] += loss_g.item()
                counts["g"] += 1
                step += 1
            order = None
            record = {"epoch": epoch, "loss_D": sums["loss_D"] / max(counts["d"], 1),
                      "loss_G": sums["loss_G"] / max(counts["g"], 1), "D_real": sums["D_real"] / max(counts["d"], 1),
                      "D_fake": sums["D_fake"] / max(counts["d"], 1), "g_steps": counts["g"],
                      "seconds": time.perf_counter() - t0}
            history.append(record)
            if run is not None:
                run.log(record)
                run.save_checkpoint(state(epoch))
            if on_epoch is not None:
                with torch.no_grad():
                    on_epoch(epoch, generator(fixed))
            if progress:
                print(f"epoch {epoch}: loss_D {record['loss_D']:.3f} loss_G {record['loss_G']:.3f} "
                      f"D(x) {record['D_real']:.3f} D(G(z)) {record['D_fake']:.3f} ({record['seconds']:.1f} s)")
    return GANResult(history)


def _check_finite(value: torch.Tensor, name: str, epoch: int, run: Optional[Run]) -> None:
    if torch.isfinite(value):
        return
    if run is not None and run.checkpoint_path.exists():
        where = f"the last good checkpoint is {run.checkpoint_path} (end of epoch {epoch - 1})"
    else:
        where = "no checkpoint was written yet"
    raise FloatingPointError(
        f"{name} became {value.item()} in epoch {epoch}; training stopped and {where}. "
        "Lower the learning rates or try --loss ns or hinge."
    )


# --------------------------------------------------------------------------- image runs


@dataclasses.dataclass(frozen=True)
class GANConfig:
    """Everything ``ppgen train gan`` needs; stored as the run's config.json."""

    data: DataConfig = DataConfig(binarization="none")  # dataset (grey levels by default)
    latent_dim: int = 20  # dimension of the generator's noise z
    hidden: tuple[int, ...] = (400,)  # hidden widths of generator and discriminator
    arch: str = "mlp"  # "mlp" or "conv"
    loop: LoopConfig = LoopConfig()  # loss, steps, optimizers, seed, device
    family: str = "gan"  # model family, for `ppgen sample` / `ppgen metrics`

    def build(self, x_dim: int, image_shape: tuple) -> tuple[Generator, Discriminator]:
        return (make_generator(self.latent_dim, x_dim, self.hidden, self.arch, image_shape),
                make_discriminator(x_dim, self.hidden, self.arch, image_shape))


def train_gan(config: GANConfig, out: Union[str, Path], resume: bool = False, overwrite: bool = False,
              progress: bool = True, download: bool = True) -> tuple[Generator, GANResult, Run]:
    """Train an image GAN as ``config`` says into run directory ``out``; writes
    figures/epoch-NNN.png (fixed noise) and figures/samples.png."""
    run = Run(out, resume=resume, overwrite=overwrite)
    if resume:
        check_resumable(run.load_config(), config_to_dict(config), may_change={"loop.epochs", "loop.device"})
    run.save_config(config_to_dict(config))
    data = config.data.load(download)
    seed_everything(config.loop.seed)
    generator, discriminator = config.build(data.dim, data.image_shape)
    shape = data.image_shape

    def grid(epoch: int, x: torch.Tensor) -> None:
        save_image_grid(x, shape, run.figures / f"epoch-{epoch:03d}.png")
        save_image_grid(x, shape, run.figures / "samples.png")

    result = adversarial_loop(generator, discriminator, data.train, config.loop, run,
                              binarize if data.dynamic else None, grid, progress)
    return generator, result, run


def load_gan(path: Union[str, Path], device: str = "cpu") -> tuple[Generator, GANConfig]:
    """Rebuild the generator of run directory ``path`` (weights loaded with ``weights_only=True``)."""
    run = Run(path, resume=True)
    config = config_from_dict(GANConfig, run.load_config())
    shape = config.data.image_shape
    generator = make_generator(config.latent_dim, math.prod(shape), config.hidden, config.arch, shape)
    generator.load_state_dict(run.load_checkpoint(map_location=resolve_device(device))["generator"])
    return generator.to(device).eval(), config


# --------------------------------------------------------------------------- 2-D toys


def train_toy_gan(toy: str = "8gaussians", n: int = 10_000, config: LoopConfig = LoopConfig(),
                  latent_dim: int = 2, hidden: Sequence[int] = (128, 128)) -> tuple[Generator, Discriminator, GANResult]:
    """An MLP GAN on a 2-D toy from :func:`ppgen.data.toy_sample` (``n`` points)."""
    seed_everything(config.seed)
    data = toy_sample(toy, n, seed=config.seed)
    generator = make_generator(latent_dim, 2, hidden, sigmoid=False)
    discriminator = make_discriminator(2, hidden)
    return generator, discriminator, adversarial_loop(generator, discriminator, data, config)


# --------------------------------------------------------------------------- theory check


def optimal_discriminator(log_p_data: torch.Tensor, log_p_g: torch.Tensor) -> torch.Tensor:
    """``D*(x) = p_data(x) / (p_data(x) + p_g(x)) = sigmoid(log p_data - log p_g)``
    (Goodfellow et al. 2014, Proposition 1), from log densities of shape ``(B,)``."""
    if log_p_data.shape != log_p_g.shape:
        raise ValueError(f"log densities must match in shape, got {tuple(log_p_data.shape)} and {tuple(log_p_g.shape)}")
    return torch.sigmoid(log_p_data - log_p_g)


@torch.no_grad()
def optimal_discriminator_gap(discriminator: nn.Module, x: torch.Tensor, log_p_data: torch.Tensor,
                              log_p_g: torch.Tensor) -> float:
    """Mean ``|D(x) - D*(x)|`` over points ``x`` (B, D), with ``D = sigmoid(logits)`` and the known
    log densities ``log_p_data``, ``log_p_g`` (B,) of the data and the (fixed) generator."""
    d = torch.sigmoid(discriminator(x))
    if d.shape != log_p_data.shape:
        raise ValueError(f"discriminator gives shape {tuple(d.shape)} but densities have {tuple(log_p_data.shape)}")
    return float((d - optimal_discriminator(log_p_data, log_p_g)).abs().mean())
