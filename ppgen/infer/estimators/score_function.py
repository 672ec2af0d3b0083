"""Score-function estimators: the guide marked non-reparameterized, plain REINFORCE, and a
learned baseline.

- :class:`ScoreFunctionMessenger`: marks every latent guide site non-reparameterized
  (``has_rsample = False``) and attaches Pyro baseline options, so ``Trace_ELBO`` /
  ``TraceGraph_ELBO`` build the score-function surrogate for a guide written reparameterized.
  A flow guide (IAF) is sampled under ``no_grad``, and its transforms cache the inverse ``x`` and
  log-scales of that sample as constants; scoring the sample through the cache makes ``log q``
  constant in the flow's weights (their gradient was zero). A marked
  ``TransformedDistribution`` therefore scores a sample through the transforms' real inverse,
  ``log q_phi(z) = log q_0(f_phi^{-1}(z)) - log |det J_f|``, differentiable in every ``phi``
  (``d`` sequential network passes per autoregressive step). Every score estimator (``score``,
  ``score-baseline``, ``score-nn-baseline``, ``score-naive``) goes through this one marking.
  (``TraceGraph_ELBO`` missed the cache already, by accident: its ``TrackNonReparam`` wraps each
  drawn value in a provenance tensor, a different object from the one the flow cached; only
  ``score-naive``, on ``Trace_ELBO``, hit it.)
- :class:`Reinforce_ELBO`: the score-function ELBO gradient without any Rao-Blackwellization.
  Pyro's ``Trace_ELBO`` already weights each non-reparameterized site's score by the log-ratio
  summed only to that site's plates, and ``TraceGraph_ELBO`` further drops terms outside the
  site's downstream graph. Here *every* score is weighted by the whole particle's
  ``log p(x, z) - log q(z)`` (Williams 1992): the textbook estimator, kept as the baseline that
  Rao-Blackwellization (Ranganath et al. 2014, Schulman et al. 2015) improves on. With
  vectorized particles (an outer particle plate) the weight is each particle's own log-ratio,
  summed over everything but the particle dim: the particles stay independent draws and the
  gradient's variance falls like ``1/K``.
- :class:`NNBaselineGuide`: score-function guide whose latent sites get a learned,
  input-dependent baseline ``b(x)`` (Mnih & Gregor 2014), trained by its own Adam optimizer with
  its own learning rate on the squared error to the downstream cost; per datapoint inside the
  ``"data"`` plate, one scalar per particle for a global site.
"""

from __future__ import annotations

from typing import Callable, Optional

import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_identically_zero, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from torch import nn

from ppgen.infer.traces import data_plate_name
from ppgen.runs import seeded

__all__ = ["ScoreFunctionMessenger", "Reinforce_ELBO", "NNBaselineGuide", "nn_baseline"]


class _SettableRsample:
    """Mixin: ``has_rsample`` reads and writes the wrapped base distribution's."""

    @property
    def has_rsample(self) -> bool:
        return self.base_dist.has_rsample

    @has_rsample.setter
    def has_rsample(self, value: bool) -> None:
        self.base_dist.has_rsample = value


class _Transformed(_SettableRsample, dist.TransformedDistribution):
    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        # A new tensor object: the transforms' caches match by identity (`y is y_old`), so this
        # takes the real inverse, with the gradient in the flow's parameters that the sampling
        # cache (filled under no_grad) lacks.
        return super().log_prob(value.detach().clone())


class _Independent(_SettableRsample, dist.Independent):
    pass


class _Masked(_SettableRsample, dist.MaskedDistribution):
    pass


