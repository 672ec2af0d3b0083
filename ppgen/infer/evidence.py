"""Per-datapoint importance-sampled evidence ``log p(x)`` for any Pyro model/guide pair.

For each datapoint ``x_n`` the guide proposes ``z_k ~ q(z | x_n)`` and

    log p(x_n) ~= logsumexp_k [log p(x_n, z_k) - log q(z_k | x_n)] - log K

(Burda et al. 2016, "Importance Weighted Autoencoders"). Pyro's ``Importance`` and
``psis_diagnostic`` weight a whole minibatch jointly; here the log weights are kept *per
datapoint*: every site's ``log_prob`` is summed over all dimensions except the datapoint plate
(and the particle plate). Particles are vectorized with an extra outermost ``pyro.plate``.
The data may be one tensor, a tuple of tensors aligned on dim 0 or a dict of keyword arguments,
sliced alike (:func:`ppgen.infer.batches.as_batch`); the datapoint plate is the one named
``data_plate`` (default ``"data"``), else the model's single plate of the chunk's size
(:func:`ppgen.infer.traces.find_data_plate`). Networks run in eval mode
(:func:`ppgen.infer.networks.eval_mode`), their previous modes restored afterwards.

Work is chunked over datapoints (``batch_size``) and over particles (``particle_chunk``), so
memory is ``O(batch_size * K)`` floats for the weights plus one network pass of
``batch_size * particle_chunk`` inputs. On CPU the guide's draws come from one random stream in
particle-major order, so chunking over ``K`` reproduces the unchunked numbers exactly (when each
chunk's draw size is a multiple of 16, as for ``B * z_dim`` below); a different datapoint chunk
size draws different (equally valid) samples.

Diagnostics per datapoint (:mod:`ppgen.infer.diagnostics`, re-exported here): the delta-method
standard error of the estimate, Kish's effective sample size ``(sum w)^2 / sum w^2`` and the
Pareto k-hat of the weights (Vehtari et al. 2024; ArviZ ``psislw``), trusted up to
:func:`khat_threshold` ``(K)`` (NaN, never trusted, below ``K = 10``; ``-inf`` for weights equal up
to rounding). The IWAE bound for a ladder of ``K`` values comes from nested prefixes of the same
samples.

A guide that never proposes a value of a discrete latent that the model allows (probability
exactly 0: a semi-supervised guide pinning a given label) makes IS estimate the evidence of the
values it proposes only (``log p(x, y)``, not ``log p(x)``), with weights that look perfect; such a
pair is refused before sampling (:func:`ppgen.infer.support.check_guide_support`: one guide and one
model trace per chunk, off the random stream; continuous pairs pay one trace pair). Enumerated
sites and merely confident guides (tiny but positive probabilities) pass.

Models that cannot take the particle dimension. Some models break under the extra plate:
boolean-mask indexing (``loc[mask]`` with a ``(B, D)`` mask on ``(K, B, D)`` values), a
``BatchNorm1d`` that sees the latent (it reads a 3-D ``(K, B, F)`` input as ``(N, C, L)``: a shape
error, or -- when ``B`` happens to equal ``F`` -- silently wrong numbers), reshapes that assume
``(B, ...)``, Python control flow on values. ``vectorize=None`` (default) therefore checks each
datapoint chunk first: one draw of the guide is scored by an ordinary trace and, repeated over two
particles, by the vectorized one (off the random stream); if the two log weights differ, or the
vectorized pass raises, the chunk and all later ones run a sequential loop over particles (each an
ordinary trace of guide and model over the whole chunk, no particle plate), with a warning that
states why. The loop draws from the same distribution; on CPU, particle by particle from the same
stream, so it reproduces the vectorized numbers when each draw's size is a multiple of 16.
``vectorize=True`` trusts the model (no check; errors propagate), ``vectorize=False`` always
loops. What silently survives the check: a model whose vectorized log weight is right for equal
particles but wrong for different ones (it mixes particles, e.g. a normalization over dim 0) --
pass ``vectorize=False`` for such a model. :attr:`EvidenceResult.path` says which path ran.

Proposals. ``proposal=`` draws from a proposal object instead of the guide's traces
(:mod:`ppgen.infer.proposals`: refined local ``q*``, widened, Student-t, defensive mixture; one
local latent site), still unbiased for ``p(x)``; :mod:`ppgen.infer.trusted` picks one by k-hat
within a budget and splits the inference gap into approximation and amortization.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ppgen.infer.batches import as_batch, slice_arguments
from ppgen.infer.diagnostics import (
    iwae_ladder_sizes,
    khat_threshold,
    khat_untrusted,
    kish_ess,
    log_mean_exp,
    psis_khat,
)
from ppgen.infer.networks import eval_mode
from ppgen.infer.particles import sequential_log_weights, vectorization_problem
from ppgen.infer.proposals import Guide, as_proposal, local_pair, proposal_log_weights
from ppgen.infer.support import check_guide_support
from ppgen.infer.traces import (
    DATA,
    check_positive_int,
    find_data_plate,
    log_weights_of,
    per_datapoint_log_weights,
)
from ppgen.runs import seeded

__all__ = [
    "EvidenceResult",
    "log_evidence",
    "per_datapoint_log_weights",
    "psis_khat",
    "khat_threshold",
    "khat_untrusted",
    "kish_ess",
    "log_mean_exp",
    "iwae_ladder_sizes",
]

class EvidenceResult(NamedTuple):
    """What :func:`log_evidence` returns; per-datapoint tensors have shape ``(N,)`` (CPU, float64).

    :param log_px: IS estimate of ``log p(x_n)`` with all ``K`` samples.
    :param stderr: delta-method standard error of ``log_px``: ``sd(w) / (sqrt(K) mean(w))``.
    :param ess: Kish effective sample size of the ``K`` weights.
    :param khat: Pareto k-hat of the ``K`` weights (PSIS); NaN for ``K < 10``, ``-inf`` for equal
        weights.
    :param elbo: mean log weight over the ``K`` samples (a ``K``-sample estimate of the ELBO).
    :param ladder: ``{k: mean over datapoints of the k-sample IWAE bound}`` from nested prefixes.
    :param num_samples: ``K``.
    :param path: how the particles were drawn: ``"vectorized"`` (an outermost particle plate) or
        ``"sequential"`` (a loop of ordinary traces; also when the loop took over at a later
        chunk, ``note`` saying from which datapoint on), see :func:`log_evidence`'s ``vectorize``.
    :param note: why the sequential loop was taken when it was not asked for (the vectorized
        pass's error or mismatch), else ``None``.
    :param proposal: the proposal's name (``"guide"``: the guide's own traces).
    :param local: per-datapoint ``(N,)`` statistics the proposal found (a refined one: ``elbo_q``,
        ``elbo_qstar`` and their ``_se``; :mod:`ppgen.infer.proposals`), else ``None``.
    """

    log_px: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor
    elbo: torch.Tensor
    ladder: dict
    num_samples: int
    path: str = "vectorized"
    note: Optional[str] = None
    proposal: str = "guide"
    local: Optional[dict] = None

    def summary(self) -> dict:
        """Dataset-level numbers (nats per datapoint) as plain floats."""
        n = len(self.log_px)
        return {
            "n": n,
            "num_samples": self.num_samples,
            "elbo": float(self.elbo.mean()),
            "log_px": float(self.log_px.mean()),
            # Standard error of the dataset mean from the per-datapoint errors (independent draws).
            "log_px_stderr": float(self.stderr.pow(2).sum().sqrt() / n),
            "gap": float(self.log_px.mean() - self.elbo.mean()),
            "median_ess": float(self.ess.median()),
            # Vehtari et al.'s sample-size rule; None when K < 10 (no k-hat can be fitted).
            "khat_threshold": khat_threshold(self.num_samples) if self.num_samples >= 10 else None,
            # k-hat above the threshold, or NaN (K < 10): never counted as trusted.
            "khat_share_untrusted": float(khat_untrusted(self.khat, self.num_samples).double().mean()),
            "ladder": {str(k): v for k, v in self.ladder.items()},
            "path": self.path,
            "proposal": self.proposal,
        }


def plot_khat_arviz(*args, **kwargs):
    """ArviZ's k-hat plot; lives with the other figures in
    :func:`ppgen.infer.evidence_report.plot_khat_arviz` (same arguments), re-exported here."""
    from ppgen.infer.evidence_report import plot_khat_arviz as plot

    return plot(*args, **kwargs)


def _reduce(log_w: torch.Tensor, ladder: Sequence[int], rounding: float) -> dict:
    """Per-datapoint statistics of log weights of shape ``(B, K)`` (float64), computed by
    arithmetic of unit roundoff ``rounding``."""
    log_px, stderr = log_mean_exp(log_w)
    return {
        "log_px": log_px,
        "stderr": stderr,
        "ess": kish_ess(log_w),
        "khat": psis_khat(log_w, rounding),
        "elbo": log_w.mean(-1),
        "ladder": {j: (torch.logsumexp(log_w[:, :j], -1) - math.log(j)).sum() for j in ladder},
    }


VECTORIZED, SEQUENTIAL = "vectorized", "sequential"


def _vectorized_chunk(model, guide, args, kwargs, num_samples, particle_chunk, nesting, plate, size):
    """Log weights ``(B, K)`` (float64, CPU) by particle plates of ``particle_chunk``, and the unit
    roundoff of the dtype the model computed in."""
    log_w = torch.empty(size, num_samples, dtype=torch.float64)
    rounding = 0.0
    for k0 in range(0, num_samples, particle_chunk):
        kc = min(particle_chunk, num_samples - k0)
        lw, _ = log_weights_of(model, guide, args, kwargs, kc, nesting, data_plate=plate)
        if lw.shape[-1] != size:
            raise ValueError(
                f"the {plate!r} plate has {lw.shape[-1]} entries but the chunk has {size} "
                f"datapoints: the datapoint plate must have one entry per row of the data"
            )
        # k-hat's equal-weights test needs the rounding of the dtype the model computed in
        rounding = max(rounding, torch.finfo(lw.dtype).eps if lw.is_floating_point() else 0.0)
        log_w[:, k0 : k0 + kc] = lw.T.double().cpu()
        del lw
    return log_w, rounding


def _sequential_chunk(model, guide, args, kwargs, num_samples, nesting, plate, size):
    """Log weights ``(B, K)`` (float64, CPU) by ``K`` ordinary traces of the whole chunk, and the
    unit roundoff of the dtype the model computed in."""
    log_w = torch.empty(size, num_samples, dtype=torch.float64)
    rounding = 0.0
    for k in range(num_samples):
        lw, _ = sequential_log_weights(model, guide, args, kwargs, nesting, plate)
        if lw.shape != (size,):
            raise ValueError(
                f"the {plate!r} plate gives log weights of shape {tuple(lw.shape)} but the chunk has {size} "
                f"datapoints: the datapoint plate must have one entry per row of the data"
            )
        rounding = max(rounding, torch.finfo(lw.dtype).eps if lw.is_floating_point() else 0.0)
        log_w[:, k] = lw.double().cpu()
    return log_w, rounding


def _chunk_log_weights(model, guide, args, kwargs, num_samples, particle_chunk, nesting, plate, size, device,
                       vectorize, path):
    """Log weights ``(B, K)`` of one datapoint chunk by the path ``vectorize`` asks for (``path``:
    the one taken so far, ``None`` before the first chunk). Returns ``(log_w, rounding, path,
    problem)``, ``problem`` saying why this chunk fell back to the loop (else ``None``)."""
    common = (model, guide, args, kwargs)
    problem = None
    if path != SEQUENTIAL:
        fallback = vectorize is None
        if fallback:
            fallback, problem = vectorization_problem(*common, nesting, plate, size, device)
        if problem is None:
            state = _rng_state(device)
            try:
                log_w, rounding = _vectorized_chunk(*common, num_samples, particle_chunk, nesting, plate, size)
                return log_w, rounding, VECTORIZED, None
            except Exception as error:
                if not fallback:  # forced, or the loop cannot run the model either
                    if vectorize:
                        error.add_note("(vectorize=True drew the particles in a plate; a model that cannot take "
                                       "the particle dimension needs vectorize=False)")
                    raise
                problem = f"{type(error).__name__}: {error}"
                _set_rng_state(state, device)  # the loop starts from where the attempt started
    try:
        log_w, rounding = _sequential_chunk(*common, num_samples, nesting, plate, size)
    except Exception as error:
        if problem is not None:
            error.add_note(f"(the vectorized attempt had failed too: {problem})")
        raise
    return log_w, rounding, SEQUENTIAL, problem


@torch.no_grad()
def log_evidence(
    model: Callable,
    guide: Callable,
    data,
    num_samples: int = 1000,
    *args,
    batch_size: int = 100,
    particle_chunk: int = 500,
    ladder: Optional[Sequence[int]] = None,
    seed: Optional[int] = 0,
    progress: bool = False,
    data_plate: str = DATA,
    vectorize: Optional[bool] = None,
    proposal=None,
    **kwargs,
) -> EvidenceResult:
    """Importance-sampled ``log p(x_n)`` for every datapoint of ``data`` (Burda et al. 2016).

    :param model: Pyro model, called as ``model(x, *args, **kwargs)`` for a tensor ``data``,
        ``model(*data, *args, **kwargs)`` for a tuple and ``model(*args, **data, **kwargs)`` for a
        dict, with its datapoints in one plate (``data_plate``). Every tensor in
        ``args``/``kwargs`` whose dim 0 has length ``N`` (labels, masks, covariates) is sliced
        with the data, chunk by chunk; other arguments are passed unchanged
        (:func:`ppgen.infer.batches.slice_arguments`).
    :param guide: its guide (the proposal ``q(z | x)``), same signature and latent sites.
    :param data: a tensor ``(N, ...)``, a tuple of model arguments aligned on dim 0 (``None``
        entries pass unchanged: an unlabelled split) or a dict of keyword arguments
        (:func:`ppgen.infer.batches.as_batch`), on the device the model runs on.
    :param num_samples: ``K >= 1`` proposals per datapoint.
    :param batch_size: datapoints per chunk.
    :param particle_chunk: particles drawn per vectorized pass (bounds network memory; the
        sequential loop draws one particle per pass).
    :param ladder: ``K`` values for the IWAE bound (default :func:`iwae_ladder_sizes`).
    :param seed: seeds torch for the draws (the caller's random state is restored); ``None``
        uses the current state.
    :param data_plate: name of the plate over datapoints (default ``"data"``); a model with no
        plate of that name uses its single plate of the chunk's size, and none or several is an
        error (:func:`ppgen.infer.traces.find_data_plate`).
    :param vectorize: ``None`` (default): particles in a plate when the model takes it -- each
        chunk is first checked (one draw scored with and without the particle plate, off the random
        stream) and, if they disagree or the vectorized pass raises, this and every later chunk run
        the sequential loop from the same random state, with a ``UserWarning`` that states why.
        ``True``: vectorized, unchecked (errors propagate, suggesting ``vectorize=False``).
        ``False``: the sequential loop over particles (one ordinary trace of the chunk each): for
        models that cannot take a particle dimension (BatchNorm on the latent, boolean-mask
        indexing, Python control flow on values).
    :param proposal: ``None`` or ``"guide"`` (default): draw from the guide's traces, as above.
        Else a :class:`ppgen.infer.proposals.Proposal` (``Refined()``, ``Widened(Refined(), 1.25)``,
        ``StudentT``, ``Defensive``) for a model with one local latent site: its draws are
        vectorized (``vectorize=False`` is refused) and its per-datapoint statistics land in
        :attr:`EvidenceResult.local`.
    :returns: :class:`EvidenceResult`; its ``path`` says which way the particles were drawn.
    :raises ValueError: (besides bad arguments) a guide that gives probability 0 to values of a
        discrete latent that the model allows, e.g. a label it pins (with ``proposal=None`` or
        ``Guide()``; :func:`ppgen.infer.support.check_guide_support`): IS would estimate
        ``log p(x, y)``, not ``log p(x)``. Call the model without the labels instead.
    """
    batch = as_batch(data, "data", model)
    n = batch.size
    check_positive_int("num_samples", num_samples)
    check_positive_int("batch_size", batch_size)
    check_positive_int("particle_chunk", particle_chunk)
    ladder = iwae_ladder_sizes(num_samples) if ladder is None else sorted(set(ladder))
    if not ladder or any(isinstance(j, bool) or not isinstance(j, int) or not 1 <= j <= num_samples for j in ladder):
        raise ValueError(f"ladder must hold integers in [1, num_samples={num_samples}], got {ladder!r}")
    if vectorize not in (None, True, False):
        raise TypeError(f"vectorize must be None (try, then fall back), True or False, got {vectorize!r}")
    path = {None: None, True: VECTORIZED, False: SEQUENTIAL}[vectorize]  # None: not yet decided
    proposal = as_proposal(proposal)
    if proposal is not None and vectorize is False:
        raise ValueError("vectorize=False asks for one trace per particle; a proposal object checks each chunk "
                         "itself and falls back to one trace per particle where the model cannot take the "
                         "particle plate: leave vectorize=None with a proposal")
    pair = None
    note = None
    with seeded(seed, batch.device), eval_mode(model, guide):
        parts: dict = {}
        plate = nesting = None
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="evidence", unit="chunk")
        for i in starts:
            chunk, call_args, call_kwargs = _chunk_call(batch, args, kwargs, i, batch_size)
            if plate is None:  # found once, on the first chunk, off the random stream
                found = find_data_plate(model, guide, call_args, call_kwargs, chunk.size, data_plate)
                plate, nesting = found.data_plate, found.nesting
                if proposal is None or isinstance(proposal, Guide):  # draws from the guide's own support
                    calls = (_chunk_call(batch, args, kwargs, j, batch_size)[1:] for j in range(0, n, batch_size))
                    check_guide_support(model, guide, calls, plate)
                if proposal is not None:
                    pair = local_pair(model, guide, call_args, call_kwargs, plate, nesting)
            if proposal is not None:
                prepared = proposal.prepare(pair, call_args, call_kwargs)
                log_w, rounding = proposal_log_weights(pair, prepared, call_args, call_kwargs, num_samples,
                                                       particle_chunk)
                for key, value in prepared.stats.items():
                    parts.setdefault("local." + key, []).append(value.detach().double().cpu())
                path = SEQUENTIAL if not prepared.vectorized or path == SEQUENTIAL else VECTORIZED
                problem = None
            else:
                log_w, rounding, path, problem = _chunk_log_weights(
                    model, guide, call_args, call_kwargs, num_samples, particle_chunk, nesting, plate, chunk.size,
                    batch.device, vectorize, path)
            if problem is not None:
                note = (f"vectorized particles failed on datapoints {i}..{i + chunk.size - 1} ({problem}); "
                        "drew the particles sequentially (vectorize=False) from here on")
                warnings.warn(f"log_evidence: {note}", stacklevel=3)
            stats = _reduce(log_w, ladder, rounding or torch.finfo(torch.float64).eps)
            for key, value in stats.items():
                parts.setdefault(key, []).append(value)
    ladder_means = {j: float(sum(p[j] for p in parts["ladder"]) / n) for j in ladder}
    out = {key: torch.cat(parts[key]) for key in ("log_px", "stderr", "ess", "khat", "elbo")}
    local = {key[6:]: torch.cat(v) for key, v in parts.items() if key.startswith("local.")} or None
    return EvidenceResult(ladder=ladder_means, num_samples=num_samples, path=path or VECTORIZED, note=note,
                          proposal="guide" if proposal is None else proposal.name, local=local, **out)


def _chunk_call(batch, args: tuple, kwargs: dict, start: int, batch_size: int) -> tuple:
    """``(chunk, args, kwargs)`` of the model call on rows ``start:start + batch_size``: per-datapoint
    arguments (dim 0 of length ``N``) follow the data's rows, others pass as is."""
    chunk = batch.rows(slice(start, start + batch_size))
    extra_args, extra_kwargs = slice_arguments(args, kwargs, batch.size, slice(start, start + batch_size))
    return chunk, (*chunk.args, *extra_args), {**chunk.kwargs, **extra_kwargs}


def _rng_state(device: torch.device) -> tuple:
    return torch.random.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
