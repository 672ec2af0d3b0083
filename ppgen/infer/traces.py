"""Per-datapoint log weights of a Pyro model/guide pair, shared by evidence and multi-sample bounds.

Every site's ``log_prob`` is summed over all dimensions except the datapoint plate (and an extra,
outermost particle plate), giving log weights ``log p(x_n, z_k) - log q(z_k | x_n)`` of shape
``(K, B)``: what importance-sampled evidence (:mod:`ppgen.infer.evidence`) and the
importance-weighted bounds (:mod:`ppgen.infer.estimators.multisample`) are made of.

Scales. Evidence wants the plain densities, so by default every ``poutine.scale`` is ignored.
The bounds are trained inside the SVI loop, where a site's scale is a product of two kinds of
factor that must be treated differently:

- the minibatch factor ``N / B`` (:func:`minibatch_factor`: what ``DataScale`` recorded under
  :data:`DATA_SCALE_KEY`, or a subsampling data plate's ``full_size / size``) multiplies each
  datapoint's bound *outside* its logsumexp, so the full-data objective stays unbiased;
- everything else (:func:`inner_scale`, e.g. KL warm-up's ``poutine.scale(beta)`` around the
  latent sites) multiplies the site's log-density *inside* each particle's log weight, giving the
  tempered bound ``logsumexp_k [log p(x|z_k) + beta (log p(z_k) - log q(z_k|x))] - log K``.

Which plate holds the datapoints (:func:`find_data_plate`, :class:`DataPlate`,
:func:`data_plate_name`, :data:`DATA_PLATE_KEY`, :data:`DATA_SCALE_KEY`) is the concept of
:mod:`ppgen.infer.plates`; its public names are re-exported here.
"""

from __future__ import annotations

from typing import Callable, Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ppgen.infer.plates import (
    DATA,
    DATA_PLATE_KEY,
    DATA_SCALE_KEY,
    DataPlate,
    PlateInfo,
    _data_frame,
    data_plate_name,
    find_data_plate,
    plate_nesting_from,
)

__all__ = [
    "per_datapoint_log_weights",
    "log_weights_of",
    "plate_nesting_from",
    "check_positive_int",
    "log_density",
    "trace_particles",
    "with_values",
    "check_same_latents",
    "particle_sites",
    "minibatch_factor",
    "inner_scale",
    "DATA",
    "DATA_SCALE_KEY",
    "DATA_PLATE_KEY",
    "DataPlate",
    "data_plate_name",
    "find_data_plate",
    "PlateInfo",
]

_PARTICLES = "_ppgen_particles"


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _latents(trace) -> set:
    return {
        n for n, s in trace.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    }


def minibatch_factor(site: dict) -> float:
    """The part of a site's ``scale`` that turns a minibatch into the full data set: the ``N / B``
    that :class:`ppgen.infer.svi.DataScale` recorded (``site[DATA_SCALE_KEY]``), times
    ``full_size / size`` when the data plate subsamples itself. Per-datapoint bounds keep it
    *outside* their logsumexp (unbiased full-data objective); every other ``poutine.scale``
    factor (KL warm-up, tempering) is :func:`inner_scale` and stays inside each log weight."""
    factor = float(site.get(DATA_SCALE_KEY, 1.0))
    frame = _data_frame(site)
    if frame is not None and frame.full_size is not None and frame.full_size != frame.size:
        factor *= frame.full_size / frame.size
    return factor


def inner_scale(site: dict):
    """``site["scale"] / minibatch_factor(site)``: the scale that multiplies the site's
    log-density inside each particle's log weight (a float, or a tensor broadcastable to the
    site's batch shape)."""
    scale = site["scale"]
    factor = minibatch_factor(site)
    return scale / factor if factor != 1.0 else scale


