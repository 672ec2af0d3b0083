"""Estimator conformance matrix (issue 15): every registered estimator x guide kind x particles x
model layout either matches the exact gradient of its own objective, or refuses with a
``ValueError`` naming an alternative. Never silently wrong.

Shared by ``tests/infer/test_conformance.py`` (one pytest item per cell) and the table writer::

    python tests/infer/conformance.py --write docs/conformance.md

**Cells.** ``estimator`` runs over :data:`ppgen.infer.estimators.ESTIMATORS` as it is at import
time (new entries are covered when they land). Guide kinds:

- ``user``: per-datapoint ``pyro.param`` locals (a global ``pyro.param`` pair where the model has a
  global latent), the way Pyro's tutorials write a guide;
- ``encoder``: a hand-written amortized guide, :class:`ppgen.nets.Encoder` + diagonal Normal, as
  :class:`ppgen.models.vae.VAE` writes it;
- ``fullcov`` / ``iaf``: the same encoder guide with the ``fullcov`` or ``iaf`` family of
  :mod:`ppgen.models.posteriors`;
- ``autoguide``: :class:`ppgen.infer.autoguide.AmortizedGuide` built from the model.

Particles ``K`` in (1, 4), vectorized, with the ELBO built as :func:`ppgen.infer.svi.make_svi_step`
builds it. Layouts, each with ``N = 3`` datapoints in ``pyro.plate("data", N)`` (``plate2``: "obs"):

- ``scalar``: ``z_n ~ N(0, 1)``, ``x_n ~ N(z_n, 1)``, the latent site under a KL warm-up
  ``poutine.scale(0.5)`` in the model and the hand-written guides (as ``ppgen.models.vae`` does;
  ``AmortizedGuide`` leaves its site unscaled, and its reference follows what it writes), so the
  objective is ``E[log p(x|z) + beta (log p(z) - log q(z))]``, inside each log weight for the
  multi-sample bounds;
- ``event``: ``z_n ~ N(0, I_2)`` (``.to_event(1)``), ``x_n ~ N(W z_n + b, I_3)``
  (:class:`ppgen.models.linear_gaussian.LinearGaussian`);
- ``plate2``: the datapoint plate at ``dim=-2`` and named ``"obs"`` (not ``"data"``: the user
  passes ``data_plate="obs"`` to the loop and the autoguide), ``z_n ~ N(0, I_2)``, and an inner
  ``pyro.plate("feature", 3)`` of observations ``x_nj ~ N(w_j . z_n, 1)``;
- ``global``: a global ``theta ~ N(0, 1)`` and locals ``z_n ~ N(theta 1, I_2)``,
  ``x_n ~ N(W z_n + b, I_3)``; the hand-written guides are hierarchical,
  ``q(theta) q(z_n | x_n, theta)`` with ``z_n``'s location shifted by ``a theta`` (``a`` learned),
  so a gradient must follow the path from ``theta``'s draw through ``log q(z_n | theta)``;
  ``AmortizedGuide`` is mean-field;
- ``discrete``: ``y_n ~ Categorical(0.2, 0.3, 0.5)``, ``x_n ~ N(mu_y, 1)``.

``plate2`` and ``global`` run as a minibatch of a dataset ten times the batch: every draw is
taken under the SVI loop's ``DataScale(N / B = 10)``, so every site in the data plate counts ten
times (the multi-sample bounds multiply each datapoint's bound by ``N / B``, outside the
logsumexp, as :mod:`ppgen.infer.estimators.multisample` defines them). Observation noise is 1
everywhere.

**Objectives and references.** Estimators named in :data:`MULTI_SAMPLE` (``iwae``, ``dreg``,
``vimco``) target the ``K``-sample importance-weighted bound (Burda et al. 2016), per datapoint
(jointly over the batch when the model has a global latent); every other estimator targets the
ELBO, whose gradient is the same whatever ``K``. References, computed without the estimator code:

- Gaussian guides (user, encoder, fullcov, autoguide) on the four Gaussian layouts: the ELBO in
  closed form from the guide's means and covariances (expectations of quadratic forms under
  Gaussians plus Gaussian entropies), differentiated by autograd: exact.
- Discrete layout: the ELBO summed over the 3 values of ``y_n``; the ``K``-sample bound summed
  over all ``3^K`` joint values: exact.
- IAF and hierarchical guides (ELBO), and every continuous multi-sample bound with ``K > 1``:
  a plain reparameterized Monte Carlo gradient from our own traces and log-densities, ``REF_CHUNKS``
  independent chunks of ``REF_PER_CHUNK`` draws, whose standard error enters the z-score. At
  ``K = 1`` the multi-sample bound is the ELBO and uses the ELBO's reference.

**The test of a cell.** ``R`` independent gradient draws (``.grad`` of every unconstrained
parameter of the param store after ``elbo.loss_and_grads(model, prepared_guide, x)``; ``R`` is
:data:`DRAWS`, 32 at ``K = 1`` and 20 at ``K = 4``, three times that on the discrete layout,
whose score-function draws are noisier against its gradient and cheap) give a mean and a
standard error per parameter component. With ``P`` components, the cell holds when
``max_i |mean_i - exact_i| / sqrt(se_i^2 + se_ref_i^2 + floor_i^2) < t(P, R)``, with the Bonferroni
threshold ``t(P, R) = max(4, T_{R-1}^-1(1 - ALPHA / (2 P)))`` (Student-t quantile) and
``ALPHA = 1e-4`` per cell: over the ~500 tested cells a correct matrix raises a false alarm with
probability about 5% if draws were Gaussian. They are not: score-function gradients are skewed
and heavy-tailed, and their sample SE is too small more often than that. So a cell over the
threshold is judged again on ``4 R`` draws, then on ``16 R`` (the earlier ones included,
:data:`STAGES`); a wrong estimator stays wrong, a false alarm goes away (VIMCO's score-function
gradient of an IAF guide, for one, has tails heavy enough to need it).
``floor_i = 1e-5 (1 + |exact_i|)`` (float32 rounding: the matrix runs in float32, as users
train; the references are summed in float64)
guards deterministic estimators (``enum`` on a discrete latent has zero spread) from a zero
denominator. Where the reference is Monte Carlo, the estimator's SE is at least the reference's
own per-draw spread scaled to ``R`` draws (a rare event, a ReLU in an IAF step firing in one draw
of 1e4, must not give a zero sample SE). Seeds are fixed per cell (crc32 of its name), and every
estimator starts from the same guide parameters, so the suite is deterministic.

**Paired test.** Each draw can be followed by our own unbiased gradient of the same objective on
the same latents (a twin): on the continuous layouts, for an estimator registered as
``reparameterized``, a pathwise one from the same RNG seed (:func:`paired_grads`: the guide traced
under a particle plate of ``K`` at Pyro's vectorized-particle dim); for an estimator that scores
its draws (the score-function ones, and any estimator of the ELBO on the discrete layout), a
Rao-Blackwellized score-function one on the latents it drew, replayed from its guide trace
(:func:`score_twin_grads`). After :data:`PILOT` draws the twin is kept only where the difference
``g_est - g_twin`` varies less than half as much as the twin (summed over components): the
estimator computes the twin's numbers, as reparam, enum, iwae, score-discrete, score (and the
Trace_ELBO family on the discrete latent) do, or a distorted copy of them, as a wrong one would.
Then ``mean(g_est - g_twin)`` must be zero, and the test sees biases far below the draws' own
noise (a bound tempered by the minibatch scale, say). Elsewhere (baselines, STL, DReG: unbiased,
other numbers per draw) the twin only costs time and is dropped. A cell holds when every test
passes.

**Directional test.** The draws projected on the exact gradient's direction ``u`` must average
``|exact|``: one more z-score (reference SE bounded by ``sum_i |u_i| se_ref_i``). A bias along the
gradient (a wrong ``N / B`` or ``1 / K`` factor, a halved term) adds up over all components there
while the noise averages out, so this sees it long before any single component does. The
Bonferroni count is ``P + 1`` (``2 P + 1`` with the paired test).

**Power, measured** (deliberately wrong estimators, at ``R = 40 / 24`` before the score twin;
:mod:`tests.infer.test_conformance` keeps three of them): a
pathwise gradient off by a factor 2 is WRONG in every cell; a score-function one in 18 of 30
user/encoder/autoguide cells (every discrete and scalar one, not the K = 1 continuous ones at
this ``R``); Pyro's ``RenyiELBO(alpha=0)``, which tempers the bound by putting ``N / B`` inside
the logsumexp, on the IAF guide at ``K = 4`` (paired z about 20), not on the Gaussian guides.

A ``ValueError`` is a refusal; it ``refuses`` properly when its message points to an alternative
(it names another registered estimator, or says "use"/"instead"), otherwise it ``refuses
unhelpfully``. Any other exception is a ``crash``.

**n/a cells.** ``fullcov`` and ``iaf`` on the ``scalar`` and ``discrete`` layouts: both are families
of a *vector* continuous latent (a correlation matrix, an autoregressive order over dimensions);
the scalar site has one dimension and the discrete site none, so there is no such guide to write
(``IAFPosterior`` itself refuses ``z_dim < 2``).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.transforms import ReshapeTransform
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.nn import functional as F

from ppgen.infer.autoguide import AmortizedGuide
from ppgen.infer.estimators import ESTIMATORS, make_elbo, prepare_guide
from ppgen.infer.svi import DataScale
from ppgen.infer.traces import find_data_plate
from ppgen.models.linear_gaussian import LinearGaussian
from ppgen.models.posteriors import encoder_features, make_posterior
from ppgen.nets import Encoder, mlp

DTYPE = torch.float32  # what users train in (score-nn-baseline's nets are float32)
N = 3  # datapoints
LAYOUTS = ("scalar", "event", "plate2", "global", "discrete")
GUIDES = ("user", "encoder", "fullcov", "iaf", "autoguide")
PARTICLES = (1, 4)
#: estimators whose objective is the K-sample importance-weighted bound (not the ELBO)
MULTI_SAMPLE = frozenset({"iwae", "dreg", "vimco"})
ALPHA = 1e-4  # per-cell false-alarm rate before Bonferroni over components
DRAWS = {1: 32, 4: 20}  # R gradient draws per cell, by K
DISCRETE_DRAWS = 3  # the discrete layout draws 3 R: its score-function gradients are noisier, its draws cheap
SEED_OFFSET = 0  # shifts every cell's draw seeds (--seed-offset: how often does a correct cell fail?)
PILOT = 4  # draws after which a twin whose difference with the estimator varies as much as it is dropped
STAGES = (1, 4, 16)  # a cell over the threshold is judged again on 4 R, then 16 R draws
REF_CHUNKS, REF_PER_CHUNK = 16, 2048  # Monte Carlo reference: independent chunks x draws each
HIDDEN = 8  # width of every encoder trunk
WARMUP = 0.5  # the scalar layout's KL warm-up factor beta on its latent site
MINIBATCH_SCALE = 10.0  # plate2 and global run as a minibatch of B = N / 10: DataScale(N / B)

STATUSES = ("holds", "refuses", "refuses unhelpfully", "WRONG", "crash", "n/a")


def estimators() -> list[str]:
    """The registry's names, as they are now."""
    return list(ESTIMATORS)


