"""Which plate of a Pyro model/guide pair holds the datapoints, and how the tools learn its name.

Pyro users name the datapoint plate as they like (``"data"``, ``"obs"``, ``"documents"``).
:func:`find_data_plate` decides it once per call of a tool, by tracing the pair off the random
stream: the plate called ``data_plate=`` (default ``"data"``) if the model has one, else the
single plate whose size is the batch's length; none or several is an error. The name then
travels with the sites: :class:`DataPlate` (and the SVI loop's ``DataScale``, a subclass) records
it in every sample message under :data:`DATA_PLATE_KEY`, and :func:`data_plate_name` reads it
back -- from the site, else from the innermost active ``DataPlate``, else ``"data"``. So the
estimators (iwae/dreg/vimco, the network baselines) need no plate argument of their own.
``DataScale`` also records the minibatch factor ``N / B`` it applied under
:data:`DATA_SCALE_KEY` (read back by :func:`ppgen.infer.traces.minibatch_factor`).

The per-datapoint log weights built on this live in :mod:`ppgen.infer.traces` (which re-exports
every public name here); :func:`plate_nesting_from` gives a pair's ``max_plate_nesting`` from the
same off-stream trace.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample

from ppgen.infer.networks import eval_mode

__all__ = [
    "DATA",
    "DATA_SCALE_KEY",
    "DATA_PLATE_KEY",
    "DataPlate",
    "data_plate_name",
    "find_data_plate",
    "PlateInfo",
    "plate_nesting_from",
]

DATA = "data"
#: message key under which ``ppgen.infer.svi.DataScale`` records the minibatch factor ``N / B``
#: it multiplied into a site's scale (kept outside the logsumexp of per-datapoint bounds).
DATA_SCALE_KEY = "_ppgen_data_scale"
#: message key under which :class:`DataPlate` records the name of the datapoint plate.
DATA_PLATE_KEY = "_ppgen_data_plate"


def _plate_nesting(trace) -> int:
    """The number of vectorized plate dims a trace uses (0 if none)."""
    dims = [
        -f.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for f in site["cond_indep_stack"]
        if f.vectorized and f.dim is not None
    ]
    return max(dims, default=0)


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


def _data_frame(site: dict, name: Optional[str] = None):
    """The frame of the datapoint plate in a site's plate stack, or ``None``: the plate called
    ``name`` if given, else :func:`data_plate_name` of the site."""
    name = data_plate_name(site) if name is None else name
    for frame in site["cond_indep_stack"]:
        if frame.name == name:
            return frame
    return None


def _sample_sites(tr, latent_only: bool):
    """``(name, site)`` of a trace's sample sites (subsample sites left out; observed ones too if
    ``latent_only``)."""
    for name, site in tr.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if latent_only and site["is_observed"]:
            continue
        yield name, site


def _split_at_plate(tr, data_plate: str, latent_only: bool) -> tuple[dict, dict]:
    """Sample sites of a trace outside / inside the plate called ``data_plate``: two
    ``{name: site}`` dicts (e.g. a model's global and local sites)."""
    outside, inside = {}, {}
    for name, site in _sample_sites(tr, latent_only):
        (inside if _data_frame(site, data_plate) is not None else outside)[name] = site
    return outside, inside


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
