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

Which plate holds the datapoints. Pyro users name it as they like (``"data"``, ``"obs"``,
``"documents"``). :func:`find_data_plate` decides it once per call of a tool, by tracing the pair
off the random stream: the plate called ``data_plate=`` (default ``"data"``) if the model has
one, else the single plate whose size is the batch's length; none or several is an error. The
name then travels with the sites: :class:`DataPlate` (and the SVI loop's ``DataScale``, a
subclass) records it in every sample message under :data:`DATA_PLATE_KEY`, and
:func:`data_plate_name` reads it back -- from the site, else from the innermost active
``DataPlate``, else ``"data"``. So the estimators (iwae/dreg/vimco, the network baselines) need
no plate argument of their own.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample

from ppgen.infer.networks import eval_mode

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

DATA = "data"
#: message key under which ``ppgen.infer.svi.DataScale`` records the minibatch factor ``N / B``
#: it multiplied into a site's scale (kept outside the logsumexp of per-datapoint bounds).
DATA_SCALE_KEY = "_ppgen_data_scale"
#: message key under which :class:`DataPlate` records the name of the datapoint plate.
DATA_PLATE_KEY = "_ppgen_data_plate"
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


class DataPlate(Messenger):
    """Record in every sample message that the plate named ``name`` holds the datapoints
    (``msg[DATA_PLATE_KEY]``), for the tools that read per-datapoint terms from traces.

    :param name: the datapoint plate's name, as :func:`find_data_plate` resolved it.
    """

    def __init__(self, name: str = DATA):
        if not isinstance(name, str) or not name:
            raise TypeError(f"data_plate must be a plate name (a non-empty str), got {name!r}")
        super().__init__()
        self.data_plate = name

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample":
            msg.setdefault(DATA_PLATE_KEY, self.data_plate)


def data_plate_name(site: Optional[dict] = None) -> str:
    """The datapoint plate's name: recorded in ``site`` by a :class:`DataPlate`, else that of the
    innermost active :class:`DataPlate` handler, else ``"data"``."""
    if site is not None and DATA_PLATE_KEY in site:
        return site[DATA_PLATE_KEY]
    for handler in reversed(_PYRO_STACK):
        if isinstance(handler, DataPlate):
            return handler.data_plate
    return DATA


def _data_frame(site: dict):
    name = data_plate_name(site)
    for frame in site["cond_indep_stack"]:
        if frame.name == name:
            return frame
    return None


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


def _trace_pair(model: Callable, guide: Callable, args: tuple, kwargs: dict):
    """Guide and replayed model traces, taken off the caller's random stream, without gradients
    and with the networks the callables reach in eval mode (a throwaway trace must not move
    BatchNorm statistics, and a one-row probe must not trip BatchNorm's train-mode check)."""
    cuda = [a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=cuda[:1]), \
            eval_mode(model, guide, registered=False):
        g = poutine.trace(guide).get_trace(*args, **kwargs)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args, **kwargs)
    return g, m


def plate_nesting_from(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    """The number of plate dims of the pair (Pyro's ``max_plate_nesting``), found by one trace
    off the random stream."""
    g, m = _trace_pair(model, guide, args, kwargs)
    return max(_plate_nesting(g), _plate_nesting(m))


class PlateInfo(NamedTuple):
    """What :func:`find_data_plate` found.

    :param data_plate: the datapoint plate's name (``None`` when not required and not found).
    :param nesting: the pair's plate dims (``max_plate_nesting``).
    :param plates: ``{name: sizes}`` of the plates around the model's observed sites.
    """

    data_plate: Optional[str]
    nesting: int
    plates: dict


def _frame_sizes(site: dict) -> list[tuple[str, int]]:
    """``(name, size)`` of the plates of a site (sequential ``for i in pyro.plate(...)`` ones
    too); an unsized plate (``pyro.plate("data")``, size -1) gets the size of the site's batch
    shape at its dim."""
    out = []
    value = site["value"]
    batch_ndim = value.ndim - len(getattr(site["fn"], "event_shape", ())) if isinstance(value, torch.Tensor) else 0
    for frame in site["cond_indep_stack"]:
        size = frame.size
        if size == -1 and frame.dim is not None and -frame.dim <= batch_ndim:
            size = value.shape[batch_ndim + frame.dim]
        out.append((frame.name, int(size)))
    return out


def find_data_plate(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    size: int,
    name: str = DATA,
    required: bool = True,
) -> PlateInfo:
    """Which plate of ``model``/``guide`` holds the datapoints of a batch of ``size`` rows.

    One trace of the pair on ``model(*args, **kwargs)``, off the random stream and in eval mode.
    The candidates are the plates around the model's observed sites. The plate called ``name``
    is chosen if it is among them; otherwise the single one whose size equals ``size`` (an
    unsized ``pyro.plate(name)`` counts with the size it broadcast to).

    :param args: model arguments of one batch (see :func:`ppgen.infer.batches.as_batch`).
    :param kwargs: keyword model arguments of the batch.
    :param size: ``B``, the batch's number of datapoints.
    :param name: the plate name the user gave (``data_plate=``), default ``"data"``.
    :param required: raise when no single plate is found (else ``data_plate`` is ``None``).
    :returns: :class:`PlateInfo`.
    :raises TypeError: ``name`` is not a string.
    :raises ValueError: (``required``) no plate, or several plates, of ``size`` around the
        observations; or a guide whose latent sites of batch size sit in another plate.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"data_plate must be a plate name (a non-empty str), got {name!r}")
    g, m = _trace_pair(model, guide, args, kwargs)
    nesting = max(_plate_nesting(g), _plate_nesting(m))
    plates: dict = {}
    for site in m.nodes.values():
        if site["type"] == "sample" and site["is_observed"] and not site_is_subsample(site):
            for plate, n in _frame_sizes(site):
                plates.setdefault(plate, set()).add(n)
    chosen = None
    if name in plates:
        chosen = name
    else:
        fits = sorted(p for p, sizes in plates.items() if size in sizes)
        if len(fits) == 1:
            chosen = fits[0]
        elif required:
            seen = ", ".join(f"{p!r} (size {'/'.join(map(str, sorted(n)))})" for p, n in plates.items()) or "none"
            if fits:
                raise ValueError(
                    f"the model has no plate named {name!r} and several plates of the batch's size {size} "
                    f"around its observations: {fits}; say which one holds the datapoints with "
                    f"data_plate=<name>"
                )
            raise ValueError(
                f"the model has no plate named {name!r} and no plate of the batch's size {size} around its "
                f"observations (plates seen: {seen}). Minibatch scaling and per-datapoint evidence need the "
                f"datapoints in a plate: wrap them in pyro.plate({name!r}, len(x)), or pass data_plate=<name>"
            )
    if chosen is not None:
        for label, site in g.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            frames = dict(_frame_sizes(site))
            stray = [p for p, n in frames.items() if n == size and p not in plates]
            if chosen not in frames and stray:
                raise ValueError(
                    f"the model's datapoints are in plate {chosen!r}, but the guide's site {label!r} is in "
                    f"plate {stray[0]!r} of the same size and not in {chosen!r}: the minibatch scale would "
                    f"reach the model's terms and not the guide's. Give both plates the same name"
                )
    return PlateInfo(chosen, nesting, plates)
