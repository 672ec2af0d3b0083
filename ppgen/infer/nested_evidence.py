"""Joint evidence ``log p(x_1..N)`` of a model with global latents, by nested importance sampling.

A model with latents ``g`` outside the data plate (a global mean, shared weights, a discrete
switch) and local latents ``z_n`` inside it has no per-datapoint evidence: the datapoints are
dependent through ``g``. What exists is the joint evidence

    p(X)       = E_{q(g)} [ p(g) / q(g) * prod_n p(x_n | g) ],
    p(x_n | g) = E_{q(z | x_n, g)} [ p(x_n, z | g) / q(z | x_n, g) ].

Both expectations are estimated by importance sampling with the guide as the proposal: ``S``
outer draws ``g_s ~ q(g)`` (the guide's sites outside the data plate) and, for each ``g_s`` and
each datapoint, ``K`` inner draws ``z_nk ~ q(z | x_n, g_s)`` (the guide's sites inside the data
plate, replayed with the globals fixed at ``g_s``):

    log p^(x_n | g_s) = logsumexp_k [log p(x_n, z_nk | g_s) - log q(z_nk | x_n, g_s)] - log K
    log W_s           = log p(g_s) - log q(g_s) + sum_n log p^(x_n | g_s)
    log p^(X)         = logsumexp_s log W_s - log S

Given ``g_s`` the inner estimates of different datapoints use independent draws, so their
product is unbiased for ``prod_n p(x_n | g_s)`` and ``W_s`` is unbiased for ``p(X)``, as an
unbiased likelihood estimate is in pseudo-marginal MCMC (Andrieu & Roberts 2009, "The
pseudo-marginal approach for efficient Monte Carlo computations"). Nested Monte Carlo is biased
in general (Rainforth et al. 2018, "On nesting Monte Carlo estimators"); the product form is what
keeps this one unbiased. Unbiased for ``p(X)``, *not* for ``log p(X)``: the log underestimates
it in expectation (Jensen), by about half the squared relative standard error of the mean of the
``W_s``. Sites observed outside the data plate count with the globals: their log-density enters
``log p(g_s)``.

S against K. The inner noise of ``log p^(X | g) = sum_n log p^(x_n | g)`` has variance
``sigma^2 ~= sum_n Var(log p^(x_n | g))``, about ``N / K`` times the relative variance of one
inner weight: it grows with ``N`` and only ``K`` tames it. Near-Gaussian noise of variance
``sigma^2`` in a log weight multiplies the outer weights' second moment by ``exp(sigma^2)``, so
the ``S`` needed for a given standard error grows like ``exp(sigma^2)`` on top of what the outer
spread of ``p(g) p(X | g) / q(g)`` asks for, and the outer k-hat rises. So choose ``K`` first,
until :attr:`JointEvidenceResult.inner_stderr` (``sigma``: the median over outer draws of the
standard error of ``sum_n log p^(x_n | g_s)``) is well below one nat, then ``S`` until the outer
k-hat is trusted. On the conjugate test model (``N = 20``, ``D = 3``) ``K = 10`` gave
``sigma = 0.61`` and k-hat 0.31, ``K = 50`` ``sigma = 0.28`` and k-hat 0.07 (``S = 200``).
The reported standard error is that of the ``S`` outer weights, each of which already carries
its inner noise, so it covers both sources.

Memory. Globals are drawn and scored from one call of the guide and the model on the *whole*
data set (their guide may depend on all of it), ``outer_chunk`` draws at a time: one vectorized
pass over ``outer_chunk * N`` datapoints, whose local draws are discarded. The inner pass holds
``num_inner * outer_chunk * batch_size`` local draws (one network pass of that many inputs); the
weights kept are ``O(S)`` floats plus the ``(outer_chunk, N)`` per-datapoint terms. Work is therefore
about ``S * N * (K + 1)`` datapoint evaluations. Draws come from one random stream seeded by
``seed``; a different ``outer_chunk`` or ``batch_size`` draws different (equally valid) samples.

Diagnostics (on the ``S`` outer log weights): the delta-method standard error of ``log p^(X)``,
Kish's effective sample size and the Pareto k-hat (:func:`ppgen.infer.evidence.psis_khat`,
trusted up to :func:`ppgen.infer.evidence.khat_threshold` ``(S)``; NaN below ``S = 10``).

Per datapoint: ``log p(x_n | g*)`` at one point ``g*`` of the guide's globals (their means, modes
or medians: :func:`ppgen.infer.global_point.global_point`), by the same inner importance sampling
with ``K`` draws.

For a model whose latents all sit in the data plate use :func:`ppgen.infer.evidence.log_evidence`
(per-datapoint evidence); this module refuses it.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import pyro
import torch
from pyro import poutine

from ppgen.infer.batches import slice_arguments
from ppgen.infer.evidence import khat_threshold, kish_ess, log_mean_exp, psis_khat
from ppgen.infer.global_point import _AtCenter, global_point
from ppgen.infer.plates import _data_frame, _sample_sites, _split_at_plate
from ppgen.infer.support import check_guide_support
from ppgen.infer.traces import check_positive_int, plate_nesting_from, trace_particles
from ppgen.runs import seeded

__all__ = ["JointEvidenceResult", "joint_log_evidence", "global_point"]

_INNER = "_ppgen_inner_particles"


class JointEvidenceResult(NamedTuple):
    """What :func:`joint_log_evidence` returns.

    :param log_px: nested IS estimate of the joint ``log p(x_1..N)`` (nats, a float; divide by
        ``N`` for nats per datapoint).
    :param stderr: delta-method standard error of ``log_px``: ``sd(W) / (sqrt(S) mean(W))`` of
        the ``S`` outer weights (covers outer and inner noise).
    :param ess: Kish effective sample size of the ``S`` outer weights.
    :param khat: Pareto k-hat of the outer weights; NaN for ``S < 10``, ``-inf`` for equal weights.
    :param khat_threshold: the largest trusted k-hat for ``S`` weights (None for ``S < 10``).
    :param inner_stderr: median over outer draws of the standard error of
        ``sum_n log p^(x_n | g_s)`` from the inner draws (0 without local latents, NaN for ``K = 1``).
    :param log_w: the ``S`` outer log weights ``log W_s`` (float64), for further diagnostics.
    :param log_px_given_globals: ``log p^(x_n | g*)`` per datapoint, shape ``(N,)`` (float64).
    :param log_px_given_globals_stderr: its delta-method standard error, shape ``(N,)`` (NaN
        for ``K = 1`` with local latents).
    :param globals_point: ``{site: value}`` of ``g*``, shaped as the guide draws it without
        particle plates (auxiliary guide sites left out).
    :param num_outer: ``S``.
    :param num_inner: ``K`` (1 when the model has no local latents: the inner term is exact).
    """

    log_px: float
    stderr: float
    ess: float
    khat: float
    khat_threshold: Optional[float]
    inner_stderr: float
    log_w: torch.Tensor
    log_px_given_globals: torch.Tensor
    log_px_given_globals_stderr: torch.Tensor
    globals_point: dict
    num_outer: int
    num_inner: int

    @property
    def trusted(self) -> bool:
        """Whether the outer k-hat is at most its sample-size threshold (False for ``S < 10``)."""
        return self.khat_threshold is not None and not math.isnan(self.khat) and self.khat <= self.khat_threshold


def _reduced_log_prob(site: dict, full: int, keep: int, data_axis: Optional[int]) -> torch.Tensor:
    """A site's plain (unscaled, masked) log-density summed over every batch dim except the first
    ``keep`` (particle dims) and ``data_axis`` (if given); shape ``(d_0, .., d_keep-1[, B])``
    with size-1 dims where the site does not vary."""
    lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    if site["mask"] is not None and site["mask"] is not True:
        lp = torch.where(torch.as_tensor(site["mask"], device=lp.device), lp, lp.new_zeros(()))
    if lp.ndim > full:
        raise ValueError(
            f"site {site['name']!r} has log_prob of shape {tuple(lp.shape)}: more batch dims than "
            f"plates ({full - keep}); declare event dims with .to_event()"
        )
    lp = lp.reshape((1,) * (full - lp.ndim) + tuple(lp.shape))
    other = [a for a in range(keep, full) if a != data_axis]
    if other:
        lp = lp.sum(other, keepdim=True)
    shape = tuple(lp.shape[:keep]) + ((lp.shape[data_axis],) if data_axis is not None else ())
    return lp.reshape(shape)


def _check_same_latents(guide_tr, model_tr) -> None:
    """Model and guide latents must agree; the guide's auxiliary sites (``infer={"is_auxiliary":
    True}``, e.g. the unconstrained draws of Pyro's ``AutoNormal``) are proposal-only: they
    enter ``log q`` and are replayed, but have no model counterpart."""
    def latents(tr, skip_auxiliary):
        return {
            name for name, site in _sample_sites(tr, latent_only=True)
            if not (skip_auxiliary and site["infer"].get("is_auxiliary"))
        }

    guide_latents, model_latents = latents(guide_tr, True), latents(model_tr, False)
    if guide_latents != model_latents:
        raise ValueError(
            "model and guide must have the same latent sites; model only: "
            f"{sorted(model_latents - guide_latents)}, guide only: {sorted(guide_latents - model_latents)}"
        )


def _check_full_plate(tr, data_plate: str) -> None:
    for name, site in _sample_sites(tr, latent_only=False):
        frame = _data_frame(site, data_plate)
        if frame is not None and frame.full_size is not None and frame.full_size != frame.size:
            raise ValueError(
                f"site {name!r} sits in a subsampling pyro.plate({data_plate!r}, {frame.full_size}, "
                f"subsample_size={frame.size}); joint evidence needs every datapoint: declare the "
                f"plate without subsampling (the data argument decides its size)"
            )


def _as_particle_value(value: torch.Tensor, event_dim: int, full: int) -> torch.Tensor:
    """Left-pad a global value to ``full`` batch dims (the particle dim first)."""
    return value.reshape((1,) * (full + event_dim - value.ndim) + tuple(value.shape))


def _inner_log_weights(
    model, guide, x, args, kwargs, globals_tr, num_outer, num_inner, full_outer, data_plate
) -> torch.Tensor:
    """Per-datapoint log weights ``(K, S_c, B)`` of the local sites given the globals in
    ``globals_tr`` (their values drawn under an outer particle plate of ``S_c = num_outer``
    draws at dim ``-full_outer``; the inner plate of ``K`` draws sits just outside it)."""
    full = full_outer + 1
    replay = poutine.Trace()
    for name, site in globals_tr.nodes.items():
        value = site["value"].expand((num_inner,) + tuple(site["value"].shape))
        replay.add_node(name, **dict(site, value=value))
    with pyro.plate(_INNER, num_inner, dim=-full):
        guide_tr = trace_particles(guide, (x, *args), kwargs, num_outer, full_outer, replay=replay)
        model_tr = trace_particles(model, (x, *args), kwargs, num_outer, full_outer, replay=guide_tr)
    total = x.new_zeros((), dtype=torch.float64)
    for tr, latent_only, sign in ((model_tr, False, 1.0), (guide_tr, True, -1.0)):
        _, inside = _split_at_plate(tr, data_plate, latent_only)
        for site in inside.values():
            axis = full + _data_frame(site, data_plate).dim
            total = total + sign * _reduced_log_prob(site, full, 2, axis).double()
    model_tr.nodes.clear()
    guide_tr.nodes.clear()
    return total.expand(num_inner, num_outer, len(x))


def _inner_pass(model, guide, data, args, kwargs, globals_tr, num_outer, num_inner, batch_size, full_outer, data_plate):
    """Sum over datapoints of ``log p^(x_n | g_s)`` ``(S_c,)``, the variance of that sum from the
    inner draws ``(S_c,)``, and the per-datapoint terms ``(S_c, N)``."""
    n = len(data)
    per_point, per_point_se = [], []
    for i in range(0, n, batch_size):
        chunk_args, chunk_kwargs = slice_arguments(args, kwargs, n, slice(i, i + batch_size))
        lw = _inner_log_weights(
            model, guide, data[i : i + batch_size], chunk_args, chunk_kwargs,
            globals_tr, num_outer, num_inner, full_outer, data_plate,
        ).cpu()  # (K, S_c, B)
        lw = lw.permute(1, 2, 0)  # (S_c, B, K)
        log_p, se = log_mean_exp(lw)
        per_point.append(log_p)
        per_point_se.append(se)
    log_p, se = torch.cat(per_point, -1), torch.cat(per_point_se, -1)
    return log_p.sum(-1), se.pow(2).sum(-1), log_p, se


def _globals_of(tr, data_plate: str) -> poutine.Trace:
    """A trace of ``tr``'s latent sites outside the data plate (what the inner pass replays)."""
    out = poutine.Trace()
    for name, site in _split_at_plate(tr, data_plate, latent_only=True)[0].items():
        out.add_node(name, **site)
    return out


