"""Where training runs: the device, this process's place in a data-parallel job, and the
optimizer every loop uses.

Data parallelism is PyTorch's own: ``torchrun`` starts one process per device and sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; each loop calls :func:`distributed` to join the group,
trains on its shard of every global batch, and averages gradients with
:meth:`Distributed.average` before the optimizer step (what ``DistributedDataParallel`` does,
without wrapping the networks, so Pyro's param store and the GAN/score loops stay unchanged).
"""

from __future__ import annotations

import os
import time
from typing import Iterable, NamedTuple, Optional, Sequence, Union

import torch

__all__ = ["resolve_device", "Distributed", "distributed", "leave_process_group", "adam"]


def resolve_device(name: str = "cpu") -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a ``torch.device``, refusing CUDA when absent."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use 'cpu' or 'cuda'")
    return device


class Distributed(NamedTuple):
    """This process's place in a data-parallel job (rank 0 of 1 when run alone)."""

    rank: int
    world: int
    local_rank: int

    def place(self, device: torch.device) -> torch.device:
        """The device this process uses: its own GPU (``LOCAL_RANK``) in a multi-GPU job."""
        return torch.device("cuda", self.local_rank) if self.world > 1 and device.type == "cuda" else device

    def shard(self, batch_size: int) -> int:
        """This process's share of a global batch of ``batch_size`` datapoints."""
        if batch_size % self.world:
            raise ValueError(f"batch_size {batch_size} must divide evenly over {self.world} processes")
        return batch_size // self.world

    def average(self, params: Sequence[torch.Tensor], *values: Union[float, torch.Tensor]) -> list[torch.Tensor]:
        """Average every parameter's gradient, and ``values`` (e.g. the losses), over the
        processes in one all-reduce of a flat buffer; returns the averaged ``values`` (0-d
        tensors; unchanged when alone).

        Each process scales its shard's loss as if it were the whole batch, so the average over
        processes equals the single-process estimate on the global batch. Alone, a no-op."""
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        extra = torch.stack([torch.as_tensor(v, dtype=grads[0].dtype, device=grads[0].device) for v in values])
        flat = torch.cat([g.reshape(-1) for g in grads] + [extra.detach().reshape(-1)])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(g)
            offset += g.numel()
        return [flat[offset + i] for i in range(len(values))]

    def agree_stop(self, requested: Optional[str], device: torch.device) -> Optional[str]:
        """Whether any process was asked to stop (``requested``: this process's signal name, from
        :class:`ppgen.runs.StopSignal`), agreed by all of them at the same step, so they stop
        together and rank 0's checkpoint is taken where every process is. A signal reaches the
        processes a moment apart; deciding alone, one would leave while another waits in the
        next all-reduce. Alone, returns ``requested``; in a job, one tiny all-reduce per call."""
        if self.world == 1:
            return requested
        import torch.distributed as dist

        flag = torch.tensor([float(requested is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return requested or ("a signal to another process" if flag.item() else None)


def distributed(device: Optional[torch.device] = None) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1),
    with NCCL for CUDA devices and gloo otherwise; idempotent. Alone, returns rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(0, 1, 0)
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def leave_process_group(wait: bool = False) -> None:
    """Leave the torchrun process group, if any; with ``wait``, once every process is done.

    gloo's worker threads free each finished collective, and the Python tensors it holds, a
    moment after the caller saw it finish; one still doing so when the interpreter shuts down
    aborts the process ("terminate called without an active exception", about 1 run in 30 with
    two CPU processes). Waiting for the others and then sleeping briefly, without the GIL, lets
    them finish (0 aborts in 100 runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:  # NCCL's barrier runs on this process's own GPU
            nccl = dist.get_backend() == "nccl"
            dist.barrier(device_ids=[int(os.environ.get("LOCAL_RANK", "0"))] if nccl else None)
        time.sleep(0.05)
        dist.destroy_process_group()


def adam(params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """``torch.optim.Adam`` with torch's fused kernel where every parameter allows it (floating
    point, on CPU or CUDA), else the multi-tensor one. The update is Adam's either way; the fused
    kernel takes about a third of the time of the default on CPU (bench/svi_step.py)."""
    params = list(params)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kernel = {"fused": True} if fused else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=betas, **kernel)
