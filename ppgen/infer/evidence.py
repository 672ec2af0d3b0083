"""Per-datapoint importance-sampled evidence ``log p(x)`` for any Pyro model/guide pair.

For each datapoint ``x_n`` the guide proposes ``z_k ~ q(z | x_n)`` and

    log p(x_n) ~= logsumexp_k [log p(x_n, z_k) - log q(z_k | x_n)] - log K

(Burda et al. 2016, "Importance Weighted Autoencoders"). Pyro's ``Importance`` and
``psis_diagnostic`` weight a whole minibatch jointly; here the log weights are kept *per
datapoint*: every site's ``log_prob`` is summed over all dimensions except the ``"data"`` plate
(and the particle plate). Particles are vectorized with an extra outermost ``pyro.plate``.

Work is chunked over datapoints (``batch_size``) and over particles (``particle_chunk``), so
memory is ``O(batch_size * K)`` floats for the weights plus one network pass of
``batch_size * particle_chunk`` inputs. On CPU the guide's draws come from one random stream in
particle-major order, so chunking over ``K`` reproduces the unchunked numbers exactly (when each
chunk's draw size is a multiple of 16, as for ``B * z_dim`` below); a different datapoint chunk
size draws different (equally valid) samples.

Diagnostics per datapoint: the delta-method standard error of the estimate, Kish's effective
sample size ``(sum w)^2 / sum w^2`` and the Pareto k-hat of the weights (Vehtari et al. 2024;
ArviZ ``psislw``; k-hat > 0.7 means the estimate is unreliable). The IWAE bound for a ladder of
``K`` values comes from nested prefixes of the same samples.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ppgen.runs import seeded

__all__ = [
    "EvidenceResult",
    "log_evidence",
    "per_datapoint_log_weights",
    "psis_khat",
    "kish_ess",
    "iwae_ladder_sizes",
    "IWAE_ELBO",
]

DATA = "data"
_PARTICLES = "_ppgen_particles"


class EvidenceResult(NamedTuple):
    """What :func:`log_evidence` returns; per-datapoint tensors have shape ``(N,)`` (CPU, float64).

    :param log_px: IS estimate of ``log p(x_n)`` with all ``K`` samples.
    :param stderr: delta-method standard error of ``log_px``: ``sd(w) / (sqrt(K) mean(w))``.
    :param ess: Kish effective sample size of the ``K`` weights.
    :param khat: Pareto k-hat of the ``K`` weights (PSIS).
    :param elbo: mean log weight over the ``K`` samples (a ``K``-sample estimate of the ELBO).
    :param ladder: ``{k: mean over datapoints of the k-sample IWAE bound}`` from nested prefixes.
    :param num_samples: ``K``.
    """

    log_px: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor
    khat: torch.Tensor
    elbo: torch.Tensor
    ladder: dict
    num_samples: int

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
            "khat_share_over_0.7": float((self.khat > 0.7).double().mean()),
            "ladder": {str(k): v for k, v in self.ladder.items()},
        }


def _check_positive_int(name: str, value) -> None:
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


def _data_frame(site: dict):
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA:
            return frame
    return None


def _site_per_datapoint(site: dict, full: int, num_particles: int, size: int) -> torch.Tensor:
    """Sum a site's unscaled (masked) log-density over every dim but particles and data: ``(K, B)``."""
    lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    if site["mask"] is not None and site["mask"] is not True:
        lp = torch.where(torch.as_tensor(site["mask"], device=lp.device), lp, lp.new_zeros(()))
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


def per_datapoint_log_weights(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    num_particles: int,
    *args,
    max_plate_nesting: Optional[int] = None,
    **kwargs,
) -> tuple[torch.Tensor, float]:
    """Log weights ``log p(x_n, z_k) - log q(z_k | x_n)`` of ``num_particles`` vectorized draws.

    ``model(data, *args, **kwargs)`` and ``guide(...)`` must declare ``pyro.plate("data", B)``
    around every latent and observed site, with ``B = len(data)``. Gradients flow (no
    ``no_grad`` here) so the IWAE objective can use it.

    :param data: tensor of shape ``(B, ...)``.
    :param num_particles: ``K``, drawn in one vectorized pass.
    :param max_plate_nesting: plates of the model (found by tracing if not given).
    :returns: ``(log_w, scale)``: log weights of shape ``(K, B)`` and the ``poutine.scale`` factor
        of the data-plate sites (1 unless a training loop scales the minibatch).
    :raises ValueError: no ``"data"`` plate, a site outside it, or model and guide that disagree
        on latent sites.
    """
    _check_positive_int("num_particles", num_particles)
    if max_plate_nesting is None:
        max_plate_nesting = _plate_nesting_from(model, guide, (data, *args), kwargs)
    full = max_plate_nesting + 1
    with pyro.plate(_PARTICLES, num_particles, dim=-full):
        guide_tr = poutine.trace(guide).get_trace(data, *args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(data, *args, **kwargs)
    guide_latents, model_latents = _latents(guide_tr), _latents(model_tr)
    if guide_latents != model_latents:
        raise ValueError(
            "model and guide must have the same latent sites; model only: "
            f"{sorted(model_latents - guide_latents)}, guide only: {sorted(guide_latents - model_latents)}"
        )
    log_w, scale, size = 0.0, None, None
    for tr, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site) or (sign < 0 and site["is_observed"]):
                continue
            frame = _data_frame(site)
            if frame is None:
                raise ValueError(
                    f"site {name!r} is not inside a pyro.plate({DATA!r}, ...); per-datapoint evidence "
                    f"needs every latent and observed site in the {DATA!r} plate over datapoints"
                )
            size = frame.size if size is None else size
            scale = float(site["scale"]) if scale is None else scale
            log_w = log_w + sign * _site_per_datapoint(site, full, num_particles, frame.size)
    # Traces sit in reference cycles (freed only by the garbage collector); drop their tensors now
    # so one particle chunk's activations never outlive it: memory stays flat in K.
    model_tr.nodes.clear()
    guide_tr.nodes.clear()
    if size is None:
        raise ValueError(f"the model has no sample site inside a pyro.plate({DATA!r}, ...)")
    return log_w, scale


