"""Per-datapoint log weights of a Pyro model/guide pair, shared by evidence and multi-sample bounds.

Every site's ``log_prob`` is summed over all dimensions except the ``"data"`` plate (and an extra,
outermost particle plate), giving log weights ``log p(x_n, z_k) - log q(z_k | x_n)`` of shape
``(K, B)``: what importance-sampled evidence (:mod:`ppgen.infer.evidence`) and the
importance-weighted bounds (:mod:`ppgen.infer.estimators.multisample`) are made of.
"""

from __future__ import annotations

from typing import Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

__all__ = ["per_datapoint_log_weights", "plate_nesting_from", "check_positive_int", "DATA", "DATA_SCALE_KEY"]

DATA = "data"
#: message key under which ``ppgen.infer.svi.DataScale`` records the minibatch factor ``N / B``
#: it multiplied into a site's scale (kept outside the logsumexp of per-datapoint bounds).
DATA_SCALE_KEY = "_ppgen_data_scale"
_PARTICLES = "_ppgen_particles"


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _plate_nesting(trace) -> int:
    dims = [
        -f.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max(dims, default=0)


def _latents(trace) -> set:
    return {
        n for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }


def _data_frame(site: dict):
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA:
            return frame
    return None


def _site_per_datapoint(site: dict, full: int, num_particles: int, size: int) -> torch.Tensor:
    """Sum a site's unscaled (masked) log-density over every dim but particles and data: ``(K, B)``."""
    lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    if site["mask"] is not None and site["mask"] is not True:
        lp = torch.where(torch.as_tensor(site["mask"], device=lp.device), lp, lp.new_zeros(()))
    if lp.ndim > full:
        raise ValueError(
            f"site {site['name']!r} has log_prob of shape {tuple(lp.shape)}: more batch dims than "
            f"plates ({full - 1}); declare event dims with .to_event()"
        )
    lp = lp.reshape((1,) * (full - lp.ndim) + tuple(lp.shape))
    data_axis = full + _data_frame(site).dim
    other = [a for a in range(1, full) if a != data_axis]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[0], lp.shape[data_axis]).expand(num_particles, size)


def per_datapoint_log_weights(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    num_particles: int,
    *args,
    max_plate_nesting: Optional[int] = None,
    **kwargs,
) -> tuple[torch.Tensor, float]:
    """Log weights ``log p(x_n, z_k) - log q(z_k | x_n)`` of ``num_particles`` vectorized draws.

    ``model(data, *args, **kwargs)`` and ``guide(...)`` must declare ``pyro.plate("data", B)``
    around every latent and observed site, with ``B = len(data)``. Gradients flow (no
    ``no_grad`` here) so the IWAE objective can use it.

    :param data: tensor of shape ``(B, ...)``.
    :param num_particles: ``K``, drawn in one vectorized pass.
    :param max_plate_nesting: plates of the model (found by tracing if not given).
    :returns: ``(log_w, scale)``: log weights of shape ``(K, B)`` and the ``poutine.scale`` factor
        of the data-plate sites (1 unless a training loop scales the minibatch).
    :raises ValueError: no ``"data"`` plate, a site outside it, or model and guide that disagree
        on latent sites.
    """
    check_positive_int("num_particles", num_particles)
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting_from(model, guide, (data, *args), kwargs)
    full = max_plate_nesting + 1
    with pyro.plate(_PARTICLES, num_particles, dim=-full):
        guide_tr = poutine.trace(guide).get_trace(data, *args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(data, *args, **kwargs)
    guide_latents, model_latents = _latents(guide_tr), _latents(model_tr)
    if guide_latents != model_latents:
        raise ValueError(
            "model and guide must have the same latent sites; model only: "
            f"{sorted(model_latents - guide_latents)}, guide only: {sorted(guide_latents - model_latents)}"
        )
    log_w, scale, size = 0.0, None, None
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or (sign < 0 and site["is_observed"]):
                continue
            frame = _data_frame(site)
            if frame is None:
                raise ValueError(
                    f"site {name!r} is not inside a pyro.plate({DATA!r}, ...); per-datapoint evidence "
                    f"needs every latent and observed site in the {DATA!r} plate over datapoints"
                )
            size = frame.size if size is None else size
            scale = float(site["scale"]) if scale is None else scale
            log_w = log_w + sign * _site_per_datapoint(site, full, num_particles, frame.size)
    # Traces sit in reference cycles (freed only by the garbage collector); drop their tensors now
    # so one particle chunk's activations never outlive it: memory stays flat in K.
    model_tr.nodes.clear()
    guide_tr.nodes.clear()
    if size is None:
        raise ValueError(f"the model has no sample site inside a pyro.plate({DATA!r}, ...)")
    return log_w, scale


def plate_nesting_from(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    # A throwaway trace: it must not consume the caller's random stream.
    cuda = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=cuda[:1]):
        g = poutine.trace(guide).get_trace(*args, **kwargs)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args, **kwargs)
    return max(_plate_nesting(g), _plate_nesting(m))