def objective(estimator: str) -> str:
    return "iwae" if estimator in MULTI_SAMPLE else "elbo"


def cell_name(estimator: str, guide: str, layout: str, k: int) -> str:
    return f"{estimator}-{guide}-{layout}-K{k}"


def not_applicable(guide: str, layout: str) -> Optional[str]:
    if guide in ("fullcov", "iaf") and layout in ("scalar", "discrete"):
        what = "a one-dimensional" if layout == "scalar" else "no continuous"
        return f"{guide} is a family of vector latents; this layout has {what} latent"
    return None


def _seed(text: str) -> int:
    return zlib.crc32(text.encode())


# ---------------------------------------------------------------------------------------- layouts
@dataclass
class Layout:
    """A small conjugate model, its data, and what the exact references need."""

    name: str
    model: Callable
    x: torch.Tensor
    x_width: int  # features per datapoint the encoders read
    latent_dim: int  # d of the local latent (0: scalar), or number of classes (discrete)
    data_dim: int = -1
    has_global: bool = False
    scale: float = 1.0  # N / B of the SVI loop's DataScale on every site in the datapoint plate
    plate: str = "data"  # name of the plate over datapoints
    latent_scale: float = 1.0  # poutine.scale on the latent site in model and hand-written guides
    discrete: bool = False
    consts: dict = field(default_factory=dict)

    @property
    def nesting(self) -> int:
        return -self.data_dim


