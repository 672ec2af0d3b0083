"""Amortized automatic guide: write only the model, get an encoder guide for every local latent.

Pyro's autoguides (``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal``) learn one set of
variational parameters per latent *value*, so a model with one latent per datapoint gets one set
of parameters per datapoint. :class:`AmortizedGuide` instead learns an encoder ``x -> q(z | x)``
(amortized inference; Kingma & Welling 2014, Rezende et al. 2014).

It traces the model once on a batch (its first argument, ``x`` of shape ``(B, ...)``) and splits
the latent sites:

- **local** latents, inside ``pyro.plate("data", B)``: one head per site on a shared encoder trunk
  over the flattened observation ``x.reshape(B, -1)``. A continuous site gets a posterior family
  of :mod:`ppgen.models.posteriors` (``diag``, ``fullcov`` or ``iaf``) on its unconstrained
  values (flattened to a vector), pushed through ``biject_to(site.support)`` so positive, simplex
  or bounded latents stay in their support. Sites are independent given ``x`` (mean field across
  sites; the family sets the dependence within a site).
- **discrete** local latents (Bernoulli, Categorical, OneHotCategorical supports): a logits head;
  the site is marked ``infer={"enumerate": "parallel"}`` (``discrete="enumerate"``, exact sum
  under the ``enum`` estimator) or given a decaying-average baseline for the score-function
  gradient (``discrete="score"``; Williams 1992; Mnih & Gregor 2014).
- **global** latents (outside the data plate): a Normal on the unconstrained value with its own
  ``loc`` and positive ``scale`` per element, pushed through ``biject_to`` (Pyro's AutoNormal
  style; Kucukelbir et al. 2017).

The result is a plain Pyro guide ``guide(x, *args, **kwargs)``: the SVI loop, every estimator
(score-function ones mark its sites non-reparameterized from outside), the evidence tools and the
variance lab take it unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import ReshapeTransform
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to
from torch.nn import functional as F

from ppgen.models.posteriors import POSTERIORS, encoder_features, make_posterior
from ppgen.nets import Encoder, mlp

__all__ = ["AmortizedGuide", "SiteInfo", "DATA_PLATE"]

DATA_PLATE = "data"
DISCRETE_MODES = ("enumerate", "score")


class SiteInfo(NamedTuple):
    """What the guide learned about one latent site of the model from the prototype trace.

    :param name: site name.
    :param local: inside the ``"data"`` plate.
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


def _discrete_kind(support, event_shape: tuple) -> Optional[tuple[str, int]]:
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


