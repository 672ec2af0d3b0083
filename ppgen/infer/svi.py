"""The SVI training loop: any Pyro model/guide pair with a ``"data"`` plate over datapoints.

The model and guide are called on minibatches ``x`` of shape ``(B, ...)`` and declare
``pyro.plate("data", B)``. The loop scales every site inside that plate by ``N / B`` so the loss
is an unbiased estimate of the full-dataset negative ELBO (global latents are counted once), and
reports the ELBO per datapoint in nats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Callable, NamedTuple, Optional

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from ppgen.devices import Distributed, adam, distributed, resolve_device
from ppgen.infer.estimators import get_estimator, make_elbo, prepare_guide
from ppgen.infer.traces import DATA_SCALE_KEY, plate_nesting_from
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
    on_nonfinite: str = "stop"  # NaN/Inf loss: "stop" the run, or "skip" that update
    keep_checkpoints: bool = False  # also keep checkpoints/epoch-NNN.pt for every epoch

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


class SVIResult(NamedTuple):
    """What :func:`train_svi` returns: one metrics dict per epoch, and the final validation ELBO."""

    history: list[dict]
    val_elbo: Optional[float]


class DataScale(Messenger):
    """Multiply the log-density of every site inside the ``"data"`` plate by ``scale``.

    Used with ``scale = N / B`` to turn a minibatch ELBO into an unbiased full-dataset estimate.
    Sites of a plate that already subsamples itself (``subsample_size``) are left alone.
    The factor is also recorded in ``msg["_ppgen_data_scale"]`` (``ppgen.infer.traces.DATA_SCALE_KEY``), so
    per-datapoint bounds (``iwae``, ``dreg``, ``vimco``) can keep it outside their logsumexp
    while other ``poutine.scale`` factors (e.g. KL warm-up) stay inside each log weight.
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _process_message(self, msg: dict) -> None:
        for frame in msg["cond_indep_stack"]:
            if frame.name == "data" and (frame.full_size is None or frame.full_size == frame.size):
                msg["scale"] = self.scale * msg["scale"]
                msg[DATA_SCALE_KEY] = self.scale * msg.get(DATA_SCALE_KEY, 1.0)
                return


@torch.no_grad()
def evaluate_elbo(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    batch_size: int = 1000,
    num_particles: int = 1,
    seed: int = 0,
) -> float:
    """Mean ELBO per datapoint (nats) of ``data`` (shape ``(N, ...)``), estimated with
    ``num_particles`` reparameterized samples per datapoint under a fixed seed, leaving the
    caller's random state untouched."""
    if len(data) == 0:
        raise ValueError("cannot evaluate the ELBO of an empty dataset")
    elbo = Trace_ELBO(num_particles=num_particles)
    total = 0.0
    with seeded(seed, data.device):
        for i in range(0, len(data), batch_size):
            total += -elbo.loss(model, guide, data[i : i + batch_size])
    return total / len(data)


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


def make_svi_step(
    model: Callable,
    guide: Callable,
    config: SVIConfig,
    example: torch.Tensor,
    scale: float = 1.0,
    job: Distributed = Distributed(0, 1, 0),
) -> tuple[Callable[[torch.Tensor], float], torch.optim.Optimizer]:
    """One SVI update as a function of a batch, and the optimizer it steps.

    Clears Pyro's param store, registers every parameter with one trace of model and guide on
    ``example``, and builds a single fused ``torch.optim.Adam`` over all of them. The returned
    ``step(x)`` computes the estimator's loss and gradients on batch ``x`` with the data plate
    scaled by ``scale`` (``N / B``), takes the Adam step unless the loss is NaN or infinite, and
    returns the loss (negative ELBO estimate, full-dataset scale). In a data-parallel ``job``
    (torch.distributed), gradients and loss are averaged over its processes before the step.
    ``step.guide`` is the guide as the estimator sees it (:func:`prepare_guide`); if it has
    ``training_state()``/``load_training_state(state)`` (e.g. a learned baseline), :func:`train_svi`
    checkpoints that state too.
    """
    pyro.clear_param_store()
    # Vectorized particles and TraceEnum_ELBO (at any particle count) need the plate nesting. Pyro
    # would guess it at the first step by running guide and model once on the training RNG stream,
    # so a resumed run would draw other numbers than the uninterrupted one. Found here off the RNG,
    # for every estimator (a user-registered ELBO may guess too); a non-vectorized Trace_ELBO
    # ignores it.
    nesting = plate_nesting_from(model, guide, (example,), {})
    elbo = make_elbo(config.estimator, config.particles, config.particles > 1, nesting)
    train_guide = prepare_guide(config.estimator, guide)
    with poutine.trace(param_only=True) as capture, torch.no_grad():
        Trace_ELBO().loss(model, guide, example)
    params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
    optimizer = adam(params, config.lr)

    def step(x: torch.Tensor) -> float:
        # Model, guide and data were validated by the registration pass above; re-checking every
        # distribution's arguments each step costs about 5% of a VAE step (bench/svi_step.py).
        with DataScale(scale), pyro.validation_enabled(False):
            loss = elbo.loss_and_grads(model, train_guide, x)
        if job.world > 1:
            (loss,) = job.average(params, loss)
            loss = float(loss)
        if math.isfinite(loss):  # a non-finite loss leaves the parameters untouched
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step.guide = train_guide  # type: ignore[attr-defined]
    return step, optimizer


