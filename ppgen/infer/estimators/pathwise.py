"""Pathwise (reparameterized) estimators' guide handling.

- :func:`sticking_the_landing`: the guide's log-density is scored with its parameters detached,
  so the pathwise gradient drops the score term ``d log q / d phi`` whose expectation is zero
  (Roeder, Wu & Duvenaud 2017, "Sticking the landing").
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from pyro.poutine.messenger import Messenger

__all__ = ["sticking_the_landing", "detach_distribution"]


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