def _settable(fn):
    """``fn`` rebuilt so that ``fn.has_rsample = False`` works through its wrappers.

    Marking only the innermost distribution is not enough: when a plate later expands the site
    (vectorized particles), Pyro's broadcasting copies the mark onto the expanded wrapper by
    assignment, which torch's ``Independent``/``TransformedDistribution`` properties refuse.
    The subclasses keep every KL registration (type dispatch goes through the MRO)."""
    if isinstance(fn, torch.distributions.TransformedDistribution):
        return _Transformed(_settable(fn.base_dist), fn.transforms)
    if isinstance(fn, torch.distributions.Independent):
        return _Independent(_settable(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, dist.MaskedDistribution):
        return _Masked(_settable(fn.base_dist), fn._mask)
    return fn


def _detach_sampling(fn):
    """``fn`` with score-function (non-reparameterized) sampling, through its wrappers."""
    fn = _settable(fn)
    try:
        fn.has_rsample = False
    except AttributeError:  # another wrapper (e.g. masked) that forwards to its base
        if not hasattr(fn, "base_dist"):
            raise
        _detach_sampling(fn.base_dist)
    return fn


class ScoreFunctionMessenger(Messenger):
    """Marks every latent sample site non-reparameterized and attaches baseline options."""

    def __init__(self, baseline: Optional[dict] = None):
        super().__init__()
        self.baseline = baseline

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        if msg["fn"].has_rsample:
            msg["fn"] = _detach_sampling(msg["fn"])
        if self.baseline is not None:
            msg["infer"] = {**msg["infer"], "baseline": dict(self.baseline)}


class Reinforce_ELBO(Trace_ELBO):
    """``Trace_ELBO`` whose score-function terms use the whole particle's log-ratio as their cost.

    One trace holds one particle, or all ``K`` of them when ``vectorize_particles`` puts an outer
    plate at dim ``-max_plate_nesting``. Then every log-density and score is summed over all dims
    but that one, to shape ``(K,)``, and particle ``k``'s scores are weighted by particle ``k``'s
    log-ratio ``log p(x, z_k) - log q(z_k)`` only (weighting by the sum over all particles made
    the variance grow with ``K`` instead of falling like ``1/K``).
    """

    def _per_particle(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed to the particle dim: shape ``(K,)`` (or ``(1,)``) when vectorized, else ``()``."""
        if not (self.vectorize_particles and self.num_particles > 1):
            return t.sum()
        n = self.max_plate_nesting
        if t.dim() > n:
            raise ValueError(
                f"a site's log-density has {t.dim()} batch dims, more than max_plate_nesting={n}: "
                "declare event dims with .to_event() or pass the right max_plate_nesting"
            )
        t = t.reshape((1,) * (n - t.dim()) + tuple(t.shape))
        return t.reshape(t.shape[0], -1).sum(-1)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo, surrogate = 0.0, 0.0
        log_r: torch.Tensor = 0.0  # per particle: (K,) vectorized, () otherwise
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo += torch_item(site["log_prob_sum"])
                surrogate = surrogate + site["log_prob_sum"]
                log_r = log_r + self._per_particle(site["log_prob"].detach())
        scores = []
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                _, score_function, entropy_term = site["score_parts"]
                elbo -= torch_item(site["log_prob_sum"])
                log_r = log_r - self._per_particle(site["log_prob"].detach())
                if not is_identically_zero(entropy_term):
                    surrogate = surrogate - entropy_term.sum()
                if not is_identically_zero(score_function):
                    scores.append(score_function)
        for score_function in scores:
            surrogate = surrogate + (self._per_particle(score_function) * log_r).sum()
        return -elbo, -surrogate


class NNBaselineGuide:
    """A score-function version of ``guide`` with a learned baseline ``b(x)`` per latent site.

    :param guide: Pyro guide whose first argument is the batch ``x`` of shape ``(B, ...)``.
    :param lr: learning rate of the baselines' own Adam optimizer.
    :param hidden: hidden width of each baseline MLP ``x_i -> h(x_i)``, one MLP per site.
    :param beta: decay of the running-average baseline the network is added to.

    The baseline is ``avg + b(x)``: Pyro's decaying average of the cost (``beta``) plus a network
    that learns the input-dependent residual, so it needs no learning of the cost's overall scale
    (hundreds of nats on images, out of reach of a zero-initialised net at lr 1e-3).

    A baseline must not depend on the site's own sample, and it must have the shape of the site's
    downstream cost (Mnih & Gregor 2014). A site inside the datapoint plate (``pyro.plate("data", B)``,
    or the plate the SVI loop found, :func:`ppgen.infer.traces.find_data_plate`) has one cost per
    datapoint, and gets ``b(x)_i = h(x_i)`` placed at the data plate's dim. A *global* site (outside
    the data plate) has one cost per particle, the sum over the whole batch; it gets the scalar
    ``b(x) = sum_i h(x_i)``, a function of the observed batch only and therefore unbiased, which
    can follow the batch-to-batch changes of the cost that the running average lags behind.

    Pyro's ``TraceGraph_ELBO`` adds ``sum (cost - b(x))^2`` to the surrogate loss. The networks
    are *not* in Pyro's param store (the SVI optimizer and gradient tools never see them): each
    parameter is stepped by its own Adam in a post-accumulate-grad hook, during that backward
    pass. The baseline input is detached, so ``b`` cannot bias the gradient.

    :meth:`training_state` / :meth:`load_training_state` hold the networks and their Adam states;
    :func:`ppgen.infer.svi.train_svi` checkpoints them next to the param store.
    """

    def __init__(self, guide: Callable, lr: float = 1e-3, hidden: int = 64, beta: float = 0.95):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.guide, self.lr, self.hidden, self.beta = guide, float(lr), int(hidden), float(beta)
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, list[torch.optim.Adam]] = {}  # one Adam per parameter

    def _add(self, site: str, width: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
        # Initialised from a fixed seed off the caller's random stream: the estimator draws the same
        # samples as "score" under the same seed, and a resumed run the same as an uninterrupted one.
        with seeded(0, device):
            net = nn.Sequential(nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1)).to(device=device, dtype=dtype)
        nn.init.zeros_(net[-1].weight)  # b(x) = 0 until it has learned something
        nn.init.zeros_(net[-1].bias)
        self.nets[site] = net
        self.optimizers[site] = []
        for p in net.parameters():
            opt = torch.optim.Adam([p], lr=self.lr)
            self.optimizers[site].append(opt)
            p.register_post_accumulate_grad_hook(_step_hook(opt))
        return net

    def training_state(self) -> dict:
        """Every baseline network's weights and Adam state, as tensors and numbers."""
        return {site: {"net": net.state_dict(), "adam": [o.state_dict() for o in self.optimizers[site]]}
                for site, net in self.nets.items()}

    def load_training_state(self, state: dict) -> None:
        """Restore :meth:`training_state` (networks are rebuilt without touching the RNG)."""
        for site, saved in state.items():
            first = saved["net"]["0.weight"]
            if first.shape[0] != self.hidden:
                raise ValueError(f"saved baseline of site {site!r} has hidden width {first.shape[0]}, "
                                 f"this estimator has {self.hidden}: resume with the same settings")
            net = self._add(site, first.shape[1], first.device, first.dtype)
            net.load_state_dict(saved["net"])
            for opt, opt_state in zip(self.optimizers[site], saved["adam"], strict=True):
                opt.load_state_dict(opt_state)

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"score-nn-baseline needs the batch tensor as the guide's first argument, got {type(x).__name__}")
        outer = self

        class _Baselines(ScoreFunctionMessenger):
            def _process_message(self, msg: dict) -> None:
                super()._process_message(msg)
                if msg["type"] == "sample" and not msg["is_observed"] and not isinstance(msg["fn"], _Subsample):
                    site = msg["name"]
                    net = outer.nets[site] if site in outer.nets else outer._add(site, x[0].numel(), x.device, _float_dtype(x))
                    if net[0].in_features != x[0].numel():
                        raise ValueError(f"the baseline of site {site!r} takes {net[0].in_features} features per "
                                         f"datapoint, the batch has {x[0].numel()}: the state comes from other data")
                    # the datapoint plate: named by the SVI loop's DataScale (or a DataPlate), else "data"
                    plate = data_plate_name(msg)
                    data = next((f for f in msg["cond_indep_stack"] if f.name == plate), None)
                    if data is not None and data.size not in (x.shape[0], -1):
                        raise ValueError(
                            f"score-nn-baseline gives each datapoint of the {plate!r} plate its own baseline "
                            f"b(x_i), so site {site!r} needs a data plate of size x.shape[0] = {x.shape[0]}, "
                            f"got {data.size}: declare pyro.plate({plate!r}, x.shape[0]) over the batch")
                    head = _Baseline(net, None if data is None else data.dim)
                    msg["infer"] = {**msg["infer"], "baseline": {
                        "nn_baseline": head, "nn_baseline_input": x,
                        "use_decaying_avg_baseline": True, "baseline_beta": outer.beta}}

        with _Baselines():
            return self.guide(x, *args, **kwargs)


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a baseline net on ``x`` computes in: ``x``'s own if floating, else the default."""
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _step_hook(opt: torch.optim.Optimizer) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return hook


class _Baseline(nn.Module):
    """``b(x)`` of one site from the per-datapoint net ``h``: shape ``(B, 1, ..)`` with ``B`` at
    the data plate's ``dim``, or the scalar ``sum_i h(x_i)`` for a site outside the plate."""

    def __init__(self, net: nn.Module, dim: Optional[int]):
        super().__init__()
        self.net, self.dim = net, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(x.reshape(x.shape[0], -1).to(_float_dtype(x))).squeeze(-1)
        return h.sum() if self.dim is None else h.reshape(h.shape + (1,) * (-1 - self.dim))


def nn_baseline(lr: float = 1e-3, hidden: int = 64, beta: float = 0.95) -> Callable[[Callable], Callable]:
    """Guide transform factory for ``score-nn-baseline`` with baseline learning rate ``lr``."""
    return lambda guide: NNBaselineGuide(guide, lr, hidden, beta)