def _linear(seed: int, dtype: torch.dtype) -> LinearGaussian:
    return LinearGaussian.random(3, 2, noise=1.0, seed=seed, dtype=dtype)


@functools.lru_cache(maxsize=None)
def layout(name: str, dtype: torch.dtype = DTYPE) -> Layout:
    g = torch.Generator().manual_seed(_seed(name))
    if name == "scalar":
        sigma = 1.0

        def model(x):
            with pyro.plate("data", x.shape[0]):
                with poutine.scale(scale=WARMUP):  # KL warm-up, as ppgen.models.vae writes it
                    z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
                pyro.sample("x", dist.Normal(z, sigma), obs=x)

        x = torch.tensor([1.3, -0.4, 2.1], dtype=dtype)
        return Layout(name, model, x, 1, 0, latent_scale=WARMUP, consts={"sigma": sigma})
    if name == "event":
        lg = _linear(1, dtype)
        return Layout(name, lg.model, lg.sample(N, seed=2), 3, 2, consts={"W": lg.weight, "b": lg.bias, "s": lg.noise})
    if name == "plate2":
        w = torch.randn(3, 2, generator=g, dtype=dtype)
        s = 1.0

        def model(x):
            with pyro.plate("obs", x.shape[0], dim=-2):  # not called "data": data_plate="obs"
                z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))  # (N, 1, 2)
                with pyro.plate("feature", x.shape[1], dim=-1):
                    pyro.sample("x", dist.Normal((z * w).sum(-1), s), obs=x)  # (N, 3)

        x = torch.randn(N, 3, generator=g, dtype=dtype) * 1.5
        return Layout(name, model, x, 3, 2, data_dim=-2, scale=MINIBATCH_SCALE, plate="obs", consts={"W": w, "b": torch.zeros(3, dtype=dtype), "s": s})
    if name == "global":
        lg = _linear(3, dtype)
        weight, bias, s = lg.weight, lg.bias, lg.noise

        def model(x):
            theta = pyro.sample("theta", dist.Normal(x.new_zeros(()), 1.0))
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(theta[..., None] * x.new_ones(2), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z @ weight.T + bias, s).to_event(1), obs=x)

        x = lg.sample(N, seed=4) + 1.0
        return Layout(name, model, x, 3, 2, has_global=True, scale=MINIBATCH_SCALE, consts={"W": weight, "b": bias, "s": s})
    if name == "discrete":
        probs = torch.tensor([0.2, 0.3, 0.5], dtype=dtype)
        mu = torch.tensor([-1.5, 0.0, 1.5], dtype=dtype)
        sigma = 1.0

        def model(x):
            with pyro.plate("data", x.shape[0]):
                y = pyro.sample("y", dist.Categorical(probs))
                pyro.sample("x", dist.Normal(mu[y], sigma), obs=x)

        x = torch.tensor([-1.0, 0.4, 1.1], dtype=dtype)
        return Layout(name, model, x, 1, 3, discrete=True, consts={"probs": probs, "mu": mu, "sigma": sigma})
    raise ValueError(f"unknown layout {name!r}")


# ----------------------------------------------------------------------------------------- guides
def user_guide(lay: Layout) -> Callable:
    """Per-datapoint ``pyro.param`` locals (and a global pair), away from the optimum."""
    d, dt = lay.latent_dim, lay.x.dtype

    def guide(x):
        shift = 0.0
        if lay.has_global:  # hierarchical: q(theta) q(z_n | x_n, theta)
            loc = pyro.param("theta_loc", torch.tensor(-0.5, dtype=dt))
            scale = pyro.param("theta_scale", torch.tensor(0.6, dtype=dt), constraint=dist.constraints.positive)
            theta = pyro.sample("theta", dist.Normal(loc, scale))
            shift = pyro.param("shift", torch.tensor([0.4, -0.3], dtype=dt)) * theta[..., None]
        with pyro.plate(lay.plate, x.shape[0], dim=lay.data_dim):
            if lay.discrete:
                logits = pyro.param("logits", torch.tensor([[0.5, -0.2, 0.1], [0.0, 0.3, -0.6], [-0.4, 0.2, 0.9]], dtype=dt))
                pyro.sample("y", dist.Categorical(logits=logits))
            elif d == 0:
                loc = pyro.param("loc", torch.tensor([0.3, -0.8, 0.5], dtype=dt))
                scale = pyro.param("scale", torch.tensor([0.9, 0.5, 1.2], dtype=dt), constraint=dist.constraints.positive)
                with poutine.scale(scale=lay.latent_scale):
                    pyro.sample("z", dist.Normal(loc, scale))
            else:
                loc = pyro.param("loc", torch.linspace(-1.0, 1.0, x.shape[0] * d, dtype=dt).reshape(-1, d))
                scale = pyro.param("scale", torch.full((x.shape[0], d), 0.7, dtype=dt), constraint=dist.constraints.positive)
                shape = (-1,) + (1,) * (lay.nesting - 1) + (d,)
                pyro.sample("z", dist.Normal(loc.reshape(shape) + shift, scale.reshape(shape)).to_event(1))

    guide.hierarchical = lay.has_global  # type: ignore[attr-defined]
    return guide


