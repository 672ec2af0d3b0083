"""Multi-sample bounds: the importance-weighted bound of Burda et al. (2016), per datapoint, and
three gradient estimators of it.

All three share one objective. With ``K = num_particles`` particles drawn in one vectorized pass
and the per-datapoint log weights of :mod:`ppgen.infer.traces`,

    L_K = m * sum_n [ logsumexp_k log w_nk - log K ],
    log w_nk = sum_sites s_site * log density_site(x_n, z_nk)   (model sites +, guide sites -)

where ``m`` is the minibatch factor ``N / B`` (recorded by the SVI loop's ``DataScale``, or a
subsampling data plate's ``full_size / size``) kept *outside* the logsumexp so that the
full-data objective is unbiased, and ``s_site`` every other ``poutine.scale`` factor, kept
*inside* each log weight: under KL warm-up ``poutine.scale(beta)`` around the latent sites this
is the tempered bound ``logsumexp_k [log p(x|z_k) + beta (log p(z_k) - log q(z_k|x))]``
(Pyro's ``RenyiELBO`` puts ``m`` inside too, which raises every weight to the power ``N / B``).

=========  ===========================================================================
estimator  gradient of ``L_K``
=========  ===========================================================================
``iwae``   pathwise, ``sum_k w~_k d log w_k`` through ``z_k = T(eps_k, phi)`` (Burda et
           al. 2016). Reparameterized guide sites only.
``dreg``   doubly reparameterized (Tucker, Lawson, Gu & Maddison 2019): model parameters get
           the ``iwae`` gradient ``sum_k w~_k d log w_k / d theta``; guide parameters get
           ``sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi)`` with ``log q`` at stopped
           guide parameters, the score term replaced by its reparameterized expectation.
           Same expectation as ``iwae``, and zero variance at ``q = p(z|x)``.
           Reparameterized guide sites only.
``vimco``  score function with leave-one-out baselines (Mnih & Rezende 2016): every guide
           site is treated by its score ``d log q(z_k) / d phi`` weighted by
           ``L_K - L_K^{-k}``, where ``L_K^{-k}`` replaces ``log w_k`` by the mean of the
           other ``K - 1``; plus the direct term ``sum_k w~_k d log w_k`` at fixed ``z``.
           Any guide site, discrete ones included; ``K >= 2``.
=========  ===========================================================================

``w~_k = softmax_k(log w_k)`` are the normalized weights. All three are unbiased for the same
gradient (tested against exact and hand-written references in ``tests/infer/test_multisample.py``).

How ``dreg`` stops the guide's parameters. ``log q`` at stopped parameters but live ``z`` is
``lq(z, phi) - lq(stop(z), phi) + stop(lq)``: the guide is scored once on its own draws (the
total derivative through ``z`` and ``phi``) and once more, replayed on the detached draws (the
derivative through ``phi`` alone), and the difference keeps exactly the path through ``z``.
This needs no copy of the guide's distributions or networks, so it holds for hierarchical
guides (a later site's parameters depending on an earlier draw), full-covariance Normals and
flows: the replayed scoring inverts an IAF afresh (the detached draw is not the tensor its
transforms cached), while the first scoring uses the cached inverse of the draw itself. The
model sees the draws through a gradient hook that rescales each particle's ``d/dz`` from
``w~_k`` (what the logsumexp gives) to ``(1 - beta) w~_k + beta w~_k^2``: ``w~_k^2`` at
``beta = 1``; under KL warm-up's ``beta`` on the guide sites the score term is ``beta`` times
Tucker et al.'s, hence the mixed weight (the model's own parameters keep ``w~_k``).

Refused with a ``ValueError`` that says what to use instead: non-reparameterizable guide sites
under ``iwae``/``dreg`` (their pathwise gradient would silently miss the score term; use
``vimco`` or ``enum``), global latents outside the data plate (the bound does not factor per
datapoint; use ``reparam``/``stl``/``score``), ``vimco`` with ``K = 1``, and ``dreg`` with guide
sites under different ``poutine.scale`` factors.
"""

from __future__ import annotations

import math
from typing import Callable

import pyro
import torch
from pyro import poutine

from ppgen.infer.traces import (
    check_positive_int,
    check_same_latents,
    inner_scale,
    log_density,
    particle_sites,
    plate_nesting_from,
    trace_particles,
    with_values,
    _data_frame,
)

__all__ = ["IWAE_ELBO", "DReG_ELBO", "VIMCO_ELBO"]


