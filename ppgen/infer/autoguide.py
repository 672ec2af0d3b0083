"""Amortized automatic guide: write only the model, get an encoder guide for every local latent.

Pyro's autoguides (``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal``) learn one set of
variational parameters per latent *value*, so a model with one latent per datapoint gets one set
of parameters per datapoint. :class:`AmortizedGuide` instead learns an encoder ``x -> q(z | x)``
(amortized inference; Kingma & Welling 2014, Rezende et al. 2014).

It traces the model once on a batch (its first argument, ``x`` of shape ``(B, ...)``) and splits
the latent sites:

- **local** latents, inside the datapoint plate (``pyro.plate("data", B)``, another name given by
  ``data_plate=``, or else the one plate whose size is ``B``; unsized ``pyro.plate("data")``, as
  Pyro's own CVAE and semi-supervised VAE examples write it, counts by the size of its sites, and
  the guide's plate stays unsized so Pyro sees the same frame in both): one head per site on a
  shared encoder trunk  over the flattened observation ``x.reshape(B, -1)``. A continuous site gets a posterior family
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

**Initialization** follows Pyro's ``AutoNormal``: the model is traced once under ``init_loc_fn``
(default :func:`~ppgen.infer.autoguide_init.init_to_mean_or_median`: the prior mean where it is
finite, else the median; a sparse Gamma's median starts a deep exponential family's rates near
zero, :mod:`ppgen.infer.autoguide_init`), and every continuous q
starts centred on that value in unconstrained space with standard deviation ``init_scale`` (0.1),
whatever the magnitude of ``x``: the output heads start with zero weights and carry the start in
their biases (the batch mean of each local site's unconstrained init value), IAF steps start as a
fixed contraction that the base Normal's start undoes, and discrete heads start at the prior's
logits. The default MLP trunk reads ``x`` centred per feature and divided by one pooled standard
deviation (constants fixed on the first batch), and caps the size of its features
(:meth:`AmortizedGuide._features`). Before, random output heads on raw ``x`` started far from the
prior (positive draws of mean 24 and sd 29 on data of magnitude 10) and the loss went NaN at
epoch 2 at lr 1e-2 (issue 16). A local latent with a constrained support has its unconstrained
scale capped at ``max_scale`` (1.5) and its location kept within ``max_shift`` (15) of its start:
on a sparse gamma DEF at lr 1e-2 the unbounded scales grew to 22 and locations to -64, and
``exp`` of the draws overflowed and underflowed the model's arithmetic (a NaN gradient at epoch 37).
Plates, the latent sites read from the trace and the start of each factor live in
:mod:`ppgen.infer.autoguide_init`.

The result is a plain Pyro guide ``guide(x, *args, **kwargs)``: the SVI loop, every estimator
(score-function ones mark its sites non-reparameterized from outside), the evidence tools and the
variance lab take it unchanged.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import ReshapeTransform
from pyro.infer.autoguide.initialization import InitMessenger
from torch import nn
from torch.distributions import biject_to
from torch.nn import functional as F

from ppgen.infer.autoguide_init import (
    SiteInfo,
    bound_shift,
    cap_scale,
    enter_plates,
    init_to_mean_or_median,
    read_sites,
    resolve_plate,
    start_head,
)
from ppgen.models.posteriors import encoder_features, make_posterior, POSTERIORS
from ppgen.nets import Encoder, mlp

__all__ = ["AmortizedGuide", "SiteInfo", "DATA_PLATE"]

DATA_PLATE = "data"
DISCRETE_MODES = ("enumerate", "score")
FEATURE_RMS = 3.0  # cap on the root mean square of a row of trunk features (AmortizedGuide._features)


class AmortizedGuide(nn.Module):
    """An amortized encoder guide built from the model (module docstring).

    :param model: Pyro model ``model(x, *args, **kwargs)`` with its datapoints in a plate of
        ``len(x)`` (``pyro.plate("data", len(x))``, or unsized ``pyro.plate("data")``).
    :param encoder: optional trunk ``nn.Module`` mapping the flattened observation ``(B, D)`` to
        features ``(B, H)`` (e.g. :class:`ppgen.nets.ConvTrunk`); default ``mlp([D, *hidden])``.
    :param family: posterior family of continuous local latents: ``"diag"``, ``"fullcov"`` or
        ``"iaf"`` (:data:`ppgen.models.posteriors.POSTERIORS`); a one-dimensional site gets
        ``"diag"`` under ``"iaf"`` (an affine flow on one dimension is the diagonal Normal).
    :param hidden: hidden widths of the default MLP trunk.
    :param flows: IAF steps (``family="iaf"``).
    :param discrete: ``"enumerate"`` or ``"score"`` for discrete local latents.
    :param init_scale: initial standard deviation, in unconstrained space, of every continuous q
        (local and global), as ``AutoNormal``'s ``init_scale``.
    :param init_loc_fn: ``site -> value`` (constrained, the site's shape) where each continuous q
        starts, as Pyro's autoguides take it; default
        :func:`~ppgen.infer.autoguide_init.init_to_mean_or_median` (the prior's mean where it is
        finite, else its median; a sparse Gamma's median is near zero, a poor start). Discrete
        sites are drawn from their prior while tracing.
    :param max_scale: cap on the standard deviation, in unconstrained space, of q for a local
        latent whose support is constrained (positive, bounded, simplex): ``max_scale *
        tanh(scale / max_scale)`` (:func:`~ppgen.infer.autoguide_init.cap_scale`: draws pushed
        through ``exp`` far out in a wide q overflow or underflow the model's arithmetic);
        ``None`` for no cap. Real-valued sites are never capped.
    :param max_shift: how far, in unconstrained units, the location of q for such a site may move
        from its start: ``u0 + max_shift * tanh((loc - u0) / max_shift)``
        (:func:`~ppgen.infer.autoguide_init.bound_shift`); ``None`` for no bound.
    :param data_plate: name of the plate that indexes the datapoints (the rows of ``x``). When
        the model has no plate of that name, the one plate whose size is ``len(x)`` is used;
        none or several is a ``ValueError``.
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
        *,
        init_loc_fn: Optional[Callable] = None,
        data_plate: str = DATA_PLATE,
        max_scale: Optional[float] = 1.5,
        max_shift: Optional[float] = 15.0,
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
        if isinstance(init_scale, bool) or not (isinstance(init_scale, (int, float)) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if max_scale is not None and (isinstance(max_scale, bool) or not isinstance(max_scale, (int, float))
                                      or not init_scale < max_scale):
            raise ValueError(f"max_scale must be None or a number above init_scale ({init_scale}), got {max_scale!r}")
        if max_shift is not None and (isinstance(max_shift, bool) or not isinstance(max_shift, (int, float))
                                      or not max_shift > 0):
            raise ValueError(f"max_shift must be None or a positive number, got {max_shift!r}")
        if init_loc_fn is not None and not callable(init_loc_fn):
            raise TypeError(
                f"init_loc_fn must be a callable site -> value (e.g. pyro.infer.autoguide.init_to_mean), "
                f"got {type(init_loc_fn).__name__}"
            )
        if not isinstance(data_plate, str) or not data_plate:
            raise TypeError(f"data_plate must be the name of the model's datapoint plate (a str), got {data_plate!r}")
        object.__setattr__(self, "model", model)  # not a submodule: its parameters are the model's
        self.family, self.hidden, self.flows = family, tuple(hidden), int(flows)
        self.discrete, self.init_scale, self.name = discrete, float(init_scale), name
        self.init_loc_fn = init_loc_fn if init_loc_fn is not None else init_to_mean_or_median
        self.max_scale = None if max_scale is None else float(max_scale)
        self.max_shift = None if max_shift is None else float(max_shift)
        self.data_plate = data_plate
        self.trunk = encoder
        self.heads = nn.ModuleDict()  # site index -> Encoder head (loc/scale) or Linear logits head
        self.posteriors = nn.ModuleDict()  # site index -> posterior family module
        self.loc_start = nn.ParameterDict()  # site index -> start of a bounded head's loc (never trained)
        self.global_loc = nn.ParameterList()
        self.global_scale = nn.ParameterList()  # softplus^-1 of the scale
        self.sites: list[SiteInfo] = []
        self.x_dim: Optional[int] = None
        self.data_dim: Optional[int] = None
        self.plate_name: str = data_plate  # the model's datapoint plate, resolved by setup()
        self.plate_sized = True  # False: the model's plate is unsized, and so is the guide's

    # ------------------------------------------------------------------ building
    @property
    def built(self) -> bool:
        return self.x_dim is not None

    def _init_value(self, site) -> torch.Tensor:
        """Where a site starts: ``init_loc_fn`` for continuous sites, a prior draw for discrete ones."""
        if site["fn"].support.is_discrete:
            return site["fn"].sample()
        return self.init_loc_fn(site)

    def setup(self, x: torch.Tensor, *args, **kwargs) -> "AmortizedGuide":
        """Trace the model on ``x`` (shape ``(B, ...)``) under ``init_loc_fn`` and build the
        encoder and parameters, each q starting at its site's init value (module docstring)."""
        self._check_x(x)
        with torch.no_grad():
            traced = poutine.trace(InitMessenger(self._init_value)(self.model))
            trace = poutine.block(traced.get_trace)(x, *args, **kwargs)
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        plate = resolve_plate(trace, batch, self.data_plate)
        sites, supports, init, self.data_dim = read_sites(trace, plate)
        self.plate_name, self.plate_sized = plate.name, plate.size != -1
        self._supports = supports
        self._build(flat, sites, init)
        self.sites, self.x_dim = sites, flat.shape[1]
        return self

    def _build(self, flat: torch.Tensor, sites: list[SiteInfo], init: dict) -> None:
        device, dtype = flat.device, flat.dtype
        if self.trunk is None:
            self.trunk = mlp([flat.shape[1], *self.hidden])
            # The default trunk reads x centred per feature and divided by one pooled standard
            # deviation, both fixed here: Adam moves each first-layer weight by ~lr a step, so on raw
            # inputs of magnitude 10 the features, and every head, jumped by ~lr * |x| * width.
            # Kept as parameters so checkpoints carry them; forward() detaches them (never trained).
            with torch.no_grad():
                shift = flat.mean(0)
                pooled = float(flat.var(0, unbiased=False).mean().sqrt()) if len(flat) > 1 else 0.0
                if not (math.isfinite(pooled) and pooled > 0):
                    pooled = float(flat.abs().max()) or 1.0
            self.x_shift = nn.Parameter(shift.clone())
            self.x_scale = nn.Parameter(flat.new_tensor(pooled))
        self.trunk.to(device=device, dtype=dtype)
        try:
            with torch.no_grad():
                h = self.trunk(self._standardize(flat[:2]))
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"the encoder cannot take the flattened observation of shape {tuple(flat.shape)}: {err}"
            ) from None
        if h.ndim != 2 or h.shape[0] != len(flat[:2]):
            raise ValueError(f"the encoder must map (B, D) to (B, H), got output shape {tuple(h.shape)}")
        width = h.shape[1]
        raw_scale = math.log(math.expm1(self.init_scale))
        for i, s in enumerate(sites):
            key = str(i)
            if not s.local:
                loc = init[s.name].to(device=device, dtype=dtype).clone()
                self.global_loc.append(nn.Parameter(loc))
                self.global_scale.append(nn.Parameter(torch.full(loc.shape, raw_scale, device=device, dtype=dtype)))
            elif s.kind == "continuous":
                head = Encoder(nn.Identity(), width, s.width, width)
                # a flow on one dimension is one affine map: the diagonal family already is that
                family = "diag" if self.family == "iaf" and s.width < 2 else self.family
                posterior = make_posterior(family, s.width, width, self.flows)
                loc0 = init[s.name].reshape(-1, s.width).mean(0)  # batch mean of the unconstrained init
                start_head(head, posterior, loc0, width, self.init_scale, self._cap(s))
                if self._cap(s) is not None and self.max_shift is not None:  # kept in checkpoints
                    self.loc_start[key] = nn.Parameter(head.loc.bias.detach().clone())
                self.heads[key] = head.to(device=device, dtype=dtype)
                self.posteriors[key] = posterior.to(device=device, dtype=dtype)
            else:
                head = nn.Linear(width, s.width)
                with torch.no_grad():
                    head.weight.zero_()
                    logits = init[s.name]
                    head.bias.copy_(logits if logits is not None else torch.zeros(s.width))
                self.heads[key] = head.to(device=device, dtype=dtype)

    def _cap(self, site: SiteInfo) -> Optional[float]:
        """The scale cap of a local continuous site: ``max_scale`` for a constrained support."""
        return None if self._transform(site) is None else self.max_scale

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

    def _standardize(self, flat: torch.Tensor) -> torch.Tensor:
        """What the default trunk reads: ``(x - shift) / scale`` (constants fixed by :meth:`setup`)."""
        if getattr(self, "x_scale", None) is None:
            return flat
        return (flat - self.x_shift.detach()) / self.x_scale.detach()

    def _features(self, flat: torch.Tensor) -> torch.Tensor:
        """The trunk's features ``h (B, H)``, each row scaled down to a root mean square of at
        most :data:`FEATURE_RMS` (3): unchanged while the features stay moderate, capped when the
        trunk's weights grow. Adam moves each head weight by ~lr a step, so a head's output moves
        by up to ~``lr * sum|h|``; uncapped features of magnitude 30-70 moved the heads by tens per
        step and sent q's scale to ~40 (a loss of 1e10, then NaN, at epoch 43 of the issue-16
        model at lr 1e-2). Layer normalization bounds them too but discards each row's overall
        magnitude, which a posterior mean linear in x needs (the linear-Gaussian fullcov ELBO gap
        grew from 0.05 to 0.21 nats); a cap at rms 1 slowed sharp discrete heads (mixture gap
        0.015-0.029 against 0.009-0.016 at 3)."""
        h = F.relu(self.trunk(self._standardize(flat)))
        return h / (h.pow(2).mean(-1, keepdim=True).sqrt() / FEATURE_RMS).clamp(min=1.0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> dict:
        """Sample every latent site of the model; returns ``{site name: value}``."""
        if not self.built:
            self.setup(x, *args, **kwargs)
        self._check_x(x)
        pyro.module(self.name, self)
        batch = x.shape[0]
        h = self._features(x.reshape(batch, -1))
        values, g = {}, 0
        for s in self.sites:  # global latents first, each in its own plates
            if not s.local:
                with enter_plates(s.frames):
                    values[s.name] = pyro.sample(s.name, self._global_dist(s, g))
                g += 1
        if any(s.local for s in self.sites):
            # one plate for every local latent, mirroring the model's (an unsized one stays unsized)
            size = (batch,) if self.plate_sized else ()
            with pyro.plate(self.plate_name, *size, dim=self.data_dim):
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
            scale = cap_scale(scale, self._cap(s))
            if key in self.loc_start:
                loc = bound_shift(loc, self.loc_start[key].detach(), self.max_shift)
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