class EncoderGuide(nn.Module):
    """A hand-written amortized guide (as :class:`ppgen.models.vae.VAE` writes one): an
    :class:`~ppgen.nets.Encoder` and a posterior family of :mod:`ppgen.models.posteriors`; logits
    from a small MLP for a discrete latent; a global Normal for a global latent."""

    def __init__(self, lay: Layout, family: str):
        super().__init__()
        self.lay = lay
        d = lay.latent_dim
        if lay.discrete:
            self.logits = mlp([lay.x_width, HIDDEN, d])
        else:
            self.encoder = Encoder(nn.Linear(lay.x_width, HIDDEN), HIDDEN, max(d, 1), lay.x_width)
            self.posterior = make_posterior(family, max(d, 1), HIDDEN)
        self.hierarchical = lay.has_global
        if lay.has_global:  # hierarchical: q(theta) q(z_n | x_n, theta), the encoder's loc shifted by a theta
            self.theta_loc = nn.Parameter(torch.tensor(-0.5))
            self.theta_raw = nn.Parameter(torch.tensor(0.2))
            self.shift = nn.Parameter(torch.tensor([0.4, -0.3]))
        self.to(lay.x.dtype)

    def forward(self, x):
        lay = self.lay
        pyro.module("guide", self)
        flat = x.reshape(x.shape[0], -1)
        shift = 0.0
        if lay.has_global:
            theta = pyro.sample("theta", dist.Normal(self.theta_loc, F.softplus(self.theta_raw)))
            shift = self.shift * theta[..., None]
        with pyro.plate(lay.plate, x.shape[0], dim=lay.data_dim):
            if lay.discrete:
                pyro.sample("y", dist.Categorical(logits=self.logits(flat)))
            elif lay.latent_dim == 0:
                loc, scale = self.encoder(flat)
                with poutine.scale(scale=lay.latent_scale):
                    pyro.sample("z", dist.Normal(loc.squeeze(-1), scale.squeeze(-1)))
            else:
                lead = (x.shape[0],) + (1,) * (lay.nesting - 1)
                loc, scale, h = (t.reshape(*lead, t.shape[-1]) for t in encoder_features(self.encoder, flat))
                pyro.sample("z", self.posterior(loc + shift, scale, h))


def make_guide(kind: str, lay: Layout) -> Callable:
    if kind == "user":
        return user_guide(lay)
    if kind in ("encoder", "fullcov", "iaf"):
        return EncoderGuide(lay, "diag" if kind == "encoder" else kind)
    if kind == "autoguide":
        return AmortizedGuide(lay.model, hidden=(HIDDEN,), name="autoguide", data_plate=lay.plate)
    raise ValueError(f"unknown guide kind {kind!r}")


def _params() -> list[tuple[str, torch.Tensor]]:
    return sorted(pyro.get_param_store().named_parameters(), key=lambda kv: kv[0])


def _flat_grads(params, grads) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


# ------------------------------------------------------------------------------------- references
def _gaussian_moments(fn, rows: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(mean (rows, d), cov (rows, d, d))`` of a Gaussian guide distribution, or ``None``."""
    while True:
        if isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        elif isinstance(fn, torch.distributions.TransformedDistribution) and all(
            isinstance(t, ReshapeTransform) for t in fn.transforms
        ):
            fn = fn.base_dist
        else:
            break
    if isinstance(fn, torch.distributions.MultivariateNormal):
        d = fn.loc.shape[-1]
        tril = fn.scale_tril.expand(fn.loc.shape + (d,))
        return fn.loc.reshape(rows, d), (tril @ tril.mT).reshape(rows, d, d)
    if isinstance(fn, torch.distributions.Normal):
        loc, scale = torch.broadcast_tensors(fn.loc, fn.scale)
        return loc.reshape(rows, -1), torch.diag_embed(scale.reshape(rows, -1) ** 2)
    return None


def _expected_gaussian_loglik(y, m, c, weight, bias, s):
    """``sum_n E_{z ~ N(m_n, c_n)} log N(y_n; W z + b, s^2 I)`` (closed form)."""
    ll = dist.Normal(m @ weight.T + bias, s).log_prob(y).sum()
    return ll - torch.einsum("ij,njk,ik->", weight, c, weight) / (2 * s**2)


def _entropy(c):
    d = c.shape[-1]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + torch.logdet(c)).sum()


def closed_form_elbo(lay: Layout, guide: Callable) -> Optional[torch.Tensor]:
    """The exact ELBO (sum over datapoints) of a Gaussian guide, differentiable in its parameters;
    ``None`` if the guide is not Gaussian."""
    if getattr(guide, "hierarchical", False):  # q(z | theta): the Monte Carlo reference
        return None
    tr = poutine.trace(guide).get_trace(lay.x)
    z = _gaussian_moments(tr.nodes["z"]["fn"], N)
    if z is None:
        return None
    m, c = z[0].double(), z[1].double()  # the formula in float64, differentiated into the parameters
    k = {key: v.double() if isinstance(v, torch.Tensor) else v for key, v in lay.consts.items()}
    x = lay.x.double()
    if lay.name == "scalar":  # the latent site's own scales: beta in the model, the guide's (beta or 1)
        v = c[:, 0, 0]
        ll = (dist.Normal(m[:, 0], k["sigma"]).log_prob(x) - v / (2 * k["sigma"] ** 2)).sum()
        prior = (dist.Normal(0.0, 1.0).log_prob(m[:, 0]) - v / 2).sum()
        return lay.scale * (ll + lay.latent_scale * prior + float(tr.nodes["z"]["scale"]) * _entropy(c))
    ll = _expected_gaussian_loglik(x, m, c, k["W"], k["b"], k["s"])
    if not lay.has_global:
        prior = dist.Normal(0.0, 1.0).log_prob(m).sum() - torch.diagonal(c, dim1=-2, dim2=-1).sum() / 2
        return lay.scale * (ll + prior + _entropy(c))
    mt, ct = (t.double() for t in _gaussian_moments(tr.nodes["theta"]["fn"], 1))
    vt = ct[0, 0, 0]
    d = m.shape[-1]
    prior_theta = dist.Normal(0.0, 1.0).log_prob(mt[0, 0]) - vt / 2
    prior_z = dist.Normal(mt[0, 0], 1.0).log_prob(m).sum() - torch.diagonal(c, dim1=-2, dim2=-1).sum() / 2 - N * d * vt / 2
    return prior_theta + _entropy(ct) + lay.scale * (ll + prior_z + _entropy(c))


def exact_discrete_bound(lay: Layout, guide: Callable, k: int) -> torch.Tensor:
    """``sum_n E[log (1/K) sum_k p(x_n, y_k) / q(y_k)]`` summed over all ``C^K`` values exactly."""
    tr = poutine.trace(guide).get_trace(lay.x)
    logq = tr.nodes["y"]["fn"].logits.reshape(N, -1).double()
    logq = logq - logq.logsumexp(-1, keepdim=True)
    c = lay.consts
    joint = c["probs"].double().log() + dist.Normal(c["mu"].double(), c["sigma"]).log_prob(lay.x.double()[:, None])  # (N, C)
    logw = joint - logq
    combos = torch.tensor(list(itertools.product(range(logq.shape[1]), repeat=k)))  # (C^K, K)
    weight = logq[:, combos].sum(-1).exp()  # (N, C^K)
    return lay.scale * (weight * (logw[:, combos].logsumexp(-1) - math.log(k))).sum()


def _log_weights(lay: Layout, model_tr, guide_tr, rows: int) -> torch.Tensor:
    """``log p - log q`` per draw and datapoint ``(rows, N)``, or per draw ``(rows, 1)`` summed over
    the batch when the model has a global latent; our own sum of every site's ``log_prob``."""
    full = lay.nesting + 1
    total = 0.0
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for site in tr.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site) or (sign < 0 and site["is_observed"]):
                continue
            lp = site["fn"].log_prob(site["value"]) * site["scale"]  # the model's own scales (warm-up)
            lp = lp.reshape((1,) * (full - lp.ndim) + tuple(lp.shape)).expand(rows, *([-1] * (full - 1)))
            if lay.has_global:  # one weight per draw: data-plate sites scaled by N / B
                data = any(f.name == lay.plate for f in site["cond_indep_stack"])
                lp = (lay.scale if data else 1.0) * lp.reshape(rows, -1).sum(-1, keepdim=True)
            else:
                other = [a for a in range(1, full) if a != full + lay.data_dim]
                lp = (lp.sum(other) if other else lp).expand(rows, N)  # sum([]) would sum everything
            total = total + sign * lp
    return total


