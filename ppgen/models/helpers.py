"""Small helpers so a VAE-like model reads like its maths, without hiding Pyro.

    lik = likelihood("bernoulli", x_dim=784)
    def model(x):
        pyro.module("decoder", decoder)
        with data_plate(x):
            z = pyro.sample("z", dist.Normal(x.new_zeros(20), 1.0).to_event(1))
            observe(x, lik, decoder(z))

``observe`` is ``pyro.sample(name, fn, obs=x)`` inside the ``"data"`` plate (opened for you when
the call is not already inside one); any line can be replaced by plain ``pyro.sample``.
"""

from __future__ import annotations

from typing import Optional, Union

import pyro
import pyro.distributions as dist
import torch
from pyro.poutine.runtime import _PYRO_STACK
from torch import nn

from ppgen.models.likelihoods import LIKELIHOODS, make_likelihood

__all__ = ["DATA_PLATE", "check_batch", "data_plate", "in_data_plate", "likelihood", "observe"]

DATA_PLATE = "data"


def check_batch(x: torch.Tensor, width: int) -> None:
    """Raise a clear error unless ``x`` is a tensor of shape ``(batch, width)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(
            f"x must have shape (batch, {width}), got {tuple(x.shape)}; "
            "flatten images and check the dataset matches the model's x_dim"
        )


def data_plate(x: torch.Tensor, dim: Optional[int] = None) -> pyro.plate:
    """``pyro.plate("data", len(x))``: the plate over datapoints the ppgen tools look for."""
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise TypeError(f"x must be a tensor of shape (batch, ...), got {getattr(x, 'shape', type(x).__name__)}")
    return pyro.plate(DATA_PLATE, x.shape[0], dim=dim)


def in_data_plate() -> bool:
    """Whether the current Pyro call sits inside a ``pyro.plate("data", ...)``."""
    return any(getattr(m, "name", None) == DATA_PLATE and isinstance(m, pyro.plate) for m in _PYRO_STACK)


def likelihood(name: str, x_dim: int, scale: Optional[float] = None) -> nn.Module:
    """Likelihood module ``p(x | out)`` by name, one of ``"bernoulli"``, ``"gaussian"``, ``"cb"``
    (:mod:`ppgen.models.likelihoods`); ``.dist(out)`` has event shape ``(x_dim,)``. A learned
    Gaussian scale is a parameter: register it with ``pyro.module`` in the model."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
    if isinstance(x_dim, bool) or not isinstance(x_dim, int) or x_dim < 1:
        raise ValueError(f"x_dim must be a positive integer, got {x_dim!r}")
    return make_likelihood(name, x_dim, scale)


def observe(
    x: torch.Tensor,
    fn: Union[dist.Distribution, nn.Module],
    out: Optional[torch.Tensor] = None,
    name: str = "x",
) -> torch.Tensor:
    """Score the observations ``x (B, ...)``: ``pyro.sample(name, fn, obs=x)`` in the ``"data"`` plate.

    :param x: observed batch, first axis over datapoints.
    :param fn: a Pyro distribution with batch shape ``(B,)`` (event: the rest of ``x``), or a
        likelihood module (:func:`likelihood`) whose ``dist(out)`` is used.
    :param out: decoder output ``(B, D)`` for a likelihood module.
    :param name: the observed site's name.
    :returns: ``x``.
    """
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise TypeError(f"x must be a tensor of shape (batch, ...), got {getattr(x, 'shape', type(x).__name__)}")
    if isinstance(fn, nn.Module):
        if not hasattr(fn, "dist"):
            raise TypeError(f"fn must be a distribution or a likelihood module with .dist(out), got {type(fn).__name__}")
        if out is None:
            raise ValueError("observe(x, likelihood, out): a likelihood module needs the decoder output out")
        fn = fn.dist(out)
    elif not isinstance(fn, torch.distributions.Distribution):
        raise TypeError(f"fn must be a distribution or a likelihood module, got {type(fn).__name__}")
    shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
    if shape[-x.ndim:] != tuple(x.shape) and shape != tuple(x.shape[1:]):
        raise ValueError(
            f"site {name!r}: distribution of batch {tuple(fn.batch_shape)} and event {tuple(fn.event_shape)} "
            f"cannot score x of shape {tuple(x.shape)}; declare the per-datapoint dims with .to_event()"
        )
    if in_data_plate():
        return pyro.sample(name, fn, obs=x)
    with data_plate(x):
        return pyro.sample(name, fn, obs=x)
