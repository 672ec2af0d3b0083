"""Can a model take vectorized particles? One draw scored with and without the particle plate.

Vectorized particles (an extra outermost ``pyro.plate`` left of the model's plates: the ELBO's
``num_particles`` with ``vectorize_particles``, the multi-sample bounds, evidence) need a model
whose computation broadcasts over leading dimensions. Many models written for ``(B, ...)``
inputs do not: a ``BatchNorm1d`` reads ``(K, B, F)`` as ``(N, C, L)`` (an error, or, when ``B``
equals ``F``, normalisation over the wrong axis without one), ``torch.cat`` of a particle-shaped
and a data-shaped tensor fails, boolean-mask indexing drops the particle dimension.

- :func:`sequential_log_weights`: one particle's per-datapoint log weights from an ordinary trace.
- :func:`vectorization_problem`: one guide draw scored both ways; why they disagree, if they do.
  Evidence (:func:`ppgen.infer.evidence.log_evidence`) falls back to a particle loop on it.
- :func:`check_vectorizable`: the same check before training or gradient statistics, which have
  no loop to fall back on and refuse instead.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from pyro import poutine

from ppgen.infer.traces import (
    DataPlate,
    check_same_latents,
    log_density,
    log_weights_of,
    particle_sites,
)

__all__ = ["sequential_log_weights", "vectorization_problem", "check_vectorizable"]


def sequential_log_weights(model: Callable, guide: Callable, args: tuple, kwargs: dict, nesting: int, plate: str,
                            replay=None) -> tuple[torch.Tensor, dict]:
    """Log weights ``(B,)`` of one particle: one ordinary trace of the guide (replaying ``replay``
    if given) and of the model on it, no particle plate; every site summed per datapoint exactly as
    the vectorized path does (masks honoured, scales ignored). Also returns the guide's draws
    ``{site name: its guide-trace site}``."""
    full = nesting + 1
    proposal = guide if replay is None else poutine.replay(guide, trace=replay)
    with DataPlate(plate):
        g = poutine.trace(proposal).get_trace(*args, **kwargs)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args, **kwargs)
    check_same_latents(g, m)
    log_p, _, size = log_density(m, full, 1, observed=True)
    log_q, _, _ = log_density(g, full, 1, observed=False)
    draws = {name: dict(site) for name, site in particle_sites(g, observed=False)}
    m.nodes.clear()
    g.nodes.clear()
    if size is None:
        raise ValueError(f"the model has no sample site inside a pyro.plate({plate!r}, ...)")
    return torch.as_tensor(log_p - log_q).reshape(-1), draws


def vectorization_problem(model: Callable, guide: Callable, args: tuple, kwargs: dict, nesting: int, plate: str,
                           size: int, device: torch.device) -> tuple[bool, Optional[str]]:
    """``(sequential_runs, problem)``: whether an ordinary trace of the chunk runs, and why the
    vectorized log weights of this chunk cannot be trusted (``None`` if they can).

    One guide draw is scored by an ordinary trace and, repeated over two particles, by the
    particle plate; both run off the caller's random stream. They must agree to about the square
    root of the unit roundoff (relative). If the ordinary trace itself fails there is nothing to
    compare with, and no loop to fall back on: ``(False, None)``."""
    full = nesting + 1
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            one, draws = sequential_log_weights(model, guide, args, kwargs, nesting, plate)
        except Exception:
            return False, None
        replay = poutine.Trace()
        for name, site in draws.items():
            value = site["value"]
            batch_dims = value.ndim - len(getattr(site["fn"], "event_shape", ()))
            if batch_dims >= full:  # more batch dims than plates: the vectorized pass will say so
                return True, None
            value = value.reshape((1,) * (full - batch_dims) + tuple(value.shape))
            replay.add_node(name, **dict(site, value=value.expand(2, *value.shape[1:])))
        try:
            two, _ = log_weights_of(model, guide, args, kwargs, 2, nesting, data_plate=plate, replay=replay)
        except Exception as error:
            return True, f"{type(error).__name__}: {error}"
    if tuple(two.shape) != (2, size) or tuple(one.shape) != (size,):
        return True, (f"log weights of shape {tuple(two.shape)} for 2 particles of {size} datapoints "
                      f"(expected {(2, size)})")
    # the coarser of the two dtypes the model computed in sets the tolerance
    eps = max((torch.finfo(t.dtype).eps for t in (one, two) if t.is_floating_point()),
              default=torch.finfo(torch.float32).eps)
    one, two = one.double().cpu(), two.double().cpu()
    gap = (two - one).abs()
    bad = ~((gap <= math.sqrt(eps) * (1.0 + one.abs())) | (two == one))
    if bad.any():
        where = int(bad.any(0).nonzero()[0])
        return True, (f"the same draw scores {float(two[0, where]):.6g} with the particle plate but "
                      f"{float(one[where]):.6g} without it (datapoint {where} of the chunk): the model "
                      f"mixes the particle dimension into its computation")
    return True, None


def check_vectorizable(model: Callable, guide: Callable, args: tuple, kwargs: dict, nesting: int, plate: str,
                       size: int, device: torch.device, what: str) -> None:
    """Refuse, before any training, a model that cannot take the extra particle dimension that
    vectorized particles put left of its plates (:func:`vectorization_problem`, run once).

    The check runs with the networks in their training mode, as the SVI step does (a
    ``BatchNorm1d`` on a ``(K, B, F)`` input normalises over the wrong axis, or fails, only
    there), but with dropout off so both scorings see the same network; buffers that the pass
    updates (batch-norm running statistics) are put back afterwards.

    :param what: the estimator and particle count, for the message.
    :raises ValueError: the same draw scores differently with and without the particle plate,
        or the vectorized pass fails while an ordinary trace runs.
    """
    from torch.nn.modules.dropout import _DropoutNd

    from ppgen.infer.networks import networks_of

    modules = [m for root in networks_of(model, guide) for m in root.modules()]
    saved = [(m, m.training, [(b, b.detach().clone()) for b in m.buffers(recurse=False)]) for m in modules]
    try:
        for m in modules:
            if isinstance(m, _DropoutNd):
                m.eval()
        _, problem = vectorization_problem(model, guide, args, kwargs, nesting, plate, size, device)
    finally:
        with torch.no_grad():
            for m, training, buffers in saved:
                m.training = training
                for buffer, value in buffers:
                    buffer.copy_(value)
    if problem is not None:
        raise ValueError(
            f"{what} draws its particles in one vectorized pass, an extra dimension left of the model's "
            f"plates, and this model cannot take it: {problem}. Use particles=1 (--particles 1) with "
            "'reparam', 'stl' or a score-function estimator (the multi-sample estimators always "
            "vectorize), or write the model so that its networks broadcast over leading dimensions"
        )