def mc_bound_grads(lay: Layout, guide: Callable, params, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterized Monte Carlo gradient of the ``k``-sample bound (``k = 1``: the ELBO):
    ``(mean, standard error)`` over :data:`REF_CHUNKS` independent chunks."""
    g = []
    with pyro.validation_enabled(False), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(REF_CHUNKS):
            rows = REF_PER_CHUNK * k
            with pyro.plate("_reference", rows, dim=-(lay.nesting + 1)):
                guide_tr = poutine.trace(guide).get_trace(lay.x)
                model_tr = poutine.trace(poutine.replay(lay.model, trace=guide_tr)).get_trace(lay.x)
            logw = _log_weights(lay, model_tr, guide_tr, rows).double()
            logw = logw.reshape(REF_PER_CHUNK, k, -1)
            bound = (logw.logsumexp(1) - math.log(k)).sum(-1).mean()
            if not lay.has_global:  # per-datapoint bounds, each multiplied by N / B
                bound = lay.scale * bound
            g.append(_flat_grads(params, torch.autograd.grad(-bound, params, allow_unused=True)))
    g = torch.stack(g)
    return g.mean(0), g.std(0) / math.sqrt(REF_CHUNKS)


def score_twin_grads(lay: Layout, guide: Callable, params, k: int, recorded) -> torch.Tensor:
    """Our own score-function gradient of the ELBO on the very latents the estimator just drew
    (``recorded``: its guide trace, replayed): per particle, every guide site's unscaled
    ``log q`` times its downstream log-ratio (its datapoint's for a site in the data plate, the
    whole particle's for a global one: the Rao-Blackwellization of Schulman et al. 2015 for these
    models); averaged over the ``k`` particles. Unbiased, and
    equal draw for draw to a Rao-Blackwellized estimator without baseline, so the difference of
    the two has little spread."""
    with pyro.validation_enabled(False), poutine.block():
        if k > 1:
            with pyro.plate("_twin_particles", k, dim=-(lay.nesting + 1)):
                guide_tr = poutine.trace(poutine.replay(guide, trace=recorded)).get_trace(lay.x)
                model_tr = poutine.trace(poutine.replay(lay.model, trace=guide_tr)).get_trace(lay.x)
        else:
            guide_tr = poutine.trace(poutine.replay(guide, trace=recorded)).get_trace(lay.x)
            model_tr = poutine.trace(poutine.replay(lay.model, trace=guide_tr)).get_trace(lay.x)
    full = lay.nesting + 1
    local, glob, scores = 0.0, 0.0, []
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for site in tr.nodes.values():
            if site["type"] != "sample" or site_is_subsample(site) or (sign < 0 and site["is_observed"]):
                continue
            in_data = any(f.name == lay.plate for f in site["cond_indep_stack"])
            lp = site["fn"].log_prob(site["value"])
            lp = lp.reshape((1,) * (full - lp.ndim) + tuple(lp.shape))
            lp = lp.expand(k, *lp.shape[1:])
            if in_data:
                other = [a for a in range(1, full) if a != full + lay.data_dim]
                lp = (lp.sum(other) if other else lp).expand(k, N)
            else:
                lp = lp.reshape(k, -1).sum(-1)
            scaled = lp * site["scale"] * (lay.scale if in_data else 1.0)
            if in_data:
                local = local + sign * scaled
            else:
                glob = glob + sign * scaled
            if sign < 0:
                scores.append((lp, in_data))
    local = local if torch.is_tensor(local) else torch.zeros(k, N)
    glob = glob if torch.is_tensor(glob) else torch.zeros(k)
    elbo = glob + local.sum(-1)  # (k,)
    surrogate = 0.0  # the direct -log q terms have mean zero and Pyro drops them for scored sites
    for lq, in_data in scores:
        surrogate = surrogate + ((lq * local.detach()).sum(-1) if in_data else lq * elbo.detach())
    return _flat_grads(params, torch.autograd.grad(-surrogate.mean(), params, allow_unused=True))


def paired_grads(lay: Layout, guide: Callable, params, k: int, obj: str) -> torch.Tensor:
    """Our own pathwise gradient of the loss on the draws the estimator just made: called right
    after re-seeding the RNG as it was for the estimator, it traces the guide under a particle
    plate of ``k`` at the same dim as Pyro's vectorized particles (none at ``k = 1``), so the
    same noise gives the same latents. An unbiased estimate of the objective's gradient either
    way; when the estimator draws alike, the difference of the two has little spread, which
    makes the paired test far sharper than the comparison with the exact mean alone."""
    with pyro.validation_enabled(False):
        if k > 1:
            with pyro.plate("_paired_particles", k, dim=-(lay.nesting + 1)):
                guide_tr = poutine.trace(guide).get_trace(lay.x)
                model_tr = poutine.trace(poutine.replay(lay.model, trace=guide_tr)).get_trace(lay.x)
        else:
            guide_tr = poutine.trace(guide).get_trace(lay.x)
            model_tr = poutine.trace(poutine.replay(lay.model, trace=guide_tr)).get_trace(lay.x)
        logw = _log_weights(lay, model_tr, guide_tr, k)  # (k, N) or (k, 1)
        if obj == "iwae":
            bound = (logw.logsumexp(0) - math.log(k)).sum()
        else:
            bound = logw.mean(0).sum()
        if not lay.has_global:
            bound = lay.scale * bound
        return _flat_grads(params, torch.autograd.grad(-bound, params, allow_unused=True))


def reference(lay: Layout, guide: Callable, params, obj: str, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Gradient of the *loss* (negative objective): ``(exact, its standard error, how)``."""
    keff = k if obj == "iwae" else 1
    if lay.discrete:
        bound = exact_discrete_bound(lay, guide, keff)
        how = "exact sum" if keff == 1 else f"exact sum over 3^{keff}"
    elif keff == 1 and (bound := closed_form_elbo(lay, guide)) is not None:
        how = "closed form"
    else:
        mean, se = mc_bound_grads(lay, guide, params, keff, seed)
        return mean, se, f"MC {REF_CHUNKS}x{REF_PER_CHUNK}"
    grads = torch.autograd.grad(-bound, params, allow_unused=True)
    flat = _flat_grads(params, grads)
    return flat, torch.zeros_like(flat), how


_REFERENCES: dict = {}


def cached_reference(lay, guide, params, obj, k, key):
    keff = k if obj == "iwae" else 1
    full = (key, obj if keff > 1 else "elbo", keff)
    if full not in _REFERENCES:
        _REFERENCES[full] = reference(lay, guide, params, obj, k, _seed(str(full)))
    return _REFERENCES[full]


# ------------------------------------------------------------------------------------ cell runner
@dataclass
class Cell:
    estimator: str
    guide: str
    layout: str
    k: int
    status: str = ""
    z: float = float("nan")  # max z-score over components, against the exact gradient
    z_direction: float = float("nan")  # z-score of the draws projected on the exact gradient
    z_paired: float = float("nan")  # max z-score of the paired difference with our pathwise twin
    threshold: float = float("nan")
    components: int = 0
    draws: int = 0
    message: str = ""  # refusal or crash message; for WRONG the worst component
    reference: str = ""
    seconds: float = 0.0

    @property
    def worst(self) -> float:
        """The largest of the three z-scores (exact, directional, paired where it ran)."""
        return max(z for z in (self.z, self.z_direction, self.z_paired) if z == z)

    @property
    def name(self) -> str:
        return cell_name(self.estimator, self.guide, self.layout, self.k)


def threshold(components: int, draws: int) -> float:
    """Bonferroni over ``components``, Student-t with ``draws - 1`` degrees of freedom."""
    from scipy.stats import t

    return max(4.0, float(t.ppf(1 - ALPHA / (2 * max(components, 1)), draws - 1)))


def _helpful(message: str, estimator: str) -> bool:
    others = [e for e in ESTIMATORS if e != estimator]
    named = any(re.search(rf"(?<![\w-]){re.escape(e)}(?![\w-])", message) for e in others)
    return named or re.search(r"\b(use|instead)\b", message, re.I) is not None


def run_cell(estimator: str, guide_kind: str, layout_name: str, k: int, draws: Optional[int] = None,
             dtype: torch.dtype = DTYPE) -> Cell:
    cell = Cell(estimator, guide_kind, layout_name, k)
    start = time.perf_counter()
    na = not_applicable(guide_kind, layout_name)
    if na:
        cell.status, cell.message = "n/a", na
        return cell
    lay = layout(layout_name, dtype)
    r = draws or DRAWS[k] * (DISCRETE_DRAWS if lay.discrete else 1)
    pyro.clear_param_store()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(_seed(f"{guide_kind}-{layout_name}"))  # same start for every estimator
            guide = make_guide(guide_kind, lay)
            with torch.no_grad():  # register parameters (and validate) as make_svi_step does
                Trace_ELBO().loss(lay.model, guide, lay.x)
                if guide_kind == "autoguide":
                    # AmortizedGuide starts with zero-weight output heads, where the exact gradient of
                    # its trunk is exactly zero and a bias along that path would go unseen: move every
                    # parameter off its start, as training would.
                    for name, p in _params():
                        if not name.endswith(("x_shift", "x_scale")):  # fixed input standardization
                            p.add_(0.3 * torch.randn_like(p))
        named = _params()
        params = [p for _, p in named]
        # as make_svi_step does, the user naming the datapoint plate (data_plate=...)
        found = find_data_plate(lay.model, guide, (lay.x,), {}, N, lay.plate, required=lay.scale != 1.0)
        plate, nesting = found.data_plate or lay.plate, found.nesting
        elbo = make_elbo(estimator, k, k > 1, nesting)
        train_guide = prepare_guide(estimator, guide)

        # A pathwise twin exists for continuous latents; it draws the same latents only when the
        # estimator samples them reparameterized (score-function ones draw by .sample()).
        paired = not lay.discrete and ESTIMATORS[estimator].reparameterized
        # Where the estimator scores its draws (score-function estimators; any discrete latent),
        # the twin is our own Rao-Blackwellized score-function gradient on the latents it drew.
        scored = objective(estimator) == "elbo" and estimator != "enum" and (
            lay.discrete or not ESTIMATORS[estimator].reparameterized)
        base = _seed(cell.name) + SEED_OFFSET
        twinned = [paired or scored]

        def draw(n: int) -> tuple[list, list]:
            out, twin = [], []
            for _ in range(n):
                seed = base + len(samples) + len(out)
                torch.manual_seed(seed)
                recorder = poutine.trace(train_guide) if twinned[0] and scored else train_guide
                with DataScale(lay.scale, plate), pyro.validation_enabled(False):
                    elbo.loss_and_grads(lay.model, recorder, lay.x)
                out.append(_flat_grads(params, [p.grad for p in params]))
                for p in params:
                    p.grad = None
                if twinned[0] and paired:
                    torch.manual_seed(seed)
                    twin.append(paired_grads(lay, guide, params, k, objective(estimator)))
                elif twinned[0] and scored:
                    twin.append(score_twin_grads(lay, guide, params, k, recorder.trace))
                if twinned[0] and len(samples) + len(out) == PILOT:
                    # The pairing pays only where the difference with our twin varies much less
                    # than the twin itself (the estimator computes the twin's numbers, or a
                    # multiple of them); elsewhere it costs time and adds no power.
                    g, t = torch.stack(samples + out), torch.stack(twins + twin)
                    if float((g - t).var(0).sum()) > 0.5 * float(t.var(0).sum()):
                        twinned[0] = False
                        twins.clear()
                        twin.clear()
            return out, twin

        samples: list = []
        twins: list = []
        more, more_twins = draw(r)
        samples += more
        twins += more_twins
    except ValueError as err:
        cell.message = " ".join(str(err).split())
        cell.status = "refuses" if _helpful(cell.message, estimator) else "refuses unhelpfully"
        cell.seconds = time.perf_counter() - start
        return cell
    except Exception as err:  # noqa: BLE001 - the matrix records every other failure as a crash
        cell.status, cell.message = "crash", f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]
        cell.seconds = time.perf_counter() - start
        return cell
    exact, se_ref, how = cached_reference(lay, guide, params, objective(estimator), k, f"{guide_kind}-{layout_name}-{dtype}")
    cell.reference = how

    def judge():
        mean, se, z = _z_scores(samples, exact, se_ref, k, objective(estimator))
        # Directional test: the draws projected on the exact gradient's direction u. A bias along
        # the gradient (a wrong scale: N / B, 1 / K, a halved term) adds up over every component
        # there while the noise averages out, so it shows long before any one component does.
        norm = exact.norm()
        u = exact / norm if norm > 0 else exact
        proj = torch.stack(samples) @ u
        se_proj = (proj.std() / math.sqrt(len(proj))) ** 2 + float(u.abs() @ se_ref) ** 2
        z_dir = (proj.mean() - norm).abs() / (se_proj + (1e-5 * (1 + norm)) ** 2).sqrt()
        zs = [z, z_dir.reshape(1)]
        if twins and len(twins) == len(samples):
            d = torch.stack(samples) - torch.stack(twins)
            floor = 1e-5 * (1 + exact.abs() + torch.stack(samples).abs().mean(0))
            zs.append(d.mean(0).abs() / ((d.std(0) / math.sqrt(len(d))) ** 2 + floor**2).sqrt())
        return mean, se, zs

    mean, se, zs = judge()
    tests = sum(z.numel() for z in zs)
    for stage in STAGES[1:]:
        # Later stages: sample means of skewed, heavy-tailed draws (score-function gradients) come
        # with too small a sample SE more often than a Student-t says; a cell over the threshold
        # is judged again on `stage` times R draws (its earlier ones included).
        if max(float(z.max()) for z in zs) < threshold(tests, len(samples)):
            break
        more, more_twins = draw(stage * r - len(samples))
        samples += more
        twins += more_twins
        mean, se, zs = judge()
    z = zs[0]
    cell.draws, cell.components = len(samples), z.numel()
    cell.z, cell.threshold = float(z.max()), threshold(tests, len(samples))
    cell.z_direction = float(zs[1])
    cell.z_paired = float(zs[2].max()) if len(zs) > 2 else float("nan")
    worst = max(cell.z, cell.z_direction, cell.z_paired if len(zs) > 2 else 0.0)
    cell.status = "holds" if worst < cell.threshold else "WRONG"
    if cell.status == "WRONG" and cell.z < cell.threshold and cell.z_direction >= cell.threshold:
        proj = torch.stack(samples) @ (exact / exact.norm())
        cell.message = (f"along the exact gradient: estimator {proj.mean():.5g} +- {proj.std() / math.sqrt(len(proj)):.2g}, "
                        f"exact |grad| {exact.norm():.5g} (z {cell.z_direction:.1f})")
    elif cell.status == "WRONG" and cell.z < cell.threshold:  # only the paired test fails
        d = torch.stack(samples) - torch.stack(twins)
        i = int(zs[2].argmax())
        cell.message = (f"paired with our pathwise gradient on the same draws: component {_where(named, i)} "
                        f"differs by {d.mean(0)[i]:.4g} +- {d.std(0)[i] / math.sqrt(len(d)):.2g} "
                        f"(estimator mean {mean[i]:.5g}, exact {exact[i]:.5g})")
    if cell.status == "WRONG" and not cell.message:
        i = int(z.argmax())
        cell.message = (f"worst component {_where(named, i)}: estimator mean {mean[i]:.5g} +- {se[i]:.2g}, "
                        f"exact {exact[i]:.5g} +- {se_ref[i]:.2g}")
    cell.seconds = time.perf_counter() - start
    return cell


