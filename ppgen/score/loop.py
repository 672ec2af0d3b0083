"""Training runs for score models: the loop, checkpoint/resume, loading a run (its config:
:mod:`ppgen.score.config`; samples: :mod:`ppgen.score.samples`).

The loop is plain PyTorch: draw a batch, evaluate one objective of :mod:`ppgen.score.objectives`, step
Adam, update the moving average of the weights; once per epoch log the validation loss and write
an atomic checkpoint through :class:`ppgen.runs.Run` so ``--resume`` continues where the run
stopped. Under ``torchrun`` it is data-parallel (:mod:`ppgen.devices`): each process trains on its
shard of every global batch.

Before training, :func:`ppgen.score.ladder.resolve_ladder` fills the config's data-dependent
fields (the noise ladder, the preconditioning's data moments; the stabilizers of Song & Ermon
2020 that they serve are listed in :mod:`ppgen.score.config`), and the EMA of the weights
(technique 5) is updated after every Adam step, validated and checkpointed with the net.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from ppgen.data import TOYS, DataConfig, toy_sample
from ppgen.ema import EMA
from ppgen.devices import adam, distributed, resolve_device
from ppgen.loop_state import LoopState, check_finite, interrupt
from ppgen.runs import Run, StopSignal, check_resumable, config_from_dict, config_to_dict, seed_everything, seeded
from ppgen.score.config import ScoreConfig, stored_config
from ppgen.score.ladder import ladder_record, resolve_ladder

__all__ = ["ScoreConfig", "ScoreRun", "train_score", "load_score", "load_data", "resolve_ladder", "ladder_record"]


class ScoreRun(NamedTuple):
    """A trained score network with its config, run directory, data and per-epoch history."""

    net: nn.Module
    config: ScoreConfig
    run: Optional[Run]  # None in a torchrun process other than rank 0
    train: torch.Tensor  # (N, D) training data
    history: list
    sampler: Optional[nn.Module] = None  # the net that samples: the EMA of ``net``'s weights, or ``net``


def load_data(config: ScoreConfig, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` tensors ``(N, D)``: toy draws, or image grey levels in [0, 1]."""
    if config.data in TOYS:
        return toy_sample(config.data, config.toy_n, config.split_seed), toy_sample(config.data, 2000, config.split_seed + 1)
    data = DataConfig(config.data, "none", config.data_dir, config.split_seed).load(download)
    return data.train, data.val