def _site_per_datapoint(
    site: dict, full: int, num_particles: int, size: int, scaled: bool = False, value: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Sum a site's masked log-density over every dim but particles and data: ``(K, B)``.

    Unscaled unless ``scaled``, then multiplied by :func:`inner_scale` (before the sum, so a
    tensor scale weighs each element). ``value`` replaces the site's value if given."""
    lp = site["fn"].log_prob(site["value"] if value is None else value, *site["args"], **site["kwargs"])
    if site["mask"] is not None and site["mask"] is not True:
        lp = torch.where(torch.as_tensor(site["mask"], device=lp.device), lp, lp.new_zeros(()))
    if scaled:
        scale = inner_scale(site)
        if isinstance(scale, torch.Tensor) or scale != 1.0:
            lp = lp * scale
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


def _not_in_data_plate(name: str, plate: str = DATA) -> ValueError:
    return ValueError(
        f"site {name!r} is not inside a pyro.plate({plate!r}, ...); per-datapoint log weights "
        f"(importance-sampled evidence, the iwae/dreg/vimco bounds) need every latent and observed "
        f"site in the {plate!r} plate over datapoints. A global latent outside it is shared by all "
        f"datapoints, so the bound does not factor per datapoint: train such a model with "
        f"'reparam', 'stl' or a score-function estimator instead, and estimate its evidence "
        f"with ppgen.joint_log_evidence (nested importance sampling of the joint log p(x_1..N))"
    )


def particle_sites(tr, observed: bool = True) -> list[tuple[str, dict]]:
    """The sample sites of a particle trace that enter the log weights (``observed=False``:
    latent sites only, as for a guide), each checked to sit in the data plate."""
    out = []
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or (not observed and site["is_observed"]):
            continue
        if _data_frame(site) is None:
            raise _not_in_data_plate(name, data_plate_name(site))
        out.append((name, site))
    return out


def log_density(
    tr,
    full: int,
    num_particles: int,
    observed: bool = True,
    scaled: bool = False,
    values: Optional[dict] = None,
) -> tuple[torch.Tensor, Optional[float], Optional[int]]:
    """Per-datapoint log-density of a trace drawn under the particle plate (:func:`trace_particles`).

    :param observed: include observed sites (model) or not (guide).
    :param scaled: multiply each site by its :func:`inner_scale` (the bounds) or not (evidence).
    :param values: ``{site name: value}`` that replaces the traced values (re-scoring).
    :returns: ``(log_density, minibatch, B)``: shape ``(K, B)`` (the float 0.0 if no site), the
        common :func:`minibatch_factor` of the sites (``None`` if no site) and the data-plate size.
    :raises ValueError: a site outside the data plate, or sites whose minibatch factors differ.
    """
    total, factor, size = 0.0, None, None
    for name, site in particle_sites(tr, observed):
        frame = _data_frame(site)
        size = frame.size if size is None else size
        f = minibatch_factor(site)
        if factor is None:
            factor = f
        elif abs(f - factor) > 1e-9 * abs(factor):
            raise ValueError(
                f"sites of the {data_plate_name(site)!r} plate must share one minibatch factor (N / B); site {name!r} "
                f"has {f!r}, another {factor!r}: scale the whole data plate with DataScale"
            )
        value = None if values is None else values.get(name)
        total = total + _site_per_datapoint(site, full, num_particles, frame.size, scaled, value)
    return total, factor, size


def trace_particles(fn: Callable, args: tuple, kwargs: dict, num_particles: int, full: int, replay=None):
    """Trace ``fn(*args, **kwargs)`` with ``num_particles`` particles in a plate at dim ``-full``,
    replaying the sample sites of trace ``replay`` if given."""
    if replay is not None:
        fn = poutine.replay(fn, trace=replay)
    with pyro.plate(_PARTICLES, num_particles, dim=-full):
        return poutine.trace(fn).get_trace(*args, **kwargs)


def with_values(tr, values: dict):
    """A trace to replay: ``tr``'s sample sites with the values in ``values`` substituted."""
    out = poutine.Trace()
    for name, site in tr.nodes.items():
        if site["type"] == "sample":
            out.add_node(name, **dict(site, value=values.get(name, site["value"])))
    return out


def check_same_latents(guide_tr, model_tr) -> None:
    guide_latents, model_latents = _latents(guide_tr), _latents(model_tr)
    if guide_latents != model_latents:
        raise ValueError(
            "model and guide must have the same latent sites; model only: "
            f"{sorted(model_latents - guide_latents)}, guide only: {sorted(guide_latents - model_latents)}"
        )


def per_datapoint_log_weights(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    num_particles: int,
    *args,
    max_plate_nesting: Optional[int] = None,
    scaled: bool = False,
    data_plate: str = DATA,
    **kwargs,
) -> tuple[torch.Tensor, float]:
    """Log weights ``log p(x_n, z_k) - log q(z_k | x_n)`` of ``num_particles`` vectorized draws.

    ``model(data, *args, **kwargs)`` and ``guide(...)`` must declare ``pyro.plate(data_plate, B)``
    around every latent and observed site, with ``B = len(data)``. Gradients flow (no
    ``no_grad`` here) so the IWAE objective can use it.

    :param data: tensor of shape ``(B, ...)`` (or any first model argument, e.g. ``None``).
    :param num_particles: ``K``, drawn in one vectorized pass.
    :param max_plate_nesting: plates of the model (found by tracing if not given).
    :param scaled: ``False`` (evidence): plain log-densities, every ``poutine.scale`` ignored.
        ``True`` (the iwae/dreg/vimco bounds): each site's log-density times its
        :func:`inner_scale` (e.g. a KL warm-up weight), giving the tempered log weights
        ``log p(x|z) + beta (log p(z) - log q(z|x))``; the minibatch factor is returned apart.
    :param data_plate: name of the plate over datapoints (:func:`find_data_plate`).
    :returns: ``(log_w, minibatch)``: log weights of shape ``(K, B)`` and the
        :func:`minibatch_factor` ``N / B`` of the data-plate sites (1 outside a training loop),
        which multiplies each datapoint's bound *outside* its logsumexp.
    :raises ValueError: no datapoint plate, a site outside it, or model and guide that disagree
        on latent sites.
    """
    return log_weights_of(model, guide, (data, *args), kwargs, num_particles, max_plate_nesting, scaled, data_plate)


def log_weights_of(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_particles: int,
    max_plate_nesting: Optional[int] = None,
    scaled: bool = False,
    data_plate: str = DATA,
    replay=None,
) -> tuple[torch.Tensor, float]:
    """:func:`per_datapoint_log_weights` of ``model(*args, **kwargs)``: the batch already in
    model arguments (:func:`ppgen.infer.batches.as_batch`).

    :param replay: a trace whose latent values the guide takes instead of drawing (values with
        the particle dim, e.g. one draw repeated along it), to score given draws."""
    check_positive_int("num_particles", num_particles)
    if max_plate_nesting is None:
        max_plate_nesting = plate_nesting_from(model, guide, args, kwargs)
    full = max_plate_nesting + 1
    with DataPlate(data_plate):
        guide_tr = trace_particles(guide, args, kwargs, num_particles, full, replay=replay)
        model_tr = trace_particles(model, args, kwargs, num_particles, full, replay=guide_tr)
    check_same_latents(guide_tr, model_tr)
    log_p, factor, size = log_density(model_tr, full, num_particles, observed=True, scaled=scaled)
    log_q, _, _ = log_density(guide_tr, full, num_particles, observed=False, scaled=scaled)
    # Traces sit in reference cycles (freed only by the garbage collector); drop their tensors now
    # so one particle chunk's activations never outlive it: memory stays flat in K.
    model_tr.nodes.clear()
    guide_tr.nodes.clear()
    if size is None:
        raise ValueError(f"the model has no sample site inside a pyro.plate({data_plate!r}, ...)")
    return log_p - log_q, factor

