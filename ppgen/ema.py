"""An exponential moving average (EMA) of a module's weights, for sampling and evaluation.

After every optimizer step the average moves a fraction ``1 - d`` of the way to the live weights::

    a_t = d_t * a_{t-1} + (1 - d_t) * w_t,        a_0 = w_0 (the weights when the EMA was made)

so with a constant decay ``d`` the average after ``n`` updates has the closed form
``a_n = sum_{i=1..n} (1 - d) d^(n-i) w_i + d^n w_0``. Averaging the iterates of a GAN generator
damps the rotation around an equilibrium that plain simultaneous gradient steps do not settle
(Yazici et al. 2019, "The Unusual Effectiveness of Averaging in GAN Training"; Karras et al.
2018); score models sample from the averaged network for the same reason (Song & Ermon 2020,
"Improved Techniques for Training Score-Based Generative Models", technique 5).

Warm-up (``warmup=True``): the decay of update number ``t`` (``t = 0`` at the first update) is
``d_t = min(d, (1 + t) / (10 + t))``, as in TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``: early averages forget the random initial weights quickly (``d_0 = 0.1``) and the
decay reaches ``d`` after about ``(10 d - 1) / (1 - d)`` updates. With ``warmup=False`` (the
default) every update uses ``d``.

Only floating-point parameters are averaged; buffers (batch-norm statistics, spectral-norm power
iteration vectors, counters) are copied from the live module at each update. The averaged copy
lives on the device and dtype of the module it was made from; :meth:`EMA.update` and
:meth:`EMA.copy_to` take no host sync. ``state_dict`` holds tensors, floats and ints only, so a
checkpoint with it loads under ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA"]


class EMA:
    """The moving average of ``model``'s parameters, kept in a frozen copy of ``model``.

    :param model: the live module (its structure is copied; parameters and buffers start equal).
    :param decay: ``d`` in ``[0, 1)``: the weight kept by the average at each update.
    :param warmup: use ``d_t = min(d, (1 + t) / (10 + t))`` (module docstring) instead of ``d``.

    Use: ``ema = EMA(net, 0.999)``; after every ``opt.step()`` call ``ema.update(net)``; sample
    with ``ema.averaged()(z)``; checkpoint ``ema.state_dict()`` and resume with
    ``ema.load_state_dict(sd)`` on an EMA made from the same architecture.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be a number in [0, 1) (e.g. 0.999), got {decay!r}")
        self.decay, self.warmup, self.num_updates = float(decay), bool(warmup), 0
        self._module = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self._module.parameters():
            p.grad = None
        self._names = [n for n, _ in model.named_parameters()]
        self._params = [p for p in self._module.parameters()]
        self._buffers = [b for b in self._module.buffers()]

    def decay_at(self, t: int) -> float:
        """The decay ``d_t`` used by update number ``t`` (0 for the first update)."""
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step ``a <- d_t a + (1 - d_t) w`` with ``model``'s current parameters ``w``; its
        buffers are copied. ``model`` must have the architecture the EMA was made from."""
        params, buffers = list(model.parameters()), list(model.buffers())
        if len(params) != len(self._params) or len(buffers) != len(self._buffers) or any(
                p.shape != a.shape for p, a in zip(params, self._params)):
            raise ValueError(
                f"model does not match the EMA's architecture: expected {len(self._params)} parameters "
                f"({', '.join(self._names[:3])}...) and {len(self._buffers)} buffers of the shapes it was "
                f"made from, got {len(params)} parameters and {len(buffers)} buffers")
        weight = 1.0 - self.decay_at(self.num_updates)
        floats = [(a, p) for a, p in zip(self._params, params) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [p.detach() for _, p in floats], weight)
        for b, mb in zip(self._buffers, buffers):
            b.copy_(mb)
        self.num_updates += 1

    def averaged(self) -> nn.Module:
        """The averaged module itself (eval mode, no gradients): call it to sample. It is the
        EMA's own copy, updated in place by :meth:`update`; ``copy.deepcopy`` it to keep a snapshot."""
        return self._module

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Overwrite ``model``'s parameters and buffers with the averaged ones; returns ``model``."""
        model.load_state_dict(self._module.state_dict())
        return model

    def state_dict(self) -> dict:
        """``{"decay", "warmup", "num_updates", "module"}``: everything needed to continue exactly."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "module": self._module.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore an average saved by :meth:`state_dict`: later updates continue as if never
        interrupted. Refuses a state with another decay or warm-up (that average would not continue
        the same sequence): make the EMA with the saved settings instead."""
        if not isinstance(state, dict) or not {"decay", "warmup", "num_updates", "module"} <= set(state):
            raise ValueError("state must be a dict from EMA.state_dict() with keys decay, warmup, num_updates, "
                             f"module; got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        if float(state["decay"]) != self.decay or bool(state["warmup"]) != self.warmup:
            raise ValueError(
                f"the saved EMA has decay={state['decay']}, warmup={state['warmup']}; this one has "
                f"decay={self.decay}, warmup={self.warmup}. Make the EMA with the saved settings to resume it.")
        self._module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
