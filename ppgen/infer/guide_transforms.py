"""Guide transforms behind the estimators that need more than an ELBO class.

Each function takes a Pyro guide and returns the guide as one estimator must see it; the model and
the user's guide stay unchanged.

- :func:`sticking_the_landing`: the guide's log-density is scored with its parameters detached,
  so the pathwise gradient drops the score term ``d log q / d phi`` whose expectation is zero
  (Roeder, Wu & Duvenaud 2017, "Sticking the landing").
- :class:`NNBaselineGuide`: score-function guide whose latent sites get a learned,
  input-dependent baseline ``b(x)`` (Mnih & Gregor 2014), trained by its own Adam optimizer with
  its own learning rate on the squared error to the downstream cost.
- :func:`enumerate_guide`: marks discrete guide sites for parallel enumeration (TraceEnum_ELBO).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from pyro.infer import config_enumerate
from pyro.poutine.messenger import Messenger
from torch import nn

__all__ = ["sticking_the_landing", "NNBaselineGuide", "enumerate_guide", "detach_distribution"]


def detach_distribution(fn):
    """A shallow copy of distribution ``fn`` whose tensor attributes (and those of wrapped base
    distributions) are detached from the autograd graph."""
    out = copy.copy(fn)
    for key, value in list(vars(out).items()):
        if isinstance(value, torch.Tensor):
            setattr(out, key, value.detach())
        elif isinstance(value, torch.distributions.Distribution):
            setattr(out, key, detach_distribution(value))
    return out


class _StickingTheLanding(Messenger):
    def _process_message(self, msg: dict) -> None:
        # Draw through the live parameters (pathwise), score log q(z; stop_grad(phi)).
        if msg["type"] == "sample" and not msg["is_observed"] and msg["fn"].has_rsample:
            fn = msg["fn"]
            stl = detach_distribution(fn)
            stl.rsample = fn.rsample  # instance attribute: sampling keeps its gradient path
            msg["fn"] = stl


def sticking_the_landing(guide: Callable) -> Callable:
    """``guide`` with every reparameterized latent site scored under detached parameters, for
    the STL gradient of Roeder et al. (2017) when trained with ``Trace_ELBO``."""
    return _StickingTheLanding()(guide)


class NNBaselineGuide:
    """A score-function version of ``guide`` with a learned baseline ``b(x)`` per latent site.

    :param guide: Pyro guide whose first argument is the batch ``x`` of shape ``(B, ...)``.
    :param lr: learning rate of the baselines' own Adam optimizer.
    :param hidden: hidden width of each baseline MLP ``x -> (B,)``.
    :param beta: decay of the running-average baseline the network is added to.

    The baseline is ``avg + b(x)``: Pyro's decaying average of the cost (``beta``) plus a network
    that learns the input-dependent residual, so it needs no learning of the cost's overall scale
    (hundreds of nats on images, out of reach of a zero-initialised net at lr 1e-3).

    Pyro's ``TraceGraph_ELBO`` adds ``sum (cost - b(x))^2`` to the surrogate loss, which puts
    gradients on the baseline networks during ``loss_and_grads``. Those networks are *not* in
    Pyro's param store, so the SVI optimizer never sees them: this object steps their optimizer at
    the start of the next call (one call late, which only delays learning by a step).
    The baseline input is detached, so ``b`` cannot bias the gradient (Mnih & Gregor 2014).
    """

    def __init__(self, guide: Callable, lr: float = 1e-3, hidden: int = 64, beta: float = 0.95):
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.guide, self.lr, self.hidden, self.beta = guide, float(lr), int(hidden), float(beta)
        self.nets: dict[str, nn.Module] = {}
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def _net(self, site: str, x: torch.Tensor) -> nn.Module:
        if site not in self.nets:
            width = x[0].numel()
            net = nn.Sequential(nn.Linear(width, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
            self.nets[site] = net.to(x.device)
            params = [p for n in self.nets.values() for p in n.parameters()]
            self.optimizer = torch.optim.Adam(params, lr=self.lr)
        return self.nets[site]

    def step(self) -> None:
        """Apply (and clear) the baseline gradients left by the last ``loss_and_grads``."""
        if self.optimizer is not None:
            if any(p.grad is not None for p in self.optimizer.param_groups[0]["params"]):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"score-nn-baseline needs the batch tensor as the guide's first argument, got {type(x).__name__}")
        from ppgen.infer.estimators import ScoreFunctionMessenger

        self.step()
        outer = self

        class _Baselines(ScoreFunctionMessenger):
            def _process_message(self, msg: dict) -> None:
                super()._process_message(msg)
                if msg["type"] == "sample" and not msg["is_observed"]:
                    net = outer._net(msg["name"], x)
                    head = _Squeeze(net)
                    msg["infer"] = {**msg["infer"], "baseline": {
                        "nn_baseline": head, "nn_baseline_input": x,
                        "use_decaying_avg_baseline": True, "baseline_beta": outer.beta}}

        with _Baselines():
            return self.guide(x, *args, **kwargs)


class _Squeeze(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).squeeze(-1)


def nn_baseline(lr: float = 1e-3, hidden: int = 64, beta: float = 0.95) -> Callable[[Callable], Callable]:
    """Guide transform factory for ``score-nn-baseline`` with baseline learning rate ``lr``."""
    return lambda guide: NNBaselineGuide(guide, lr, hidden, beta)


def enumerate_guide(guide: Callable) -> Callable:
    """``guide`` with its discrete sites enumerated in parallel (exact sum in TraceEnum_ELBO)."""
    return config_enumerate(guide, default="parallel")