#: config fields a resumed run may change
_RESUMABLE = {"epochs", "device", "langevin_steps", "eta", "denoise", "init"}
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
    (config.json with the ladder resolved by :func:`resolve_ladder`, ladder.json, metrics.jsonl
    with one line per epoch, checkpoint.pt, figures/samples.png).

    Each epoch visits the training set in a permutation seeded by ``(seed, epoch)`` in batches of
    ``config.batch_size`` (the last partial batch is dropped). The objective's noise comes from
    a generator of its own, drawn for the whole batch, so the weights do not depend on how many
    processes share it: under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes its rows of
    every batch and its noise, gradients and losses are averaged before each Adam step, and only
    rank 0 validates, writes ``out`` and shows progress (other ranks' ``ScoreRun.run`` is None).
    With ``ema_decay > 0`` the average is updated after every Adam step, validated
    (``val_loss_ema``), checkpointed, and is ``ScoreRun.sampler``.

    The training loss is summed on the device and read once per epoch: a NaN or infinite loss
    stops the run at the end of that epoch (or at an interrupt) with a ``FloatingPointError``
    naming the last good checkpoint, and is never checkpointed. SIGINT/SIGTERM checkpoints
    before the next batch and raises :class:`ppgen.runs.Interrupted`; ``resume`` continues that
    epoch with the same data order and noise."""
    job = distributed(resolve_device(config.device))
    rank, device = job.rank, job.place(resolve_device(config.device))
    run = Run(out, resume=resume, overwrite=overwrite) if rank == 0 or resume else None
    train, val = load_data(config, download)
    asked, (config, ladder) = config, resolve_ladder(config, train)
    if resume:
        stored = stored_config(run)
        if asked.loss_weight is None and config.conditional:  # continue with the weighting the run was trained with
            config = dataclasses.replace(config, loss_weight=stored.get("loss_weight") or config.loss_weight)
        if not stored.get("precondition", True) and config.precondition and config.conditional:
            raise ValueError(f"cannot resume {run.path}: it was trained without preconditioning (precondition False, "
                             "or made before it existed); resume it with ScoreConfig(precondition=False), or start "
                             "afresh with --overwrite")
        check_resumable(stored, config_to_dict(config), may_change=_RESUMABLE)
    if rank == 0:
        run.save_config(config_to_dict(config))
        if ladder is not None:
            (run.path / "ladder.json").write_text(json.dumps(ladder_record(asked, ladder, len(train), config), indent=1))
    n, bs = len(train), config.batch_size
    if bs > n:
        raise ValueError(f"batch_size {bs} is larger than the training set ({n} points); use --batch-size {n} or smaller")
    steps, lo_hi = n // bs, {"lo": train.min(0).values, "hi": train.max(0).values, "mean": train.mean(0)}  # box, mean
    local = job.shard(bs)  # this process's rows of every batch: [lo, lo + local)
    lo = rank * local
    seed_everything(config.seed)  # the same initial weights in every process
    net = config.build().to(device)
    params = list(net.parameters())
    opt = adam(params, config.lr)
    ema = EMA(net, config.ema_decay, config.ema_warmup) if config.ema_decay > 0 else None
    noise = torch.Generator(device=device).manual_seed(config.seed + _NOISE_SEED)
    order = torch.Generator()
    saved = LoopState({"net": net, "optim": opt}, noise, ema)
    start, first, history = saved.resume(run, rank)
    data, x_val = train.to(device), val[:512].to(device)

    def check(total: torch.Tensor, epoch: int) -> float:  # the one host sync of an epoch
        return check_finite(total, ("score loss",), epoch, run, rank, "Lower --lr.")[0]

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
                    interrupt(requested, f"in epoch {epoch + 1}", run if rank == 0 else None,
                              lambda: saved.state(epoch, **lo_hi, batch=i))
                x = data[perm[i * bs + lo : i * bs + lo + local]]
                drawn = config.draw_noise(bs, x.shape[1], noise)  # the whole batch's noise, then our rows
                loss = config.loss(net, x, {k: v[lo : lo + local] for k, v in drawn.items()})
                opt.zero_grad(set_to_none=True)
                loss.backward()
                (loss,) = job.average(params, loss.detach())  # the mean over the whole batch
                opt.step()
                if ema is not None:
                    ema.update(net)
                total += loss
            train_loss = check(total, epoch + 1) / (steps - first)
            first = 0
            record = {"epoch": epoch + 1, "step": (epoch + 1) * steps, "train_loss": train_loss}
            if rank == 0:
                for key, module in (("val_loss", net), ("val_loss_ema", ema and ema.averaged())):
                    with seeded(12345, device):  # the same validation noise every epoch
                        record.update({key: float(config.loss(module, x_val).detach())} if module is not None else {})
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            if rank == 0:
                run.log(record)
                run.save_checkpoint(saved.state(epoch + 1, **lo_hi))
    result = ScoreRun(net, config, run if rank == 0 else None, train, history, ema.averaged() if ema else net)
    if figures and rank == 0:
        from ppgen.score.samples import write_figures

        write_figures(result)
    return result


def load_score(path: Union[str, Path], device: str = "cpu", averaged: bool = True) -> tuple[nn.Module, ScoreConfig, dict]:
    """Rebuild the network of run ``path``, with the EMA weights when the run kept them and
    ``averaged`` (what sampling and metrics use), else the live ones; returns ``(net, config, checkpoint)``."""
    run = Run(path, resume=True)
    config = config_from_dict(ScoreConfig, stored_config(run))
    ckpt = run.load_checkpoint(map_location=resolve_device(device))
    net = config.build().to(device)
    net.load_state_dict(ckpt["ema"]["module"] if averaged and "ema" in ckpt else ckpt["net"])
    return net.eval(), config, ckpt