def _where(named, i: int) -> str:
    offset = 0
    for pname, p in named:
        if i < offset + p.numel():
            return f"{pname}[{i - offset}]"
        offset += p.numel()
    return str(i)


def _z_scores(samples: list, exact, se_ref, k: int, obj: str):
    """``(mean, se, z)`` per component of the draws against the reference."""
    samples = torch.stack(samples)
    r = len(samples)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(r)
    floor = 1e-5 * (1 + exact.abs())  # float32 rounding
    # A Monte Carlo reference also measures the per-draw spread of a pathwise gradient: the
    # estimator's SE is taken as at least that spread over its own R draws (of K particles each
    # for the ELBO), so a rare event (a ReLU of an IAF step that fires in 1 draw of 1e4) that R
    # draws never see cannot make a zero sample SE.
    units = r * (k if obj == "elbo" else 1)
    se = torch.maximum(se, se_ref * math.sqrt(REF_CHUNKS * REF_PER_CHUNK / units))
    return mean, se, (mean - exact).abs() / (se**2 + se_ref**2 + floor**2).sqrt()


def all_cells() -> list[tuple[str, str, str, int]]:
    return [(e, g, lay, k) for e in estimators() for g in GUIDES for lay in LAYOUTS for k in PARTICLES]


# ---------------------------------------------------------------------------------------- table
_SHORT = {"holds": "holds", "refuses": "refuses", "refuses unhelpfully": "refuses (no alternative)",
          "WRONG": "**WRONG**", "crash": "**crash**", "n/a": "n/a"}