@torch.no_grad()
def joint_log_evidence(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *args,
    num_outer: int = 100,
    num_inner: int = 100,
    batch_size: int = 100,
    outer_chunk: int = 10,
    seed: Optional[int] = 0,
    data_plate: str = "data",
    **kwargs,
) -> JointEvidenceResult:
    """Nested importance-sampled joint ``log p(x_1..N)`` of a model with global latents.

    :param model: Pyro model ``model(x, *args, **kwargs)`` with a ``pyro.plate(data_plate, len(x))``
        around its local latents and observations and at least one latent outside it. Tensors in
        ``args``/``kwargs`` whose dim 0 has length ``N`` are sliced with the data
        (:func:`ppgen.infer.batches.slice_arguments`); the rest pass unchanged.
    :param guide: its guide, the proposal ``q(g) prod_n q(z_n | x_n, g)``: same latent sites,
        locals drawn inside the same data plate (they may depend on the globals).
    :param data: tensor of shape ``(N, ...)`` on the device the model runs on.
    :param num_outer: ``S >= 1`` outer draws of the globals (10 or more for a k-hat).
    :param num_inner: ``K >= 1`` inner draws of the locals per datapoint and outer draw.
    :param batch_size: datapoints per inner pass.
    :param outer_chunk: outer draws per vectorized pass (memory: see the module docstring).
    :param seed: seeds torch for the draws (the caller's random state is restored); ``None``
        uses the current state.
    :param data_plate: name of the plate over datapoints.
    :returns: :class:`JointEvidenceResult`.
    :raises ValueError: no global latent (use :func:`ppgen.infer.evidence.log_evidence`), no
        site in the data plate, a subsampling data plate, model and guide with different latents,
        a guide giving probability 0 to discrete values the model allows
        (:func:`ppgen.infer.support.check_guide_support`).
    """
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if data.ndim < 1 or len(data) == 0:
        raise ValueError(f"data must have shape (N, ...) with N >= 1, got {tuple(data.shape)}")
    if not isinstance(data_plate, str) or not data_plate:
        raise TypeError(f"data_plate must be the name of the plate over datapoints (a str), got {data_plate!r}")
    for name, value in (
        ("num_outer", num_outer), ("num_inner", num_inner), ("batch_size", batch_size), ("outer_chunk", outer_chunk)
    ):
        check_positive_int(name, value)
    nesting = plate_nesting_from(model, guide, (data, *args), kwargs)
    # A guide that never proposes a discrete value the model allows (global or local) is refused.
    check_guide_support(model, guide, [((data, *args), kwargs)], data_plate)
    full = nesting + 1  # the outer particle plate sits at dim -full
    with seeded(seed, data.device):
        log_w, inner_var, num_locals, rounding = [], [], None, 0.0
        for s0 in range(0, num_outer, outer_chunk):
            sc = min(outer_chunk, num_outer - s0)
            # Globals: one pass of guide and model over the whole data set (locals discarded).
            guide_tr = trace_particles(guide, (data, *args), kwargs, sc, full)
            model_tr = trace_particles(model, (data, *args), kwargs, sc, full, replay=guide_tr)
            if num_locals is None:
                _check_same_latents(guide_tr, model_tr)
                _check_full_plate(model_tr, data_plate)
                q_out, q_in = _split_at_plate(guide_tr, data_plate, latent_only=True)
                _, p_in = _split_at_plate(model_tr, data_plate, latent_only=False)
                if not p_in:
                    raise ValueError(
                        f"the model has no sample site inside a pyro.plate({data_plate!r}, ...); name "
                        f"the plate over datapoints with data_plate= (got {data_plate!r})"
                    )
                if not q_out:
                    raise ValueError(
                        f"the model has no latent outside the pyro.plate({data_plate!r}, ...): its "
                        "evidence factors per datapoint; use ppgen.infer.evidence.log_evidence for "
                        "per-datapoint log p(x_n)"
                    )
                num_locals = len(q_in)
                if num_locals == 0:
                    num_inner = 1  # p(x_n | g) is exact: no inner sampling needed
            log_outer = data.new_zeros((sc,), dtype=torch.float64)
            for sign, sites in ((1.0, _split_at_plate(model_tr, data_plate, latent_only=False)[0].values()),
                                (-1.0, _split_at_plate(guide_tr, data_plate, latent_only=True)[0].values())):
                for site in sites:
                    lp = _reduced_log_prob(site, full, 1, None)
                    # k-hat's equal-weights test needs the rounding of the dtype the model computed in
                    if lp.is_floating_point():
                        rounding = max(rounding, torch.finfo(lp.dtype).eps)
                    log_outer = log_outer + sign * lp.double().expand(sc)
            globals_tr = _globals_of(guide_tr, data_plate)
            model_tr.nodes.clear()
            log_lik, var, _, _ = _inner_pass(
                model, guide, data, args, kwargs, globals_tr, sc, num_inner, batch_size, full, data_plate
            )
            log_w.append(log_outer.cpu() + log_lik)
            inner_var.append(var)
            guide_tr.nodes.clear()
        log_w = torch.cat(log_w)
        # The point g*: the guide's globals at their means, then per-datapoint log p(x_n | g*).
        with poutine.block():
            center_tr = trace_particles(_AtCenter(data_plate)(guide), (data, *args), kwargs, 1, full)
        point = _globals_of(center_tr, data_plate)
        point_values = {
            name: site["value"].detach().clone()
            for name, site in point.nodes.items()
            if not site["infer"].get("is_auxiliary")
        }
        for site in point.nodes.values():
            site["value"] = _as_particle_value(site["value"], site["fn"].event_dim, full)
        _, _, at_point, at_point_se = _inner_pass(
            model, guide, data, args, kwargs, point, 1, num_inner, batch_size, full, data_plate
        )
    if num_locals and num_inner == 1:  # one inner weight: its spread cannot be estimated
        inner_var = [torch.full_like(v, math.nan) for v in inner_var]
        at_point_se = torch.full_like(at_point_se, math.nan)
    rounding = rounding or torch.finfo(torch.float64).eps
    log_px, stderr = log_mean_exp(log_w)
    return JointEvidenceResult(
        log_px=float(log_px),
        stderr=float(stderr),
        ess=float(kish_ess(log_w)),
        khat=float(psis_khat(log_w, rounding)),
        khat_threshold=khat_threshold(num_outer) if num_outer >= 10 else None,
        inner_stderr=float(torch.cat(inner_var).sqrt().median()),
        log_w=log_w,
        log_px_given_globals=at_point[0],
        log_px_given_globals_stderr=at_point_se[0],
        globals_point=point_values,
        num_outer=num_outer,
        num_inner=num_inner,
    )
