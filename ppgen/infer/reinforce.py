"""Plain REINFORCE: the score-function ELBO gradient without any Rao-Blackwellization.

Pyro's ``Trace_ELBO`` already weights each non-reparameterized site's score by the log-ratio
summed only to that site's plates, and ``TraceGraph_ELBO`` further drops terms outside the site's
downstream graph. :class:`Reinforce_ELBO` weights *every* score by the whole particle's
``log p(x, z) - log q(z)`` (Williams 1992): the textbook estimator, kept as the baseline that
Rao-Blackwellization (Ranganath et al. 2014, Schulman et al. 2015) improves on.
"""

from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_identically_zero, torch_item

__all__ = ["Reinforce_ELBO"]


class Reinforce_ELBO(Trace_ELBO):
    """``Trace_ELBO`` whose score-function terms use the whole-trace log-ratio as their cost."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo, surrogate = 0.0, 0.0
        log_r: torch.Tensor = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo += torch_item(site["log_prob_sum"])
                surrogate = surrogate + site["log_prob_sum"]
                log_r = log_r + site["log_prob_sum"].detach()
        scores = []
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                _, score_function, entropy_term = site["score_parts"]
                elbo -= torch_item(site["log_prob_sum"])
                log_r = log_r - site["log_prob_sum"].detach()
                if not is_identically_zero(entropy_term):
                    surrogate = surrogate - entropy_term.sum()
                if not is_identically_zero(score_function):
                    scores.append(score_function)
        for score_function in scores:
            surrogate = surrogate + score_function.sum() * log_r
        return -elbo, -surrogate