def table(cells: list[Cell]) -> str:
    by = {(c.estimator, c.guide, c.layout, c.k): c for c in cells}
    ests = list(dict.fromkeys(c.estimator for c in cells))
    head = "| estimator | guide | " + " | ".join(f"{lay} K={k}" for lay in LAYOUTS for k in PARTICLES) + " |"
    lines = [head, "|" + "---|" * (2 + len(LAYOUTS) * len(PARTICLES))]
    for e in ests:
        for g in GUIDES:
            row = []
            for lay in LAYOUTS:
                for k in PARTICLES:
                    c = by.get((e, g, lay, k))
                    if c is None:
                        row.append("")
                    elif c.status in ("holds", "WRONG"):
                        row.append(f"{_SHORT[c.status]} ({c.worst:.1f}/{c.threshold:.1f})")
                    else:
                        row.append(_SHORT[c.status])
            lines.append(f"| `{e}` | {g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def document(cells: list[Cell], seconds: float) -> str:
    counts = {s: sum(c.status == s for c in cells) for s in STATUSES}
    out = [
        "# Estimator conformance matrix",
        "",
        "Written by `python tests/infer/conformance.py --write docs/conformance.md`; checked cell by cell by",
        "`tests/infer/test_conformance.py`. How each cell is decided (models, guides, exact references,",
        "the Bonferroni threshold) is in the docstring of `tests/infer/conformance.py`.",
        "",
        "A cell *holds* when the mean of its gradient draws matches the exact gradient of the estimator's own",
        "objective (the ELBO; the K-sample importance-weighted bound for " + ", ".join(f"`{e}`" for e in sorted(MULTI_SAMPLE)) + ")",
        "within the threshold; the numbers are the largest z-score (per component against the exact gradient, along it,",
        "and paired with our own pathwise gradient on the same draws) / the threshold. It *refuses*",
        "when it raises a `ValueError` naming an alternative. **WRONG** and **crash** cells are bugs.",
        "",
        "Counts: " + ", ".join(f"{s}: {n}" for s, n in counts.items()) + f" (of {len(cells)} cells; {seconds:.0f} s).",
        "",
        table(cells),
        "",
        "## Refusals, crashes and wrong cells",
        "",
    ]
    for c in cells:
        if c.status not in ("holds", "n/a"):
            out.append(f"- `{c.name}` ({c.status}): {c.message}")
    out += ["", "## n/a", "", "- `fullcov`, `iaf` on `scalar`: a family of vector latents; the site is one-dimensional",
            "  (`IAFPosterior` refuses `z_dim < 2`, and a 1x1 covariance is the diagonal guide).",
            "- `fullcov`, `iaf` on `discrete`: the model has no continuous latent to put them on.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="write the markdown table here")
    parser.add_argument("--estimators", help="comma-separated subset (default: the whole registry)")
    parser.add_argument("--layouts", help="comma-separated subset")
    parser.add_argument("--guides", help="comma-separated subset")
    parser.add_argument("--seed-offset", type=int, default=0, help="other draws for every cell (false-alarm check)")
    args = parser.parse_args(argv)
    global SEED_OFFSET
    SEED_OFFSET = args.seed_offset
    torch.set_num_threads(1)
    pick = lambda s, default: default if not s else [v for v in s.split(",")]  # noqa: E731
    ests, lays, gds = pick(args.estimators, estimators()), pick(args.layouts, LAYOUTS), pick(args.guides, GUIDES)
    cells, start = [], time.perf_counter()
    for e, g, lay, k in all_cells():
        if e in ests and lay in lays and g in gds:
            c = run_cell(e, g, lay, k)
            cells.append(c)
            print(f"{c.name:45s} {c.status:22s} z={c.z:7.2f} zd={c.z_direction:7.2f} zp={c.z_paired:7.2f} t={c.threshold:4.1f} R={c.draws:4d} {c.seconds:5.2f}s {c.message[:150]}",
                  flush=True)
    seconds = time.perf_counter() - start
    doc = document(cells, seconds)
    if args.write:
        args.write.write_text(doc)
    counts = {s: sum(c.status == s for c in cells) for s in STATUSES}
    print(counts, f"{seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
