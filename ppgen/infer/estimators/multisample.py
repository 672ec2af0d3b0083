"""Multi-sample bounds: the importance-weighted ELBO of Burda et al. (2016), per datapoint."""

from __future__ import annotations

import math
from typing import Callable

import pyro
import torch
from pyro import poutine

from ppgen.infer.traces import check_positive_int, per_datapoint_log_weights, plate_nesting_from

__all__ = ["IWAE_ELBO"]


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
        check_positive_int("num_particles", num_particles)
        super().__init__(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=max_plate_nesting, **kwargs)

    def _bound(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        if self.max_plate_nesting == float("inf"):
            self.max_plate_nesting = plate_nesting_from(model, guide, args, kwargs)
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