def train_svi(
    model: Callable,
    guide: Callable,
    train_data: torch.Tensor,
    val_data: Optional[torch.Tensor] = None,
    config: SVIConfig = SVIConfig(),
    run: Optional[Run] = None,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    progress: bool = True,
    step_context: Optional[Callable[[int], contextlib.AbstractContextManager]] = None,
) -> SVIResult:
    """Train ``model``/``guide`` by stochastic variational inference.

    :param model: Pyro model taking a batch ``x`` of shape ``(B, ...)``; its datapoints sit in
        ``pyro.plate("data", B)``.
    :param guide: Pyro guide with the same signature.
    :param train_data: tensor ``(N, ...)``; moved to ``config.device`` (move the networks
        there yourself).
    :param val_data: optional tensor ``(N_val, ...)`` scored each epoch (ELBO per datapoint).
    :param run: run directory for metrics and a checkpoint per epoch; with ``run.resume`` the
        loop continues from the checkpoint, with parameters, optimizer and RNG states restored.
    :param transform: applied to each training batch (e.g. dynamic binarization).
    :param step_context: ``step_context(epoch)`` is entered around every training step of that
        epoch (not around validation), e.g. a KL warm-up schedule (``VAE.objective``).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each process takes its shard of every global batch
    of ``config.batch_size`` and gradients are averaged (DDP-style, gloo on CPU, NCCL on GPU);
    only rank 0 validates and writes ``run``. A resumed multi-process run continues rank 0's
    random stream; the other ranks draw fresh noise (seeded by seed, rank and step), so its
    numbers follow the uninterrupted run in distribution, not bit for bit.

    :returns: :class:`SVIResult`, one metrics dict per epoch (train loss, validation ELBO, seconds).
    """
    job = distributed(resolve_device(config.device))
    rank, device = job.rank, job.place(resolve_device(config.device))
    n = len(train_data)
    if n == 0:
        raise ValueError("train_data is empty")
    if config.batch_size > n:
        raise ValueError(
            f"batch_size {config.batch_size} is larger than the training set ({n} datapoints); "
            f"use --batch-size {n} or smaller"
        )
    local = job.shard(config.batch_size)  # this process's shard of each global batch
    if rank != 0:  # only rank 0 validates, writes the run directory and shows progress
        val_data, progress = None, False
    train_data = train_data.to(device)
    val_data = val_data.to(device) if val_data is not None else None

    seed_everything(config.seed + rank)  # different sampling noise per process
    first = train_data[:local]
    step_fn, optimizer = make_svi_step(
        model, guide, config, transform(first) if transform is not None else first, n / local, job
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
    with StopSignal() as stop:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            t0 = time.perf_counter()
            if perm is None:
                order.manual_seed(config.seed * 100_003 + epoch)
                perm, first_batch, total = torch.randperm(n, generator=order).to(device), 0, 0.0
                done, skipped = 0, 0
            bar = tqdm(range(first_batch, batches), desc=f"epoch {epoch}/{config.epochs}",
                       disable=not progress, leave=False)
            for i in bar:
                start = i * config.batch_size + rank * local
                x = train_data[perm[start : start + local]]
                with step_context(epoch) if step_context is not None else contextlib.nullcontext():
                    loss = step_fn(transform(x) if transform is not None else x)
                if not math.isfinite(loss):
                    if config.on_nonfinite == "skip":
                        skipped += 1
                        continue
                    where = run.checkpoint_path if run is not None else "none (no run directory)"
                    raise FloatingPointError(
                        f"non-finite loss ({loss}) at epoch {epoch}, step {step + 1}; the update was "
                        f"not applied. Last good checkpoint: {where}. Lower --lr, check the data, "
                        "or pass --on-nonfinite skip."
                    )
                step += 1
                done += 1
                total += loss / n
                if i % 10 == 0:
                    bar.set_postfix(loss=f"{loss / n:.2f}")
                requested = job.agree_stop(stop.requested, device)
                if requested:
                    if run is None or rank != 0:
                        raise Interrupted(f"{requested}: stopped at epoch {epoch}, step {step}")
                    run.save_checkpoint(_state(optimizer, step_fn.guide, epoch - 1, step, perm=perm, batch=i + 1,
                                               total=total, done=done, skipped=skipped))
                    raise Interrupted(
                        f"{requested}: stopped at epoch {epoch}, step {step}; checkpoint saved in "
                        f"{run.path}. Resume with the same command plus --resume."
                    )
            seconds = time.perf_counter() - t0
            # Mean loss per datapoint over the updates applied this epoch (NaN if all were skipped).
            train_loss = total / done if done else math.nan
            record = {"epoch": epoch, "step": step, "train_loss": train_loss, "seconds": seconds}
            if skipped:
                record["skipped_steps"] = skipped  # this epoch's, not cumulative
            perm = None
            if val_data is not None:
                val_elbo = evaluate_elbo(model, guide, val_data)
                record["val_elbo"] = val_elbo
            history.append(record)
            if progress:
                tqdm.write(
                    f"epoch {epoch:3d}  train loss {record['train_loss']:9.3f}  "
                    + (f"val ELBO {val_elbo:9.3f}  " if val_data is not None else "")
                    + f"{seconds:6.1f}s"
                )
            if run is not None and rank == 0:
                run.log(record)
                run.save_checkpoint(_state(optimizer, step_fn.guide, epoch, step))
                if config.keep_checkpoints:
                    run.keep_checkpoint(epoch)
    return SVIResult(history, val_elbo)
