"""What the hand-written training loops share besides the run directory: the state they
checkpoint and resume, and what they do when told to stop or when a loss goes non-finite.

- :class:`LoopState` names the loop's modules and optimizers (``{"net": net, "optim": opt}``),
  its noise generator and its :class:`ppgen.ema.EMA`. :meth:`LoopState.state` is the checkpoint
  of an epoch (their ``state_dict()``, the global random state of :func:`ppgen.runs.rng_state`,
  the noise generator's state, the epoch and anything the loop adds, e.g. ``batch`` when stopped
  mid-epoch); :meth:`LoopState.resume` loads it back and truncates metrics.jsonl to the epochs
  the checkpoint covers, so a resumed run continues the uninterrupted one exactly.
- :func:`interrupt` is the SIGINT/SIGTERM policy: the process that writes the run saves a
  checkpoint and every process raises :class:`ppgen.runs.Interrupted` saying how to resume.
- :func:`check_finite` is the non-finite policy: a loop sums its losses on the device and reads
  them once per epoch (and at an interrupt); a NaN or infinite sum stops the run with a
  ``FloatingPointError`` that names the last good checkpoint, before anything is checkpointed.

Used by the score loop (:func:`ppgen.score.train_score`) and the adversarial loop
(:func:`ppgen.gan.adversarial_loop`); the SVI loop keeps its own (it can skip a bad step).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NoReturn, Optional, Sequence

import torch

from ppgen.ema import EMA
from ppgen.runs import Interrupted, Run, rng_state, set_rng_state

__all__ = ["LoopState", "interrupt", "check_finite"]


class LoopState:
    """The checkpointed state of a training loop (module docstring).

    :param parts: checkpoint key -> an object with ``state_dict``/``load_state_dict`` (networks,
        optimizers).
    :param noise: the loop's own generator of the objective's noise.
    :param ema: the moving average of the weights, or None; stored under ``"ema"``.
    """

    def __init__(self, parts: dict[str, Any], noise: torch.Generator, ema: Optional[EMA] = None):
        self.parts, self.noise, self.ema = parts, noise, ema

    def state(self, epoch: int, **extra: Any) -> dict:
        """The checkpoint after ``epoch`` completed epochs, with ``extra`` entries added."""
        return {**{key: part.state_dict() for key, part in self.parts.items()}, "epoch": epoch, "rng": rng_state(),
                "noise": self.noise.get_state(), **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                **extra}

    def resume(self, run: Optional[Run], rank: int) -> tuple[int, int, list]:
        """Load ``run``'s checkpoint when it resumes and has one: returns ``(start, first,
        history)``, the completed epochs, the next batch of the epoch after them (0 unless a
        signal stopped it mid-epoch) and their metrics lines; ``(0, 0, [])`` otherwise. Rank 0
        truncates metrics.jsonl to those epochs."""
        if run is None or not run.resume or not run.checkpoint_path.exists():
            return 0, 0, []
        ckpt = run.load_checkpoint(map_location="cpu")
        for key, part in self.parts.items():
            part.load_state_dict(ckpt[key])
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["ema"])
        set_rng_state(ckpt["rng"])
        if "noise" in ckpt:  # checkpoints from before the loop had its own noise stream
            self.noise.set_state(ckpt["noise"])
        start, first = int(ckpt["epoch"]), int(ckpt.get("batch", 0))
        if rank == 0:  # the other processes read the run directory but never write it
            run.truncate_metrics(lambda r: r.get("epoch", 0) <= start)
        return start, first, [r for r in run.metrics() if r.get("epoch", 0) <= start]


def interrupt(requested: str, where: str, writer: Optional[Run], state: Callable[[], dict]) -> NoReturn:
    """Stop on signal ``requested`` (its name) ``where`` (e.g. ``"in epoch 2"``): ``writer`` (the
    run of the process that writes it, else None) saves ``state()``; raises
    :class:`ppgen.runs.Interrupted`."""
    if writer is None:
        raise Interrupted(f"{requested}: stopped {where}")
    writer.save_checkpoint(state())
    raise Interrupted(f"{requested}: stopped {where}; checkpoint saved in {writer.path}. "
                      "Resume with the same command plus --resume.")


def check_finite(sums: torch.Tensor, names: Sequence[str], epoch: int, run: Optional[Run], rank: int,
                 advice: str) -> list[float]:
    """The running sums ``sums`` (one per name in ``names``; a 0-d tensor for one) read to the
    host as floats (one sync), or a ``FloatingPointError`` naming the first non-finite one, the
    ``epoch`` (counted from 1) it went bad in, the last good checkpoint, and ``advice``."""
    values = sums.reshape(-1).tolist()
    bad = [(name, v) for name, v in zip(names, values) if not math.isfinite(v)]
    if not bad:
        return values
    name, value = bad[0]
    if rank != 0:
        where = "rank 0 names the last good checkpoint"
    elif run is not None and run.checkpoint_path.exists():
        where = f"the last good checkpoint is {run.checkpoint_path} (end of epoch {epoch - 1})"
    else:
        where = "no checkpoint was written yet"
    raise FloatingPointError(f"{name} became {value} in epoch {epoch}; training stopped and {where}. {advice}")
