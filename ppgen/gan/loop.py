"""The adversarial loop and GAN runs: :class:`LoopConfig` and :func:`adversarial_loop`
(Algorithm 1 of Goodfellow et al. 2014 with k discriminator steps per generator step), the image
run :func:`train_gan` / :func:`load_gan` behind ``ppgen train gan``, and :func:`train_toy_gan`.

Three stabilizers, each a :class:`LoopConfig` field (and a ``ppgen train gan`` flag):
spectral normalization of every discriminator layer (Miyato et al. 2018,
:func:`ppgen.gan.networks.spectral_normalize`), the R1 zero-centred gradient penalty on real data
(Mescheder et al. 2018, :func:`ppgen.gan.objectives.r1_penalty`), and an exponential moving
average of the generator's weights (:class:`ppgen.ema.EMA`; Yazici et al. 2019), which then
makes the figures, the checkpoint's sampling generator, ``load_gan``, ``ppgen sample`` and
``ppgen metrics``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from ppgen.data import DataConfig, binarize, toy_sample
from ppgen.devices import adam, distributed, resolve_device
from ppgen.ema import EMA
from ppgen.gan.networks import Discriminator, Generator, make_discriminator, make_generator, spectral_normalize
from ppgen.gan.objectives import get_loss, r1_penalty
from ppgen.plots import save_image_grid
from ppgen.loop_state import LoopState, check_finite, interrupt
from ppgen.runs import Run, StopSignal, check_resumable, config_from_dict, config_to_dict, seed_everything, seeded

__all__ = ["LoopConfig", "GANConfig", "GANResult", "adversarial_loop", "train_gan", "load_gan", "train_toy_gan"]


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
    # Stabilizers. Defaults by measurement (README, "GAN stabilizers"): on Fashion-MNIST the plain
    # loop's classifier Frechet distance rose from 74.5 (epoch 3) to 105.8 (epoch 10); R1 with
    # gamma 1 and the EMA gave 12.8 at epoch 10 for 1.3x the step time, SN and the EMA 13.2 for 1.6x.
    spectral_norm: bool = False  # spectral normalization of every discriminator layer (Miyato et al. 2018)
    r1_gamma: float = 1.0  # gamma of the R1 penalty gamma/2 E||grad_x d(x)||^2 on real data (Mescheder et al. 2018); 0: off
    ema_decay: float = 0.999  # decay d of the generator's weight average used for sampling (ppgen.ema.EMA); 0: off
    ema_warmup: bool = True  # EMA decay min(d, (1 + t) / (10 + t)) at generator step t instead of d

    def __post_init__(self) -> None:
        get_loss(self.loss)
        for name in ("d_steps", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not (math.isfinite(self.r1_gamma) and self.r1_gamma >= 0):
            raise ValueError(f"r1_gamma must be a finite number >= 0 (0 turns R1 off), got {self.r1_gamma}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (e.g. 0.999; 0 turns the EMA off), got {self.ema_decay}")


#: The stabilizer settings of runs made before the stabilizers existed (their config.json lacks them).
_PLAIN = {"spectral_norm": False, "r1_gamma": 0.0, "ema_decay": 0.0, "ema_warmup": True}


class GANResult(NamedTuple):
    """What :func:`adversarial_loop` returns: one dict per epoch (loss_D, loss_G, D_real, D_fake,
    r1 when the penalty is on...), and the generator's moving average when ``ema_decay > 0``."""

    history: list
    ema: Optional[Generator] = None  # the EMA generator (eval mode) for sampling, or None

    def sampler(self, generator: Generator) -> Generator:
        """The generator to sample from: the EMA when there is one, else ``generator``."""
        return self.ema if self.ema is not None else generator


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

    Each epoch visits ``train`` in a permutation seeded by ``(seed, epoch)``, in batches of
    ``config.batch_size`` (the last partial batch is dropped); the noise ``z`` of every step is
    drawn for the whole batch from a generator of its own (seeded by ``seed``, checkpointed).
    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes its rows of every batch and of its
    ``z`` (``transform``, e.g. dynamic binarization, is applied to the whole batch first), and
    gradients and logged values are averaged over processes before both the discriminator and
    the generator step, so N processes follow the single process up to float rounding. Every
    process must build the networks from the same seed (:func:`train_gan` does); only rank 0
    writes ``run``, calls ``on_epoch`` and prints progress.

    With a ``run``: logs one metrics line per epoch, checkpoints after each epoch, and resumes from
    the checkpoint when ``run.resume``. SIGINT/SIGTERM checkpoints before the next batch and raises
    :class:`ppgen.runs.Interrupted`; resuming continues that epoch with the same data order and
    noise (the weights follow the uninterrupted run; that epoch's logged averages cover the
    resumed part). ``on_epoch(epoch, G(fixed_noise))`` is called after each epoch (the
    fixed-noise sample grid). Losses are summed on the device and read at the end of each epoch
    (no host sync per step): a non-finite loss stops the run there (or at an interrupt) with a
    ``FloatingPointError`` naming the last good checkpoint, and is never checkpointed.

    Stabilizers (module docstring): ``config.spectral_norm`` puts :func:`spectral_normalize` on
    ``discriminator`` in place (its power-iteration vectors seeded by ``seed``);
    ``config.r1_gamma > 0`` adds :func:`ppgen.gan.objectives.r1_penalty` on each real batch to
    ``loss_D`` (logged as ``r1``); ``config.ema_decay > 0`` updates an :class:`ppgen.ema.EMA` of
    ``generator`` after every generator step, checkpoints it, passes its ``G(fixed_noise)`` to
    ``on_epoch`` and returns it as ``GANResult.ema``.
    """
    if train.ndim != 2 or train.shape[1] != generator.x_dim or discriminator.x_dim != generator.x_dim:
        raise ValueError(
            f"data of shape {tuple(train.shape)} does not match the networks: generator makes "
            f"(batch, {generator.x_dim}), discriminator takes (batch, {discriminator.x_dim})"
        )
    if not torch.isfinite(train).all():
        raise ValueError("training data contains NaN or Inf values")
    n, bs = train.shape[0], config.batch_size
    if bs > n:
        raise ValueError(f"batch_size {bs} is larger than the training set ({n} datapoints); "
                         f"use --batch-size {n} or smaller")
    loss = get_loss(config.loss)
    job = distributed(resolve_device(config.device))
    device, local = job.place(resolve_device(config.device)), job.shard(bs)
    lo, writer = job.rank * local, run if job.rank == 0 else None  # our rows of each batch; who writes
    generator.to(device), discriminator.to(device)
    if config.spectral_norm:
        with seeded(config.seed + _NOISE_SEED, device):  # u of the power iteration: the same in every process
            spectral_normalize(discriminator)
    ema = EMA(generator, config.ema_decay, config.ema_warmup) if config.ema_decay > 0 else None
    g_params, d_params = list(generator.parameters()), list(discriminator.parameters())
    opt_g = adam(g_params, config.lr_g, betas=(config.beta1, config.beta2))
    opt_d = adam(d_params, config.lr_d, betas=(config.beta1, config.beta2))
    fixed = torch.randn(64, generator.z_dim, generator=torch.Generator().manual_seed(config.seed)).to(device)
    noise = torch.Generator(device=device).manual_seed(config.seed + _NOISE_SEED)
    order = torch.Generator()
    parts = {"generator": generator, "discriminator": discriminator, "opt_g": opt_g, "opt_d": opt_d}
    saved = LoopState(parts, noise, ema)  # what a checkpoint holds
    start, first, history = saved.resume(run, job.rank)
    train = train.to(device)

    def z() -> torch.Tensor:  # the whole batch's noise, then our rows
        return torch.randn(bs, generator.z_dim, generator=noise, device=device)[lo : lo + local]

    with StopSignal() as stop:
        for epoch in range(start + 1, config.epochs + 1):
            # sums: loss_D, D_real, D_fake, r1 over discriminator steps, loss_G over generator steps
            t0, sums, counts = time.perf_counter(), torch.zeros(5, device=device), {"d": 0, "g": 0}
            order.manual_seed(config.seed * 100_003 + epoch)
            perm = torch.randperm(n, generator=order).to(device)
            for i in range(first, n // bs):
                requested = job.agree_stop(stop.requested, device)
                if requested:
                    _check_finite(sums, epoch, run, job.rank)
                    interrupt(requested, f"at epoch {epoch}, batch {i}", writer,
                              lambda: saved.state(epoch - 1, batch=i))
                rows = perm[i * bs : (i + 1) * bs]
                x = transform(train[rows])[lo : lo + local] if transform is not None else train[rows[lo : lo + local]]
                # Discriminator step: descend loss_D (+ R1 on the real batch) on a real batch and a
                # detached fake batch.
                if config.r1_gamma > 0:
                    x = x.detach().requires_grad_(True)
                real, fake = discriminator(x), discriminator(generator(z()).detach())
                loss_d = loss.d_loss(real, fake)
                r1 = r1_penalty(real, x, config.r1_gamma) if config.r1_gamma > 0 else loss_d.new_zeros(())
                opt_d.zero_grad(set_to_none=True)
                (loss_d + r1).backward()
                stats = job.average(d_params, loss_d.detach(), torch.sigmoid(real.detach()).mean(),
                                    torch.sigmoid(fake.detach()).mean(), r1.detach())  # whole-batch means
                opt_d.step()
                sums[:4] += torch.stack(stats)
                counts["d"] += 1
                if (i + 1) % config.d_steps:
                    continue
                # Generator step after every k discriminator steps: descend loss_G through D (whose
                # own gradients would be thrown away, so they are not computed).
                try:
                    loss_g = loss.g_loss(discriminator.requires_grad_(False)(generator(z())))
                    opt_g.zero_grad(set_to_none=True)
                    loss_g.backward()
                finally:
                    discriminator.requires_grad_(True)
                (loss_g,) = job.average(g_params, loss_g.detach())
                opt_g.step()
                if ema is not None:
                    ema.update(generator)
                sums[4:] += loss_g
                counts["g"] += 1
            first = 0
            d, real, fake, r1, g = _check_finite(sums, epoch, run, job.rank)  # the one host sync of an epoch
            nd, ng = max(counts["d"], 1), max(counts["g"], 1)
            record = {"epoch": epoch, "loss_D": d / nd, "loss_G": g / ng, "D_real": real / nd, "D_fake": fake / nd,
                      **({"r1": r1 / nd} if config.r1_gamma > 0 else {}),
                      "g_steps": counts["g"], "seconds": time.perf_counter() - t0}
            history.append(record)
            if writer is not None:
                writer.log(record)
                writer.save_checkpoint(saved.state(epoch))
            if on_epoch is not None and job.rank == 0:
                with torch.no_grad():
                    on_epoch(epoch, (ema.averaged() if ema is not None else generator)(fixed))
            if progress and job.rank == 0:
                print(f"epoch {epoch}: loss_D {record['loss_D']:.3f} loss_G {record['loss_G']:.3f} "
                      f"D(x) {record['D_real']:.3f} D(G(z)) {record['D_fake']:.3f} ({record['seconds']:.1f} s)")
    return GANResult(history, ema.averaged() if ema is not None else None)


_NOISE_SEED = 1 << 32  # offset of the noise stream z from the seed of the weights and the fixed grid


def _check_finite(sums: torch.Tensor, epoch: int, run: Optional[Run], rank: int) -> list[float]:
    """The epoch's running sums (loss_D, D_real, D_fake, r1, loss_G) as floats, or a
    ``FloatingPointError`` if one is NaN or infinite (:func:`ppgen.loop_state.check_finite`)."""
    return check_finite(sums, ("loss_D", "D_real", "D_fake", "r1", "loss_G"), epoch, run, rank,
                        "Lower the learning rates or try --loss ns or hinge.")


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
              progress: bool = True, download: bool = True) -> tuple[Generator, GANResult, Optional[Run]]:
    """Train an image GAN as ``config`` says into run directory ``out``; writes
    figures/epoch-NNN.png (fixed noise) and figures/samples.png. Under ``torchrun`` only rank 0
    writes ``out``; the other processes get ``None`` for the run. Returns the generator to sample
    from (the EMA generator when ``config.loop.ema_decay > 0``, as :func:`load_gan` does)."""
    rank = distributed(resolve_device(config.loop.device)).rank
    run = Run(out, resume=resume, overwrite=overwrite) if rank == 0 or resume else None
    if resume:
        check_resumable(_stored_config(run), config_to_dict(config), may_change={"loop.epochs", "loop.device"})
    if rank == 0:
        run.save_config(config_to_dict(config))
    data = config.data.load(download)
    seed_everything(config.loop.seed)  # the same initial weights in every process
    generator, discriminator = config.build(data.dim, data.image_shape)
    shape = data.image_shape

    def grid(epoch: int, x: torch.Tensor) -> None:
        save_image_grid(x, shape, run.figures / f"epoch-{epoch:03d}.png")
        save_image_grid(x, shape, run.figures / "samples.png")

    result = adversarial_loop(generator, discriminator, data.train, config.loop, run,
                              binarize if data.dynamic else None, grid, progress)
    return result.sampler(generator), result, run if rank == 0 else None


def _stored_config(run: Run) -> dict:
    """The run's config.json, with the stabilizers off where a run made before they existed lacks them."""
    stored = run.load_config()
    if isinstance(stored.get("loop"), dict):
        stored["loop"] = {**_PLAIN, **stored["loop"]}
    return stored


def load_gan(path: Union[str, Path], device: str = "cpu", averaged: bool = True) -> tuple[Generator, GANConfig]:
    """Rebuild the generator of run directory ``path`` (weights loaded with ``weights_only=True``):
    the EMA generator when the run kept one (``loop.ema_decay > 0``) and ``averaged``, else the
    trained generator."""
    run = Run(path, resume=True)
    config = config_from_dict(GANConfig, _stored_config(run))
    shape = config.data.image_shape
    generator = make_generator(config.latent_dim, math.prod(shape), config.hidden, config.arch, shape)
    ckpt = run.load_checkpoint(map_location=resolve_device(device))
    if averaged and config.loop.ema_decay > 0:
        if "ema" not in ckpt:
            raise ValueError(f"{path} says loop.ema_decay={config.loop.ema_decay} but its checkpoint has no EMA "
                             "generator; load it with averaged=False for the trained generator")
        generator.load_state_dict(ckpt["ema"]["module"])
    else:
        generator.load_state_dict(ckpt["generator"])
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