class AmortizedGuide(nn.Module):
    """An amortized encoder guide built from the model (module docstring).

    :param model: Pyro model ``model(x, *args, **kwargs)`` with its datapoints in
        ``pyro.plate("data", len(x))``.
    :param encoder: optional trunk ``nn.Module`` mapping the flattened observation ``(B, D)`` to
        features ``(B, H)`` (e.g. :class:`ppgen.nets.ConvTrunk`); default ``mlp([D, *hidden])``.
    :param family: posterior family of continuous local latents: ``"diag"``, ``"fullcov"`` or
        ``"iaf"`` (:data:`ppgen.models.posteriors.POSTERIORS`); a one-dimensional site gets
        ``"diag"`` under ``"iaf"`` (an affine flow on one dimension is the diagonal Normal).
    :param hidden: hidden widths of the default MLP trunk.
    :param flows: IAF steps (``family="iaf"``).
    :param discrete: ``"enumerate"`` or ``"score"`` for discrete local latents.
    :param init_scale: initial standard deviation of the global latents' Normals.
    :param name: Pyro module name the parameters are registered under.

    The guide is built on its first call (or by :meth:`setup`), on the device of ``x``.
    """

    def __init__(
        self,
        model: Callable,
        encoder: Optional[nn.Module] = None,
        family: str = "diag",
        hidden: Sequence[int] = (400,),
        flows: int = 2,
        discrete: str = "enumerate",
        init_scale: float = 0.1,
        name: str = "autoguide",
    ):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if family not in POSTERIORS:
            raise ValueError(f"unknown family {family!r}; choose one of {', '.join(POSTERIORS)}")
        if discrete not in DISCRETE_MODES:
            raise ValueError(f"discrete must be one of {', '.join(DISCRETE_MODES)}, got {discrete!r}")
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module trunk (B, D) -> (B, H), got {type(encoder).__name__}")
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"hidden must be positive integer widths, got {hidden!r}")
        if not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        object.__setattr__(self, "model", model)  # not a submodule: its parameters are the model's
        self.family, self.hidden, self.flows = family, tuple(hidden), int(flows)
        self.discrete, self.init_scale, self.name = discrete, float(init_scale), name
        self.trunk = encoder
        self.heads = nn.ModuleDict()  # site index -> Encoder head (loc/scale) or Linear logits head
        self.posteriors = nn.ModuleDict()  # site index -> posterior family module
        self.global_loc = nn.ParameterList()
        self.global_scale = nn.ParameterList()  # softplus^-1 of the scale
        self.sites: list[SiteInfo] = []
        self.x_dim: Optional[int] = None
        self.data_dim: Optional[int] = None

    # ------------------------------------------------------------------ building
    @property
    def built(self) -> bool:
        return self.x_dim is not None

    def setup(self, x: torch.Tensor, *args, **kwargs) -> "AmortizedGuide":
        """Trace the model on ``x`` (shape ``(B, ...)``) and build the encoder and parameters."""
        self._check_x(x)
        with torch.no_grad():
            trace = poutine.block(poutine.trace(self.model).get_trace)(x, *args, **kwargs)
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        sites, data_dims, supports = [], set(), {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            fn = site["fn"]
            frames = tuple((f.name, f.size, f.dim) for f in site["cond_indep_stack"] if f.vectorized)
            frames = tuple(sorted(frames, key=lambda f: f[2]))  # outermost (most negative dim) first
            data = [f for f in frames if f[0] == DATA_PLATE]
            event_shape = tuple(fn.event_shape)
            batch_shape = tuple(site["value"].shape[: site["value"].ndim - len(event_shape)])
            local = bool(data)
            if local:
                if data[0][1] != batch:
                    raise ValueError(
                        f"the {DATA_PLATE!r} plate has size {data[0][1]} but x has {batch} rows; AmortizedGuide "
                        "encodes the model's first argument, whose first axis must index the datapoints"
                    )
                if len(frames) > 1:
                    raise ValueError(
                        f"local site {name!r} sits in plates {[f[0] for f in frames]}; AmortizedGuide encodes "
                        f"sites inside the {DATA_PLATE!r} plate only (move other axes into the event with .to_event())"
                    )
                data_dims.add(data[0][2])
            kind = _discrete_kind(fn.support, event_shape)
            if kind is not None and not local:
                raise ValueError(
                    f"global site {name!r} is discrete; AmortizedGuide has variational parameters for "
                    "continuous global latents only"
                )
            if kind is None:
                unconstrained = biject_to(fn.support).inverse_shape(event_shape)
                kind = ("continuous", max(1, math.prod(unconstrained)))
            supports[name] = fn.support
            sites.append(SiteInfo(name, local, kind[0], batch_shape, event_shape, frames, kind[1]))
        if not any(s.local for s in sites):
            has_plate = any(
                f.name == DATA_PLATE for s in trace.nodes.values() if s["type"] == "sample" for f in s["cond_indep_stack"]
            )
            if not has_plate:
                raise ValueError(
                    f"the model has no pyro.plate({DATA_PLATE!r}, ...) around a latent site; AmortizedGuide "
                    f"needs the latents of each datapoint inside pyro.plate({DATA_PLATE!r}, len(x))"
                )
        if len(data_dims) > 1:
            raise ValueError(f"local sites use the {DATA_PLATE!r} plate at different dims {sorted(data_dims)}")
        self.data_dim = data_dims.pop() if data_dims else -1
        self._supports = supports
        self._build(flat, sites)
        self.sites, self.x_dim = sites, flat.shape[1]
        return self

    def _build(self, flat: torch.Tensor, sites: list[SiteInfo]) -> None:
        device, dtype = flat.device, flat.dtype
        if self.trunk is None:
            self.trunk = mlp([flat.shape[1], *self.hidden])
        self.trunk.to(device=device, dtype=dtype)
        try:
            with torch.no_grad():
                h = self.trunk(flat[:2])
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"the encoder cannot take the flattened observation of shape {tuple(flat.shape)}: {err}"
            ) from None
        if h.ndim != 2 or h.shape[0] != len(flat[:2]):
            raise ValueError(f"the encoder must map (B, D) to (B, H), got output shape {tuple(h.shape)}")
        width = h.shape[1]
        for i, s in enumerate(sites):
            key = str(i)
            if not s.local:
                shape = s.batch_shape + tuple(biject_to(self._supports[s.name]).inverse_shape(s.event_shape))
                self.global_loc.append(nn.Parameter(torch.zeros(shape, device=device, dtype=dtype)))
                raw = math.log(math.expm1(self.init_scale))
                self.global_scale.append(nn.Parameter(torch.full(shape, raw, device=device, dtype=dtype)))
            elif s.kind == "continuous":
                self.heads[key] = Encoder(nn.Identity(), width, s.width, width).to(device=device, dtype=dtype)
                # a flow on one dimension is one affine map: the diagonal family already is that
                family = "diag" if self.family == "iaf" and s.width < 2 else self.family
                self.posteriors[key] = make_posterior(family, s.width, width, self.flows).to(device=device, dtype=dtype)
            else:
                self.heads[key] = nn.Linear(width, s.width).to(device=device, dtype=dtype)

    def _transform(self, site: SiteInfo):
        """``biject_to`` of the site's support, or ``None`` for an unconstrained (real) site."""
        support = self._supports[site.name]
        base = support
        while isinstance(base, constraints.independent):
            base = base.base_constraint
        return None if base is constraints.real else biject_to(support)

    # ------------------------------------------------------------------ the guide
    def _check_x(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"AmortizedGuide encodes the model's first argument, which must be a tensor; got {type(x).__name__}")
        if x.ndim < 1 or x.shape[0] < 1:
            raise ValueError(f"x must have shape (batch, ...) with batch >= 1, got {tuple(x.shape)}")
        if self.built and x[0].numel() != self.x_dim:
            raise ValueError(
                f"the encoder takes observations of {self.x_dim} values (flattened), got x of shape {tuple(x.shape)}"
            )

    def forward(self, x: torch.Tensor, *args, **kwargs) -> dict:
        """Sample every latent site of the model; returns ``{site name: value}``."""
        if not self.built:
            self.setup(x, *args, **kwargs)
        self._check_x(x)
        pyro.module(self.name, self)
        batch = x.shape[0]
        h = F.relu(self.trunk(x.reshape(batch, -1)))
        values, g = {}, 0
        for s in self.sites:  # global latents first, each in its own plates
            if not s.local:
                with _plates(s.frames):
                    values[s.name] = pyro.sample(s.name, self._global_dist(s, g))
                g += 1
        if any(s.local for s in self.sites):
            with pyro.plate(DATA_PLATE, batch, dim=self.data_dim):  # one plate for every local latent
                for i, s in enumerate(self.sites):
                    if s.local:
                        fn, infer = self._local_dist(s, str(i), h)
                        values[s.name] = pyro.sample(s.name, fn, infer=infer)
        return values

    def _global_dist(self, s: SiteInfo, g: int) -> dist.TorchDistribution:
        transform = self._transform(s)
        u_event = len(s.event_shape) if transform is None else len(transform.inverse_shape(s.event_shape))
        loc, scale = self.global_loc[g], F.softplus(self.global_scale[g]) + 1e-6
        base = dist.Normal(loc, scale).to_event(u_event)
        return base if transform is None else dist.TransformedDistribution(base, [transform])

    def _local_dist(self, s: SiteInfo, key: str, h: torch.Tensor) -> tuple[dist.TorchDistribution, dict]:
        lead = (-1,) + (1,) * (-self.data_dim - 1)  # (B, 1, ..., 1): the data axis at data_dim
        if s.kind == "continuous":
            loc, scale, feats = encoder_features(self.heads[key], h)
            loc, scale, feats = (t.reshape(*lead, t.shape[-1]) for t in (loc, scale, feats))
            base = self.posteriors[key](loc, scale, feats)  # event (d,)
            transform = self._transform(s)
            u_shape = s.event_shape if transform is None else tuple(transform.inverse_shape(s.event_shape))
            steps = [] if u_shape == (s.width,) else [ReshapeTransform((s.width,), u_shape)]
            if transform is not None:
                steps.append(transform)
            return (dist.TransformedDistribution(base, steps) if steps else base), {}
        logits = self.heads[key](h).reshape(*lead, s.width)
        if s.kind == "bernoulli":
            fn = dist.Bernoulli(logits=logits.reshape(*lead, *s.event_shape) if s.event_shape else logits.squeeze(-1))
            fn = fn.to_event(len(s.event_shape)) if s.event_shape else fn
        elif s.kind == "categorical":
            fn = dist.Categorical(logits=logits)
        else:
            fn = dist.OneHotCategorical(logits=logits)
        if self.discrete == "enumerate":
            return fn, {"enumerate": "parallel"}
        return fn, {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.95}}


class _plates:
    """Enter ``pyro.plate(name, size, dim=dim)`` for each frame, outermost first."""

    def __init__(self, frames: tuple):
        self.plates = [pyro.plate(name, size, dim=dim) for name, size, dim in frames]

    def __enter__(self):
        for p in self.plates:
            p.__enter__()

    def __exit__(self, *exc):
        for p in reversed(self.plates):
            p.__exit__(*exc)