def kish_ess(log_w: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` along the last axis of ``log_w``."""
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1))


def psis_khat(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k-hat of importance weights along the last axis (ArviZ ``psislw``; Vehtari et al.
    2024). Shape ``(..., K) -> (...)``; NaN where ``K < 10`` (too few weights to fit a tail),
    ``-inf`` where all weights are equal (bounded weights, no tail).
    The only ArviZ call in ppgen."""
    if log_w.shape[-1] < 10:
        return torch.full(log_w.shape[:-1], math.nan, dtype=torch.float64)
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's refactor notice; warnings on large k (k-hat says it).
        import arviz as az

        _, k = az.psislw(np.asarray(log_w.detach().double().cpu().numpy()), reff=1.0)
    k = torch.as_tensor(np.asarray(k, dtype=np.float64)).reshape(log_w.shape[:-1])
    # Equal weights (an exact proposal) have no tail; a fit to rounding noise would mean nothing.
    spread = (log_w.max(-1).values - log_w.min(-1).values).detach().double().cpu()
    return torch.where(spread < 1e-9, torch.full_like(k, -math.inf), k)


def plot_khat_arviz(khat: torch.Tensor, path, title: str = ""):
    """ArviZ's ``plot_khat`` of per-datapoint k-hat ``(N,)`` (e.g. :attr:`EvidenceResult.khat`)
    with the 0.5 / 0.7 / 1 lines and the share of datapoints per band, written to the PNG ``path``.
    ``-inf`` (equal weights) is drawn at 0. Returns the path."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ppgen.plots import save_figure
    import numpy as np

    k = khat.detach().double().cpu().numpy().reshape(-1)
    if k.size == 0 or not np.isfinite(np.where(np.isneginf(k), 0.0, k)).any():
        raise ValueError(f"khat must hold at least one finite value, got {k.size} values")
    k = np.where(np.isneginf(k), 0.0, k)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        az.plot_khat(k[np.isfinite(k)], show_hlines=True, show_bins=True, ax=ax, markersize=8)
    ax.set_xlabel("datapoint")
    ax.set_title(title or f"PSIS k-hat per datapoint ({k.size} datapoints)")
    return save_figure(fig, path)


def iwae_ladder_sizes(num_samples: int) -> list[int]:
    """``1, 5, 50, 500, ...`` below ``num_samples``, then ``num_samples`` itself."""
    sizes, k = [1], 5
    while k < num_samples:
        sizes.append(k)
        k *= 10
    if sizes[-1] != num_samples:
        sizes.append(num_samples)
    return sizes


def _reduce(log_w: torch.Tensor, ladder: Sequence[int]) -> dict:
    """Per-datapoint statistics of log weights of shape ``(B, K)`` (float64)."""
    k = log_w.shape[-1]
    lse = torch.logsumexp(log_w, -1)
    w = torch.exp(log_w - log_w.max(-1, keepdim=True).values)  # <= 1, largest is 1
    ratio = w.std(-1, unbiased=False) / w.mean(-1)
    return {
        "log_px": lse - math.log(k),
        "stderr": ratio / math.sqrt(k),
        "ess": kish_ess(log_w),
        "khat": psis_khat(log_w),
        "elbo": log_w.mean(-1),
        "ladder": {j: (torch.logsumexp(log_w[:, :j], -1) - math.log(j)).sum() for j in ladder},
    }


@torch.no_grad()
def log_evidence(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    num_samples: int = 1000,
    *args,
    batch_size: int = 100,
    particle_chunk: int = 500,
    ladder: Optional[Sequence[int]] = None,
    seed: Optional[int] = 0,
    progress: bool = False,
    **kwargs,
) -> EvidenceResult:
    """Importance-sampled ``log p(x_n)`` for every row of ``data`` (Burda et al. 2016).

    :param model: Pyro model ``model(x, *args, **kwargs)`` with a ``pyro.plate("data", len(x))``.
    :param guide: its guide (the proposal ``q(z | x)``), same signature and latent sites.
    :param data: tensor of shape ``(N, ...)`` on the device the model runs on.
    :param num_samples: ``K >= 1`` proposals per datapoint.
    :param batch_size: datapoints per chunk.
    :param particle_chunk: particles drawn per vectorized pass (bounds network memory).
    :param ladder: ``K`` values for the IWAE bound (default :func:`iwae_ladder_sizes`).
    :param seed: seeds torch for the draws (the caller's random state is restored); ``None``
        uses the current state.
    :returns: :class:`EvidenceResult`.
    """
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if data.ndim < 1 or len(data) == 0:
        raise ValueError(f"data must have shape (N, ...) with N >= 1, got {tuple(data.shape)}")
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("particle_chunk", particle_chunk)
    ladder = iwae_ladder_sizes(num_samples) if ladder is None else sorted(set(ladder))
    if not ladder or any(isinstance(j, bool) or not isinstance(j, int) or not 1 <= j <= num_samples for j in ladder):
        raise ValueError(f"ladder must hold integers in [1, num_samples={num_samples}], got {ladder!r}")
    with seeded(seed, data.device):
        parts: dict = {}
        nesting = None
        starts = range(0, len(data), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="evidence", unit="chunk")
        for i in starts:
            x = data[i : i + batch_size]
            if nesting is None:
                nesting = _plate_nesting_from(model, guide, (x[:1], *args), kwargs)  # one row is enough
            log_w = torch.empty(len(x), num_samples, dtype=torch.float64)  # (B, K), filled chunk by chunk
            for k0 in range(0, num_samples, particle_chunk):
                kc = min(particle_chunk, num_samples - k0)
                lw, _ = per_datapoint_log_weights(model, guide, x, kc, *args, max_plate_nesting=nesting, **kwargs)
                log_w[:, k0 : k0 + kc] = lw.T.double().cpu()
                del lw
            stats = _reduce(log_w, ladder)
            for key, value in stats.items():
                parts.setdefault(key, []).append(value)
    n = len(data)
    ladder_means = {j: float(sum(p[j] for p in parts["ladder"]) / n) for j in ladder}
    out = {key: torch.cat(parts[key]) for key in ("log_px", "stderr", "ess", "khat", "elbo")}
    return EvidenceResult(ladder=ladder_means, num_samples=num_samples, **out)


class IWAE_ELBO(pyro.infer.ELBO):
    """The importance-weighted bound of Burda et al. (2016), per datapoint:

        L_K = sum_n [ logsumexp_k (log p(x_n, z_nk) - log q(z_nk | x_n)) - log K ]

    with ``K = num_particles`` vectorized draws. On an unscaled batch this equals Pyro's
    ``RenyiELBO(alpha=0, vectorize_particles=True)`` (tested). The difference is minibatch
    scaling: Pyro scales the log weights *inside* the logsumexp, so under the SVI loop's ``N / B``
    data-plate scale it optimizes a tempered objective; here the scale multiplies the
    per-datapoint bounds, which keeps the full-data objective unbiased. Gradients are pathwise,
    so the guide must be reparameterized.
    """

    def __init__(self, num_particles: int = 1, vectorize_particles: bool = True, max_plate_nesting: float = float("inf"), **kwargs):
        _check_positive_int("num_particles", num_particles)
        super().__init__(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting, **kwargs)

    def _bound(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = _plate_nesting_from(model, guide, args, kwargs)
        log_w, scale = per_datapoint_log_weights(
            model, guide, args[0], self.num_particles, *args[1:],
            max_plate_nesting=int(self.max_plate_nesting), **kwargs
        )
        return scale * (torch.logsumexp(log_w, 0) - math.log(self.num_particles)).sum()

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict):
        """One unvectorized ``(model_trace, guide_trace)`` pair (Pyro's ELBO interface)."""
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        return model_tr, guide_tr

    def loss(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        with torch.no_grad():
            return -float(self._bound(model, guide, *args, **kwargs))

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        return -self._bound(model, guide, *args, **kwargs)

    def loss_and_grads(self, model: Callable, guide: Callable, *args, **kwargs) -> float:
        loss = -self._bound(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())


def _plate_nesting_from(model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
    # A throwaway trace: it must not consume the caller's random stream.
    cuda = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"]
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices=cuda[:1]):
        g = poutine.trace(guide).get_trace(*args, **kwargs)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(*args, **kwargs)
    return max(_plate_nesting(g), _plate_nesting(m))
