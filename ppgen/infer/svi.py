"""The SVI training loop: any Pyro model/guide pair with a plate over datapoints.

The data is one tensor ``x`` (``model(x)``), a tuple of tensors aligned on dim 0 (``model(x, y)``)
or a dict (``model(**batch)``); every aligned tensor is cut into the same minibatches of ``B``
rows (:func:`ppgen.infer.batches.as_batch`). The plate that holds the datapoints is found once,
before the first step (:func:`ppgen.infer.traces.find_data_plate`: the one named ``data_plate``,
default ``"data"``, else the single plate of size ``B``; none or several is an error). The loop
scales every site inside that plate by ``N / B`` so the loss is an unbiased estimate of the
full-dataset negative ELBO (global latents are counted once), and reports the ELBO per datapoint
in nats. Validation runs the networks in eval mode (:func:`ppgen.infer.networks.eval_mode`).

No host sync per step: each step (:class:`ppgen.infer.svi_step.SVIStep`) leaves its loss and
gradient check on the device and skips a non-finite update there; the loop reads an epoch's
records once, at its end (or when it checkpoints an interrupt), sums the losses of the applied
updates and applies ``on_nonfinite``. Under "stop", the first non-finite step also halts every
later update of the epoch on the device, so the parameters are those of the last good step when
the error is raised, as if the loop had stopped there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple, Optional

import pyro
import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from ppgen.devices import distributed, resolve_device
from ppgen.infer.batches import as_batch
from ppgen.infer.estimators import get_estimator
from ppgen.infer.networks import eval_mode
from ppgen.infer.svi_step import DataScale, make_svi_step, nonfinite_parameter, record_problem
from ppgen.infer.traces import DATA
from ppgen.runs import (
    Interrupted,
    Run,
    StopSignal,
    rng_state,
    seed_everything,
    seeded,
    set_rng_state,
)

__all__ = ["SVIConfig", "SVIResult", "DataScale", "train_svi", "make_svi_step", "evaluate_elbo", "load_params"]
# DataScale and make_svi_step live in ppgen.infer.svi_step (the step), re-exported here.


@dataclasses.dataclass(frozen=True)
class SVIConfig:
    """Settings of the SVI loop."""

    estimator: str = "reparam"  # gradient estimator name (ppgen.infer.estimators.ESTIMATORS)
    particles: int = 1  # samples per gradient estimate, vectorized
    epochs: int = 10  # passes over the training data
    batch_size: int = 128  # datapoints per step; the last partial batch is dropped
    lr: float = 1e-3  # Adam learning rate
    seed: int = 0  # seeds Python, NumPy, torch and Pyro
    device: str = "cpu"  # "cpu" or "cuda"
    on_nonfinite: str = "stop"  # NaN/Inf loss or gradient: "stop" the run, or "skip" that update
    keep_checkpoints: bool = False  # also keep checkpoints/epoch-NNN.pt for every epoch
    compile: bool = False  # torch.compile(fullgraph=True) the step's loss where it can (else eager, one warning)

    def __post_init__(self) -> None:
        get_estimator(self.estimator)
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        for name in ("particles", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be True or False, got {self.compile!r}")


class SVIResult(NamedTuple):
    """What :func:`train_svi` returns: one metrics dict per epoch, and the final validation ELBO."""

    history: list[dict]
    val_elbo: Optional[float]


@torch.no_grad()
def evaluate_elbo(
    model: Callable,
    guide: Callable,
    data,
    batch_size: int = 1000,
    num_particles: int = 1,
    seed: int = 0,
) -> float:
    """Mean ELBO per datapoint (nats) of ``data``, estimated with ``num_particles``
    reparameterized samples per datapoint under a fixed seed, leaving the caller's random state
    untouched. Networks run in eval mode (:func:`ppgen.infer.networks.eval_mode`; BatchNorm's
    running statistics, no dropout) and get their previous modes back afterwards.

    :param data: a tensor ``(N, ...)``, a tuple of model arguments aligned on dim 0, or a dict
        of keyword arguments (:func:`ppgen.infer.batches.as_batch`); cut into chunks of
        ``batch_size`` rows, every aligned tensor alike.
    """
    batch = as_batch(data, "data", model)
    elbo = Trace_ELBO(num_particles=num_particles)
    total = 0.0
    with seeded(seed, batch.device), eval_mode(model, guide):
        for i in range(0, batch.size, batch_size):
            chunk = batch.rows(slice(i, i + batch_size))
            total += -elbo.loss(model, guide, *chunk.args, **chunk.kwargs)
    return total / batch.size


def _state(optimizer: torch.optim.Optimizer, guide: Callable, epoch: int, step: int, **partial_epoch) -> dict:
    store = pyro.get_param_store()
    state = {
        **partial_epoch,
        "params": {k: store._params[k].detach().clone() for k in store.keys()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "rng": rng_state(),
    }
    if hasattr(guide, "training_state"):  # state a guide transform keeps outside the param store
        state["guide"] = guide.training_state()
    return state


def load_params(params: dict) -> None:
    """Copy saved unconstrained parameter values into Pyro's param store, in place (so nn.Module
    parameters and optimizer references stay the same objects)."""
    store = pyro.get_param_store()
    for name, value in params.items():
        if name in store:
            target = store._params[name]
            if target.shape != value.shape:
                raise ValueError(
                    f"checkpoint parameter {name!r} has shape {tuple(value.shape)} but the model's "
                    f"has {tuple(target.shape)}: the checkpoint comes from another configuration"
                )
            with torch.no_grad():
                target.copy_(value.to(target.device))
        else:
            pyro.param(name, value)


def train_svi(
    model: Callable,
    guide: Callable,
    train_data,
    val_data=None,
    config: SVIConfig = SVIConfig(),
    run: Optional[Run] = None,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    progress: bool = True,
    step_context: Optional[Callable[[int], contextlib.AbstractContextManager]] = None,
    data_plate: str = DATA,
) -> SVIResult:
    """Train ``model``/``guide`` by stochastic variational inference.

    :param model: Pyro model taking a batch (``model(x)``, ``model(x, y)`` or ``model(**batch)``);
        its datapoints sit in one plate of size ``B`` (see ``data_plate``).
    :param guide: Pyro guide with the same signature.
    :param train_data: a tensor ``(N, ...)``, a tuple of model arguments aligned on dim 0
        (``(x, y)``; ``None`` or a non-tensor entry is passed unchanged, e.g. an unlabelled
        split), or a dict of keyword arguments (:func:`ppgen.infer.batches.as_batch`). Every
        aligned tensor is cut into the same minibatches. Moved to ``config.device`` (move the
        networks there yourself).
    :param val_data: optional validation data, in the same form, scored each epoch (ELBO per
        datapoint, networks in eval mode: :func:`evaluate_elbo`).
    :param run: run directory for metrics and a checkpoint per epoch; with ``run.resume`` the
        loop continues from the checkpoint, with parameters, optimizer and RNG states restored.
    :param transform: applied to each training batch in the form the data was given (a tensor,
        tuple or dict) and returning that form (e.g. dynamic binarization).
    :param step_context: ``step_context(epoch)`` is entered around every training step of that
        epoch (not around validation), e.g. a KL warm-up schedule (``VAE.objective``).
    :param data_plate: name of the plate over datapoints, default ``"data"``; a model without a
        plate of that name uses its single plate of size ``B``. Every site inside it is scaled by
        ``N / B``; no such plate, or several, is an error unless ``B = N``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes its shard of every global batch
    of ``config.batch_size`` and gradients are averaged (DDP-style, gloo on CPU, NCCL on GPU);
    only rank 0 validates and writes ``run``. A resumed multi-process run continues rank 0's
    random stream; the other ranks draw fresh noise (seeded by seed, rank and step), so its
    numbers follow the uninterrupted run in distribution, not bit for bit.

    :returns: :class:`SVIResult`, one metrics dict per epoch (train loss, validation ELBO, seconds).
    """
    job = distributed(resolve_device(config.device))
    rank, device = job.rank, job.place(resolve_device(config.device))
    train = as_batch(train_data, "train_data", model)
    n = train.size
    if config.batch_size > n:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the training set ({n} datapoints); "
            f"use --batch-size {n} or smaller"
        )
    local = job.shard(config.batch_size)  # this process's shard of each global batch
    if rank != 0:  # only rank 0 validates, writes the run directory and shows progress
        val_data, progress = None, False
    train = train.to(device)
    val = as_batch(val_data, "val_data", model).to(device) if val_data is not None else None
    tensor = train.form == "tensor"  # the common case: index the tensor itself

    def rows(index) -> Any:
        """The user's form of the datapoints ``index`` (a slice or a tensor of positions)."""
        return train.args[0][index] if tensor else train.rows(index).data

    seed_everything(config.seed + rank)  # different sampling noise per process
    first = rows(slice(0, local))
    step_fn, optimizer = make_svi_step(
        model, guide, config, transform(first) if transform is not None else first, n / local, job, data_plate
    )
    batches = n // config.batch_size
    # The order of the data is shared by all processes: a generator seeded by (seed, epoch).
    order = torch.Generator()

    start_epoch, step, history = 0, 0, []
    # A partly done epoch, when resuming an interrupt: its order, next batch, summed loss, and how
    # many of its updates were applied and skipped (train_loss averages the applied ones only).
    perm, first_batch, total, done, skipped = None, 0, 0.0, 0, 0
    if run is not None and run.resume:
        ckpt = run.load_checkpoint(map_location=device)
        load_params(ckpt["params"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if "guide" in ckpt:
            step_fn.guide.load_training_state(ckpt["guide"])
        set_rng_state(ckpt["rng"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        if rank:  # the checkpoint holds rank 0's random state: give the others their own noise again
            seed_everything(hash((config.seed, rank, step)) % 2**32)
        if "perm" in ckpt:
            perm, first_batch, total = ckpt["perm"].to(device), int(ckpt["batch"]), float(ckpt["total"])
            # checkpoints from before the skip counts were kept: assume every step so far applied
            done, skipped = int(ckpt.get("done", first_batch)), int(ckpt.get("skipped", 0))
        if rank == 0:  # the other processes read the run directory but never write it
            run.truncate_metrics(lambda r: r.get("epoch", 0) <= start_epoch)
        history = [r for r in run.metrics() if "train_loss" in r and r.get("epoch", 0) <= start_epoch]

    val_elbo = history[-1].get("val_elbo") if history else None
    names = getattr(step_fn, "names", [])
    stop_on_bad = config.on_nonfinite == "stop"
    with StopSignal() as stop:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            if perm is None:
                order.manual_seed(config.seed * 100_003 + epoch)
                perm, first_batch, total = torch.randperm(n, generator=order).to(device), 0, 0.0
                done, skipped = 0, 0
            # This epoch's step records, still on the device; read by `settle` (one host read).
            pending: list = []
            halt = torch.zeros((), dtype=torch.float32, device=device) if stop_on_bad else None

            def settle() -> None:
                """Read the pending records; add the applied steps' losses; raise on the first
                non-finite step under on_nonfinite="stop"."""
                nonlocal step, done, skipped, total
                if not pending:
                    return
                read = torch.stack(pending).tolist() if isinstance(pending[0], torch.Tensor) else list(pending)
                pending.clear()
                for record in read:
                    what = record_problem(record, names) if isinstance(record, list) else record[1]
                    loss = record[0]
                    if what is not None:
                        if not stop_on_bad:
                            skipped += 1
                            continue
                        where = run.checkpoint_path if run is not None else "none (no run directory)"
                        raise FloatingPointError(
                            f"non-finite {what} ({loss if what == 'loss' else 'NaN/inf'}) at epoch {epoch}, "
                            f"step {step + 1}; the update was not applied (nor any later one of the epoch). "
                            f"Last good checkpoint: {where}. Lower --lr, check the data, or pass "
                            "--on-nonfinite skip."
                        )
                    step += 1
                    done += 1
                    total += loss / n

            bar = tqdm(range(first_batch, batches), desc=f"epoch {epoch}/{config.epochs}",
                       disable=not progress, leave=False)
            for i in bar:
                start = i * config.batch_size + rank * local
                x = rows(perm[start : start + local])
                x = transform(x) if transform is not None else x
                with step_context(epoch) if step_context is not None else contextlib.nullcontext():
                    if hasattr(step_fn, "on_device"):
                        pending.append(step_fn.on_device(x, halt))
                    else:  # a step function returning its loss as a float: judged at once
                        loss = step_fn(x)
                        bad = None if math.isfinite(loss) else (getattr(step_fn, "nonfinite", None) or "loss")
                        pending.append((loss, bad))
                        if bad is not None:
                            settle()
                requested = job.agree_stop(stop.requested, device)
                if requested:
                    settle()
                    if run is None or rank != 0:
                        raise Interrupted(f"{requested}: stopped at epoch {epoch}, step {step}")
                    run.save_checkpoint(_state(optimizer, step_fn.guide, epoch - 1, step, perm=perm, batch=i + 1,
                                               total=total, done=done, skipped=skipped))
                    raise Interrupted(
                        f"{requested}: stopped at epoch {epoch}, step {step}; checkpoint saved in "
                        f"{run.path}. Resume with the same command plus --resume."
                    )
            settle()
            seconds = time.perf_counter() - t0
            # Mean loss per datapoint over the updates applied this epoch (NaN if all were skipped).
            train_loss = total / done if done else math.nan
            record = {"epoch": epoch, "step": step, "train_loss": train_loss, "seconds": seconds}
            if skipped:
                record["skipped_steps"] = skipped  # this epoch's, not cumulative
            perm = None
            bad = nonfinite_parameter()
            if bad is not None:  # every applied update had finite gradients: Adam's own overflow
                raise FloatingPointError(
                    f"parameter {bad!r} holds NaN/inf after epoch {epoch} although every applied update "
                    f"had a finite loss and gradient (Adam's moments overflowed); the epoch was not "
                    f"validated or saved. Lower --lr or check the data's scale."
                )
            if val is not None:
                val_elbo = evaluate_elbo(model, guide, val)
                record["val_elbo"] = val_elbo
            history.append(record)
            if progress:
                tqdm.write(
                    f"epoch {epoch:3d}  train loss {record['train_loss']:9.3f}  "
                    + (f"val ELBO {val_elbo:9.3f}  " if val is not None else "")
                    + f"{seconds:6.1f}s"
                )
            if run is not None and rank == 0:
                run.log(record)
                run.save_checkpoint(_state(optimizer, step_fn.guide, epoch, step))
                if config.keep_checkpoints:
                    run.keep_checkpoint(epoch)
    return SVIResult(history, val_elbo)
