"""What :class:`ppgen.infer.autoguide.AmortizedGuide` reads from the model's prototype trace, and
where each of its variational factors starts.

- **Plates.** :func:`model_plates` lists the vectorized plates around the trace's sample sites (an
  unsized ``pyro.plate("data")`` measured by its sites' shapes); :func:`resolve_plate` picks the
  datapoint plate: the one named ``data_plate``, else the single plate whose size is ``len(x)``.
- **Sites.** :func:`discrete_kind` sorts a support into continuous or one of the discrete kinds
  the guide has heads for; :class:`SiteInfo` records what the guide needs of each latent site;
  :func:`read_sites` reads them all from the trace, local or global, with each one's start.
- **Start.** :func:`init_to_mean_or_median` is the default ``init_loc_fn``: the prior's mean
  where it is finite, else its median. A q that starts at the prior mean keeps the model's
  predicted mean at its prior-predictive value wherever the likelihood is linear in the latents
  (Poisson and Gamma rates, as in a deep exponential family); the median of a sparse prior does
  not: ``Gamma(0.1, 0.3)`` has mean 0.33 but median 0.002, and a sparse gamma DEF started at the
  medians scores a held-out ELBO of -3851 nats where AutoNormal starts at -217 (the mean: -224).
  :func:`start_head` makes a local ``q(u | x)`` start at ``N(u0, init_scale^2)`` for every ``x``
  (zero output weights, the start in the biases).
- **Bounds.** For a local latent with a constrained support, :func:`cap_scale` keeps q's
  unconstrained standard deviation below ``max_scale`` (``max * tanh(scale / max)``) and
  :func:`bound_shift` keeps its unconstrained location within ``max_shift`` of its start
  (``u0 + m * tanh((loc - u0) / m)``); both are the identity near the start and only restrict
  the family, so the ELBO stays a bound. Pushed through ``exp``, a draw ``k`` standard deviations
  out multiplies the latent by ``e^(k scale)``. On a sparse gamma DEF at lr 1e-2 the unbounded
  q's of the local Gamma layers reached scales of 22 and locations of -64 in 35 epochs (the
  posterior of a sparse Gamma is itself ~10 wide in log space: ``sqrt(trigamma(0.1)) = 10.1``,
  and each layer's rate divides by the one above, so log-locations add up): draws of
  ``e^(+-60)`` overflowed the Poisson rates (held-out ELBO -3e13) or underflowed, and
  ``d log p / d z = (a - 1) / z`` at a subnormal ``z`` (or ``d (b / m) / d m = -b / m^2`` at
  ``m < 1e-19``) is infinite: a NaN gradient at epoch 37 with a finite loss. A scale cap of 3
  alone delayed it to epoch 110 on one random stream; with the location bound (15) it trained
  200 epochs but with excursions (held-out ELBO -85.2, and -1537 at one epoch of another stream);
  with the cap at 1.5 the example trains smoothly to -76.2 (-72.3 on the other stream; cap 1.0:
  -76.2 there; the hand-written Gamma guide: -73.3). Draws then stay within ``e^(+-25)`` of the
  start, inside float32's safe range.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import pyro
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform

from ppgen.models.posteriors import POSTERIORS
from ppgen.nets import Encoder

__all__ = ["SiteInfo", "Plate", "ModelSites", "model_plates", "resolve_plate", "discrete_kind", "prior_logits", "read_sites",
           "init_to_mean_or_median", "cap_scale", "bound_shift", "start_head", "enter_plates"]


class SiteInfo(NamedTuple):
    """What the guide learned about one latent site of the model from the prototype trace.

    :param name: site name.
    :param local: inside the datapoint plate.
    :param kind: ``"continuous"``, ``"bernoulli"``, ``"categorical"`` or ``"onehot"``.
    :param batch_shape: the site's batch shape in the model trace (data size included).
    :param event_shape: the site's event shape.
    :param frames: ``(name, size, dim)`` of each plate around the site, outermost first.
    :param width: size of the head output (unconstrained dimensions, or logits) per datapoint.
    """

    name: str
    local: bool
    kind: str
    batch_shape: tuple
    event_shape: tuple
    frames: tuple
    width: int


class Plate(NamedTuple):
    """A vectorized plate of the model's prototype trace: ``size`` is ``-1`` for an unsized
    ``pyro.plate(name)``, whose ``extent`` is read from the sites' shapes; ``full_size`` differs
    from ``size`` when the model subsamples."""

    name: str
    dim: int
    size: int
    full_size: Optional[int]
    extent: int


def model_plates(trace) -> dict[str, Plate]:
    """Every vectorized plate around a sample site (latent or observed) of ``trace``, by name."""
    plates: dict[str, Plate] = {}
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        value = site["value"]
        batch_shape = tuple(value.shape[: value.ndim - len(site["fn"].event_shape)]) if torch.is_tensor(value) else ()
        for f in site["cond_indep_stack"]:
            if not f.vectorized:
                continue
            size = int(f.size)
            extent = size if size != -1 else (batch_shape[f.dim] if len(batch_shape) >= -f.dim else 1)
            old = plates.get(f.name)
            if old is not None:
                extent = max(extent, old.extent)
            full = None if f.full_size is None else int(f.full_size)
            plates[f.name] = Plate(f.name, f.dim, size, full, extent)
    return plates


def resolve_plate(trace, batch: int, data_plate: str) -> Plate:
    """The model's datapoint plate: ``data_plate`` by name, else the one plate of size ``batch``
    (``len(x)``); none, several, a size other than ``batch`` or a subsampling plate is a
    ``ValueError`` that says what to write instead."""
    plates = model_plates(trace)
    if data_plate in plates:
        plate = plates[data_plate]
    else:
        fits = [p for p in plates.values() if p.extent == batch]
        if len(fits) == 1:
            plate = fits[0]
        else:
            found = ", ".join(f"{p.name!r} (size {p.extent}, dim {p.dim})" for p in plates.values()) or "none"
            many = f"{len(fits)} plates" if fits else "no plate"
            raise ValueError(
                f"cannot tell which plate holds the datapoints: the model has no pyro.plate({data_plate!r}, ...) "
                f"and {many} of size {batch} (len(x)); plates found: {found}. Pass data_plate=<name> to "
                "AmortizedGuide, or put the latents of each datapoint inside pyro.plate(name, len(x))"
            )
    if plate.extent != batch:
        raise ValueError(
            f"the {plate.name!r} plate has size {plate.extent} but x has {batch} rows; AmortizedGuide "
            "encodes the model's first argument, whose first axis must index the datapoints"
        )
    if plate.size != -1 and plate.full_size not in (None, plate.size):
        raise ValueError(
            f"the {plate.name!r} plate subsamples {plate.size} of {plate.full_size} datapoints; AmortizedGuide "
            f"encodes x as the batch, so write pyro.plate({plate.name!r}, len(x)) and let train_svi scale "
            "the minibatch (it multiplies the data plate's sites by N / B)"
        )
    return plate


def discrete_kind(support, event_shape: tuple) -> Optional[tuple[str, int]]:
    """``(kind, width)`` for a discrete support, ``None`` for a continuous one."""
    base = support.base_constraint if isinstance(support, constraints.independent) else support
    if base is constraints.boolean:
        return "bernoulli", max(1, math.prod(event_shape))
    if isinstance(base, constraints.integer_interval) and not event_shape:
        if base.lower_bound != 0:
            raise ValueError(f"discrete latents must take values 0..K-1, got support {support}")
        return "categorical", int(base.upper_bound) + 1
    if base is constraints.one_hot and len(event_shape) == 1:
        return "onehot", int(event_shape[0])
    if support.is_discrete:
        raise ValueError(
            f"discrete support {support} is not supported by AmortizedGuide; use Bernoulli, Categorical "
            "or OneHotCategorical latents, or write this site's guide by hand"
        )
    return None


def prior_logits(fn, width: int) -> Optional[torch.Tensor]:
    """The batch mean of a discrete prior's logits, flattened to ``(width,)``; ``None`` when the
    distribution does not expose logits of that width."""
    while not hasattr(fn, "logits") and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    try:
        logits = fn.logits.detach()
        return logits.reshape(-1, width).mean(0)
    except (AttributeError, RuntimeError, ValueError):
        return None


class ModelSites(NamedTuple):
    """The latent sites of a prototype trace, as :func:`read_sites` finds them."""

    sites: list  # a SiteInfo per latent site, in trace order
    supports: dict  # site name -> its support
    init: dict  # site name -> its start: the unconstrained init value (continuous) or prior logits (discrete; None if unexposed)
    data_dim: int  # dim of the datapoint plate at the local sites (the plate's own dim when no site is local)


def read_sites(trace, plate: Plate) -> ModelSites:
    """Sort every latent (unobserved, non-subsample) sample site of ``trace`` into local (inside
    ``plate``) or global, continuous or one of :func:`discrete_kind`'s kinds, with where its q
    starts: the site's traced value taken to unconstrained space by ``biject_to(support)``, or
    :func:`prior_logits` for a discrete site. A local site in a second plate, a discrete global
    site, a start on the edge of the support, or local sites at different plate dims is a
    ``ValueError`` that says what to write instead."""
    sites, data_dims, supports, init = [], set(), {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        fn = site["fn"]
        frames = tuple((f.name, int(f.size), f.dim) for f in site["cond_indep_stack"] if f.vectorized)
        frames = tuple(sorted(frames, key=lambda f: f[2]))  # outermost (most negative dim) first
        data = [f for f in frames if f[0] == plate.name]
        event_shape = tuple(fn.event_shape)
        batch_shape = tuple(site["value"].shape[: site["value"].ndim - len(event_shape)])
        local = bool(data)
        if local:
            if len(frames) > 1:
                raise ValueError(
                    f"local site {name!r} sits in plates {[f[0] for f in frames]}; AmortizedGuide encodes "
                    f"sites inside the {plate.name!r} plate only (move other axes into the event with .to_event())"
                )
            data_dims.add(data[0][2])
        kind = discrete_kind(fn.support, event_shape)
        if kind is not None and not local:
            raise ValueError(
                f"global site {name!r} is discrete; AmortizedGuide has variational parameters for "
                "continuous global latents only"
            )
        if kind is None:
            unconstrained = biject_to(fn.support).inverse_shape(event_shape)
            kind = ("continuous", max(1, math.prod(unconstrained)))
            u = biject_to(fn.support).inv(site["value"].detach())
            if not bool(torch.isfinite(u).all()):
                raise ValueError(
                    f"init_loc_fn put site {name!r} on the edge of its support ({fn.support}); pass an "
                    "init_loc_fn that returns interior values (e.g. pyro.infer.autoguide.init_to_feasible)"
                )
            init[name] = u
        else:
            init[name] = prior_logits(fn, kind[1])
        supports[name] = fn.support
        sites.append(SiteInfo(name, local, kind[0], batch_shape, event_shape, frames, kind[1]))
    if len(data_dims) > 1:
        raise ValueError(f"local sites use the {plate.name!r} plate at different dims {sorted(data_dims)}")
    return ModelSites(sites, supports, init, data_dims.pop() if data_dims else plate.dim)


def init_to_mean_or_median(site: dict) -> torch.Tensor:
    """The prior's mean where it is defined, finite and inside the support, else its median
    (Pyro's :func:`~pyro.infer.autoguide.initialization.init_to_median`, ``num_samples=15``):
    the default ``init_loc_fn`` of AmortizedGuide (module docstring)."""
    fn = site["fn"]
    try:
        value = fn.mean.detach()
        if bool(torch.isfinite(value).all()) and bool(fn.support.check(value).all()):
            return value.expand(fn.shape())
    except (NotImplementedError, AttributeError, RuntimeError, ValueError):
        pass
    return init_to_median(site)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``softplus^-1(y)`` for ``y > 0``: ``log(expm1(y))``, written stably for large ``y``."""
    return y + torch.log(-torch.expm1(-y))


def cap_scale(scale: torch.Tensor, max_scale: Optional[float]) -> torch.Tensor:
    """``max_scale * tanh(scale / max_scale)``: below ``max_scale``, the identity for small
    scales (module docstring); ``None`` leaves ``scale`` as it is."""
    return scale if max_scale is None else max_scale * torch.tanh(scale / max_scale)


def bound_shift(loc: torch.Tensor, start: torch.Tensor, max_shift: Optional[float]) -> torch.Tensor:
    """``start + max_shift * tanh((loc - start) / max_shift)``: a location within ``max_shift``
    of its start, the identity near it (module docstring); ``None`` leaves ``loc`` as it is."""
    return loc if max_shift is None else start + max_shift * torch.tanh((loc - start) / max_shift)


def start_head(head: Encoder, posterior: nn.Module, loc0: torch.Tensor, width: int, init_scale: float,
               max_scale: Optional[float] = None) -> None:
    """Make ``q(u | x)`` start at ``N(loc0, init_scale^2 I)`` for every ``x``: zero output
    weights, the start in the biases (the scale bias inverts :func:`cap_scale` when ``max_scale``
    is given). An IAF's steps start with zero output layers, so each is the fixed map
    ``u -> sigmoid(2) u`` (Pyro's stable update with a zero network), and the base Normal starts
    where that composition's inverse takes the target."""
    loc0 = loc0.to(dtype=torch.float32)
    scale0 = torch.full_like(loc0, init_scale)
    if isinstance(posterior, POSTERIORS["iaf"]):
        with torch.no_grad():
            for step in posterior.steps:
                last = step.nn.layers[-1]
                last.weight.zero_()
                last.bias.zero_()
            flow = ComposeTransform(posterior.transforms(torch.zeros(1, width)))
            base_loc = flow.inv(loc0[None])[0]
            base_scale = flow.inv(loc0[None] + scale0[None])[0] - base_loc  # the map is linear
        loc0, scale0 = base_loc, base_scale
    if max_scale is not None:
        scale0 = max_scale * torch.atanh(scale0 / max_scale)
    with torch.no_grad():
        head.loc.weight.zero_()
        head.scale.weight.zero_()
        head.loc.bias.copy_(loc0)
        head.scale.bias.copy_(inverse_softplus(scale0 - 1e-4))  # encoder_features adds 1e-4


class enter_plates:
    """Enter ``pyro.plate(name, size, dim=dim)`` for each frame, outermost first."""

    def __init__(self, frames: tuple):
        self.plates = [pyro.plate(name, *((size,) if size != -1 else ()), dim=dim) for name, size, dim in frames]

    def __enter__(self):
        for p in self.plates:
            p.__enter__()

    def __exit__(self, *exc):
        for p in reversed(self.plates):
            p.__exit__(*exc)
