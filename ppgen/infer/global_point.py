"""A point ``g*`` of a guide's global latents: the guide's centre for its sites outside the data plate.

:func:`ppgen.infer.nested_evidence.joint_log_evidence` reports, besides the joint evidence, the
per-datapoint ``log p(x_n | g*)`` at one point ``g*`` of the guide's globals (latent sites outside
the datapoint plate). :func:`global_point` finds ``g*`` by running the guide once with each
global site set to the *mean* of its guide distribution (a guide site conditioned on an earlier
global gets the mean given that one's point); a discrete site gets its mode, and a transformed
distribution without a mean (e.g. ``exp`` of a Normal) its base mean pushed through the
transforms, which is the median for a monotone transform of a symmetric base. Latent sites
inside the data plate are drawn as the guide draws them and discarded.
"""

from __future__ import annotations

from typing import Callable

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from ppgen.infer.plates import _data_frame, _split_at_plate
from ppgen.runs import seeded

__all__ = ["global_point"]


def _mode(fn) -> torch.Tensor:
    """A most probable value of a discrete distribution; ties (torch gives NaN for a fair coin)
    go to the first maximum of the enumerated support."""
    try:
        value = fn.mode
        if torch.isfinite(value).all():
            return value
    except NotImplementedError:
        pass
    if not fn.has_enumerate_support:
        raise ValueError(
            f"cannot find a mode of the guide's discrete global distribution {type(fn).__name__}: "
            "it has no .mode and no enumerable support"
        )
    support = fn.enumerate_support(expand=True)  # (V, *batch, *event)
    best = fn.log_prob(support).argmax(0)  # (*batch,)
    index = best.reshape((1,) + best.shape + (1,) * len(fn.event_shape)).expand((1,) + support.shape[1:])
    return support.gather(0, index)[0]


def _center(fn) -> torch.Tensor:
    """A point of a distribution: the mean (continuous), the mode (discrete) or, for a
    transformed distribution without a mean, the base's point pushed through the transforms."""
    if fn.support.is_discrete:
        return _mode(fn)
    try:
        value = fn.mean
        if torch.isfinite(value).all():
            return value
    except NotImplementedError:
        pass
    if isinstance(fn, (dist.Independent, torch.distributions.Independent)):
        return _center(fn.base_dist)
    if isinstance(fn, dist.ExpandedDistribution):
        return _center(fn.base_dist).expand(fn.batch_shape + fn.event_shape)
    if isinstance(fn, dist.MaskedDistribution):
        return _center(fn.base_dist)
    if isinstance(fn, torch.distributions.TransformedDistribution):
        value = _center(fn.base_dist)
        for t in fn.transforms:
            value = t(value)
        return value
    raise ValueError(
        f"cannot find a mean, mode or median of the guide's global distribution {type(fn).__name__}; "
        "give the site a distribution with a .mean (or a transformed one with such a base)"
    )


class _AtCenter(Messenger):
    """Sets every latent site outside the data plate ``data_plate`` to :func:`_center` of its
    distribution (used as ``_AtCenter(data_plate)(guide)``)."""

    def __init__(self, data_plate: str):
        super().__init__()
        self.data_plate = data_plate

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg):
            return
        if _data_frame(msg, self.data_plate) is None:
            msg["value"] = _center(msg["fn"])


@torch.no_grad()
def global_point(guide: Callable, data: torch.Tensor, *args, data_plate: str = "data", **kwargs) -> dict:
    """``{site: value}`` of the point ``g*`` of the guide's global latents at which
    :func:`ppgen.infer.nested_evidence.joint_log_evidence` reports ``log p(x_n | g*)``: each
    global site at the mean (mode, median; see the module docstring) of its guide distribution
    given the earlier globals' points.
    Values are shaped as the guide draws them without particle plates. The guide's local draws on
    the way are discarded (seeded apart from the caller's random stream).

    :param guide: ``guide(data, *args, **kwargs)`` as for
        :func:`ppgen.infer.nested_evidence.joint_log_evidence`.
    """
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    with poutine.block(), seeded(0, data.device):
        tr = poutine.trace(_AtCenter(data_plate)(guide)).get_trace(data, *args, **kwargs)
    return {
        name: site["value"].detach().clone()
        for name, site in _split_at_plate(tr, data_plate, latent_only=True)[0].items()
        if not site["infer"].get("is_auxiliary")
    }