class IWAE_ELBO(pyro.infer.ELBO):
    """The importance-weighted bound of Burda et al. (2016), per datapoint:

        L_K = m * sum_n [ logsumexp_k (log p(x_n, z_nk) - log q(z_nk | x_n)) - log K ]

    with ``K = num_particles`` vectorized draws and pathwise gradients. On an unscaled batch this
    equals Pyro's ``RenyiELBO(alpha=0, vectorize_particles=True)`` (tested). The difference is
    minibatch scaling: Pyro scales the log weights *inside* the logsumexp, so under the SVI
    loop's ``N / B`` data-plate scale it optimizes a tempered objective; here that minibatch
    factor ``m`` multiplies the per-datapoint bounds, which keeps the full-data objective
    unbiased, while every other ``poutine.scale`` (KL warm-up) stays inside each log weight
    (see the module docstring). The guide must be reparameterized: a site without ``rsample``
    is refused (use ``vimco`` or ``enum``).

    :param num_particles: ``K``, drawn in one vectorized pass (``vectorize_particles`` is
        accepted for Pyro's interface and always true).
    :param max_plate_nesting: the model's plates; found by tracing once if not given.
    """

    name = "iwae"

    def __init__(
        self,
        num_particles: int = 1,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        **kwargs,
    ):
        check_positive_int("num_particles", num_particles)
        super().__init__(
            num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting, **kwargs
        )

    # -- shared pieces ---------------------------------------------------------------------
    def _full(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
        """Dim of the particle plate: one left of the model's plates."""
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = plate_nesting_from(model, guide, args, kwargs)
        return int(self.max_plate_nesting) + 1

    def _require_rsample(self, guide_tr) -> None:
        for name, site in particle_sites(guide_tr, observed=False):
            if not site["fn"].has_rsample:
                raise ValueError(
                    f"estimator {self.name!r} differentiates through reparameterized draws, but guide "
                    f"site {name!r} ({type(site['fn']).__name__}) has no rsample: its pathwise gradient "
                    f"would silently miss the score term. Use 'vimco' (multi-sample score function, "
                    f"the same bound) or 'enum' (exact sum over a discrete site) instead"
                )

    def _model_terms(self, model, guide_tr, args, kwargs, full, log_q_factor):
        """Replay ``model`` on ``guide_tr``: ``(log p (K, B), minibatch factor)``."""
        model_tr = trace_particles(model, args, kwargs, self.num_particles, full, replay=guide_tr)
        check_same_latents(guide_tr, model_tr)
        log_p, factor, size = log_density(model_tr, full, self.num_particles, observed=True, scaled=True)
        model_tr.nodes.clear()  # reference cycles: free the activations now
        if size is None:
            raise ValueError("the model has no sample site inside a pyro.plate('data', ...)")
        if log_q_factor is not None and abs(log_q_factor - factor) > 1e-9 * abs(factor):
            raise ValueError(
                f"model and guide sites of the 'data' plate must share one minibatch factor (N / B), "
                f"got {factor!r} in the model and {log_q_factor!r} in the guide: wrap both in DataScale"
            )
        return log_p, factor

    def _bound_from(self, log_w: torch.Tensor, factor: float) -> torch.Tensor:
        return factor * (torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()

    def _bound(self, model: Callable, guide: Callable, *args, check_rsample: bool = False, **kwargs) -> torch.Tensor:
        """``L_K`` with the pathwise graph (the ``iwae`` surrogate is the bound itself)."""
        full = self._full(model, guide, args, kwargs)
        guide_tr = trace_particles(guide, args, kwargs, self.num_particles, full)
        if check_rsample:
            self._require_rsample(guide_tr)
        log_q, q_factor, _ = log_density(guide_tr, full, self.num_particles, observed=False, scaled=True)
        log_p, factor = self._model_terms(model, guide_tr, args, kwargs, full, q_factor)
        guide_tr.nodes.clear()
        return self._bound_from(log_p - log_q, factor)

    def _surrogate(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """A scalar whose value is ``L_K`` and whose gradient is the estimator's."""
        return self._bound(model, guide, *args, check_rsample=True, **kwargs)

    # -- Pyro's ELBO interface ---------------------------------------------------------------
    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict):
        """One unvectorized ``(model_trace, guide_trace)`` pair (Pyro's ELBO interface)."""
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        return model_tr, guide_tr

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """``-L_K`` (one draw of the bound, no gradients; any guide, as for evidence)."""
        with torch.no_grad():
            return -float(self._bound(model, guide, *args, **kwargs))

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """``-L_K`` as a tensor whose backward gives the estimator's gradient (first order)."""
        return -self._surrogate(model, guide, *args, **kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        loss = -self._surrogate(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


def _per_particle(c: torch.Tensor, site: dict, full: int) -> torch.Tensor:
    """Weights ``c`` of shape ``(K, B)`` laid out to broadcast against ``site``'s value
    ``(K, ..., B, ..., *event)``: particles at dim ``-full``, datapoints at the data plate's dim
    (both counted from the right of the batch shape)."""
    value = site["value"]
    batch = value.ndim - len(site["fn"].event_shape)
    shape = [1] * value.ndim
    shape[batch - full] = c.shape[0]
    shape[batch + _data_frame(site).dim] = c.shape[1]
    return c.reshape(shape)


class DReG_ELBO(IWAE_ELBO):
    """Doubly reparameterized gradient of the per-datapoint IWAE bound (Tucker, Lawson, Gu &
    Maddison 2019, "Doubly reparameterized gradient estimators for Monte Carlo objectives").

    The bound and its value are those of :class:`IWAE_ELBO`; only the gradient differs. Model
    parameters ``theta`` get ``sum_k w~_k d log w_k / d theta``; guide parameters ``phi`` get
    ``sum_k w~_k^2 (d log w_k / d z_k)(d z_k / d phi)`` with ``log q`` evaluated at stopped
    ``phi``, which has the same expectation as the ``iwae`` gradient with the score term's noise
    removed: its guide gradients have zero variance when ``q`` is the exact posterior (all
    weights equal), and its signal-to-noise ratio grows like ``sqrt(K)`` where ``iwae``'s falls
    like ``1 / sqrt(K)`` (Rainforth et al. 2018; ``bench/snr_vs_k.py``). At ``K = 1`` it is the
    "sticking the landing" gradient of the ELBO (Roeder et al. 2017). Under KL warm-up
    (``poutine.scale(beta)`` on the guide sites) the weights become
    ``(1 - beta) w~_k + beta w~_k^2``, the same derivation with the score term scaled by
    ``beta``. Each site is scored twice (see the module docstring); the model runs once.
    """

    name = "dreg"

    def _surrogate(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        k = self.num_particles
        full = self._full(model, guide, args, kwargs)
        guide_tr = trace_particles(guide, args, kwargs, k, full)
        self._require_rsample(guide_tr)
        sites = particle_sites(guide_tr, observed=False)
        beta = self._guide_scale(sites)
        # Score the draws first: an IAF's log_prob of its own draw uses the transforms' cache,
        # which the replayed scoring below overwrites.
        log_q, q_factor, _ = log_density(guide_tr, full, k, observed=False, scaled=True)
        detached = {name: site["value"].detach() for name, site in sites}
        replayed = trace_particles(guide, args, kwargs, k, full, replay=with_values(guide_tr, detached))
        log_q_phi, _, _ = log_density(replayed, full, k, observed=False, scaled=True)
        replayed.nodes.clear()
        log_q_stopped = log_q - log_q_phi + log_q_phi.detach()  # d/dphi only through z

        weights = {}  # filled once the weights are known; read by the hooks during backward

        def hooked(site):
            z = site["value"]
            if not z.requires_grad:
                return z
            z = z.view_as(z)
            z.register_hook(lambda g, site=site: g * _per_particle(weights["model"], site, full).to(g.dtype))
            return z

        values = {name: hooked(site) for name, site in sites}
        log_p, factor = self._model_terms(model, with_values(guide_tr, values), args, kwargs, full, q_factor)
        guide_tr.nodes.clear()
        with torch.no_grad():
            w = torch.softmax(log_p - log_q, 0)  # (K, B)
            weights["model"] = (1.0 - beta) + beta * w  # d/dz rescaled from w~ to (1-b) w~ + b w~^2
            guide_weight = (1.0 - beta) * w + beta * w * w
        bound = self._bound_from(log_p - log_q.detach(), factor)
        path = -factor * (guide_weight * log_q_stopped).sum()
        return bound + (path - path.detach())

    def _guide_scale(self, sites) -> float:
        scales = set()
        for name, site in sites:
            s = inner_scale(site)
            if isinstance(s, torch.Tensor):
                if s.numel() != 1:
                    raise ValueError(
                        f"'dreg' needs one poutine.scale factor for all guide sites; site {name!r} has a "
                        f"tensor scale of shape {tuple(s.shape)}: use 'iwae' for per-element scales"
                    )
                s = float(s)
            scales.add(float(s))
        if len(scales) > 1:
            raise ValueError(
                f"'dreg' needs one poutine.scale factor shared by all guide sites (its weights "
                f"(1 - beta) w~ + beta w~^2 use it), got {sorted(scales)}: use 'iwae' instead"
            )
        return scales.pop() if scales else 1.0


class VIMCO_ELBO(IWAE_ELBO):
    """Variational inference for Monte Carlo objectives (Mnih & Rezende 2016): a multi-sample
    score-function gradient of the per-datapoint IWAE bound with leave-one-out baselines.

    Every guide site is treated by its score (discrete and continuous alike; continuous draws
    are simply not differentiated through): with ``L = logsumexp_k log w_k - log K`` and
    ``L^{-k}`` the same with ``log w_k`` replaced by the mean of the other ``K - 1`` log weights,

        grad = sum_k w~_k d log w_k |_z  +  sum_k (L - L^{-k}) d log q(z_k) / d phi

    The first term differentiates the log weights at fixed draws (model parameters, and the
    guide's direct ``-d log q / d phi``); the second is the score term, each particle's learning
    signal centred by a baseline that does not depend on its own draw, so the estimate stays
    unbiased for the gradient of ``L_K``. The score uses the sampling density ``q`` itself
    (unscaled); KL warm-up's ``beta`` enters through ``log w``. Needs ``K >= 2``.
    """

    name = "vimco"

    def __init__(
        self,
        num_particles: int = 2,
        vectorize_particles: bool = True,
        max_plate_nesting: float = float("inf"),
        **kwargs,
    ):
        check_positive_int("num_particles", num_particles)
        if num_particles < 2:
            raise ValueError(
                f"'vimco' needs num_particles >= 2 (each particle's baseline is built from the other "
                f"K - 1), got {num_particles}: use --particles 2 or more, or 'score' for one particle"
            )
        super().__init__(num_particles, vectorize_particles, max_plate_nesting, **kwargs)

    def _surrogate(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        k = self.num_particles
        full = self._full(model, guide, args, kwargs)
        with torch.no_grad():  # draw only; the draws are fixed points for the score function
            drawn = trace_particles(guide, args, kwargs, k, full)
        values = {name: site["value"].detach() for name, site in particle_sites(drawn, observed=False)}
        guide_tr = trace_particles(guide, args, kwargs, k, full, replay=with_values(drawn, values))
        drawn.nodes.clear()
        log_q, q_factor, _ = log_density(guide_tr, full, k, observed=False, scaled=True)
        log_q_score, _, _ = log_density(guide_tr, full, k, observed=False, scaled=False)
        log_p, factor = self._model_terms(model, guide_tr, args, kwargs, full, q_factor)
        guide_tr.nodes.clear()
        log_w = log_p - log_q  # (K, B)
        with torch.no_grad():
            signal = leave_one_out_signal(log_w)
        score = factor * (signal * log_q_score).sum()
        return self._bound_from(log_w, factor) + (score - score.detach())


def leave_one_out_signal(log_w: torch.Tensor, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """VIMCO's learning signals ``L - L^{-k}`` for log weights ``log_w`` of shape ``(K, B)``.

    ``L^{-k} = log((sum_{j != k} w_j + exp(mean_{j != k} log w_j)) / K)`` (Mnih & Rezende 2016,
    the geometric-mean baseline), evaluated by a logsumexp over ``K`` terms per ``k`` (stable
    when one weight dominates, where subtracting ``w_k`` from the sum would cancel), in chunks
    of at most ``chunk_elements`` numbers. Returns shape ``(K, B)``.
    """
    k, b = log_w.shape
    if k < 2:
        raise ValueError(f"leave-one-out baselines need at least 2 particles, got log_w of shape {tuple(log_w.shape)}")
    total = torch.logsumexp(log_w, 0)  # (B,)
    mean_others = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # (K, B)
    out = torch.empty_like(log_w)
    step = max(1, chunk_elements // max(1, k * b))
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device)
    for i in range(0, k, step):
        rows = slice(i, min(k, i + step))
        # grid[r, j, n] = log w_jn, with j = r's own particle replaced by the mean of the others
        grid = torch.where(eye[rows].unsqueeze(-1), mean_others[rows].unsqueeze(1), log_w.unsqueeze(0))
        out[rows] = total - torch.logsumexp(grid, 1)
    return out
