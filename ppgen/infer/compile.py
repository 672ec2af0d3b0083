"""What ``torch.compile(fullgraph=True)`` needs from Pyro 1.9.2, applied only around a call.

Dynamo cannot trace a few of Pyro's internals, each harmless to change for the length of one
loss evaluation. :func:`pyro_compat` swaps them in, and back out on exit, so nothing outside the
compiled call (evaluation, evidence, other users of Pyro in the process) sees a difference:

=================================================  ===============================================
Pyro internal                                      stand-in, same values
=================================================  ===============================================
``Message(...)``, a ``TypedDict(total=False)``     ``dict(...)`` (what the TypedDict call returns)
``Messenger.__call__``: a ``partial`` subclass     a closure running ``fn`` inside the messenger
``@ignore_jit_warnings`` on ``_Subsample.sample``  the undecorated functions (the decorator only
and ``BroadcastMessenger._pyro_sample``            filters TorchScript tracer warnings)
``torch_item`` in the ELBOs                        ``x.detach()``: the loss stays a 0-d tensor on
                                                   the device (no host read, no graph break)
``warn_if_nan`` in the ELBOs (``sys._getframe``,   nothing: the SVI step checks loss and gradients
a data-dependent ``if``)                           for NaN/inf itself, on the device
torch's ``Distribution._get_checked_instance``     ``type(self).__new__(type(self))``, which dynamo
(``expand``, e.g. a plate broadcasting a prior):   traces on torch 2.11 as on 2.14 (2.11 stops at
``self.__new__(type(self))``                       ``self.__new__``; measured on the GPU machine)
=================================================  ===============================================

The changes are written for, and checked against, Pyro 1.9.2 (:data:`PYRO_VERSION`); on another
version :func:`unsupported_reason` says so and the SVI step runs eagerly. ``Trace_ELBO``'s
``differentiable_loss`` returns ``loss + (surrogate - torch_item(surrogate))``; with the stand-in
that is ``loss + (surrogate - surrogate.detach())``, the same value and the same gradient.

:func:`pyro_compat` is also used by the eager step for the same ELBOs: with it, the loss of a
step never leaves the device, compiled or not.

The module also holds what the SVI step's build-time check of a compiled loss needs
(:mod:`ppgen.infer.svi_step`): :func:`buffers_kept` / :class:`ModuleBuffers`, so that running
the loss on the example batch, eagerly and compiled, leaves no trace in module buffers
(BatchNorm's running statistics), and :func:`close`, its tolerance.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import pyro
import torch

__all__ = ["PYRO_VERSION", "ModuleBuffers", "buffers_kept", "close", "largest", "pyro_compat", "unsupported_reason"]

#: The Pyro release whose internals :func:`pyro_compat` replaces.
PYRO_VERSION = "1.9.2"


def unsupported_reason() -> Optional[str]:
    """``None`` if the installed Pyro is the one these changes were written for, else why not."""
    if pyro.__version__ != PYRO_VERSION:
        return (f"ppgen's torch.compile support is written for Pyro {PYRO_VERSION} internals, "
                f"found Pyro {pyro.__version__}")
    return None


def _detach(x: Any) -> Any:
    """``torch_item`` without the host read: a tensor stays a (detached) tensor."""
    return x.detach() if hasattr(x, "detach") else x


def _no_nan_warning(value: Any, msg: str = "", *, filename: Any = None, lineno: Any = None) -> Any:
    return value


def _checked_instance(self, cls, _instance=None):
    if _instance is None and type(self).__init__ != cls.__init__:
        raise NotImplementedError(f"Subclass {type(self).__name__} of {cls.__name__} that defines a custom "
                                  "__init__ method must also define a custom .expand() method.")
    return type(self).__new__(type(self)) if _instance is None else _instance


def _messenger_call(self, fn: Callable) -> Callable:
    if not callable(fn):
        raise ValueError(f"{fn!r} is not callable, did you mean to pass it as a keyword arg?")

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with self:
            return fn(*args, **kwargs)

    return wrapped


def _replacements() -> list[tuple[Any, str, Any]]:
    """``(owner, attribute, stand-in)`` for every change (imported lazily: the modules are
    Pyro's own)."""
    from pyro import primitives
    from torch.distributions import Distribution
    from pyro.infer import trace_elbo, trace_mean_field_elbo
    from pyro.poutine import broadcast_messenger, messenger, runtime, subsample_messenger

    subsample_sample = subsample_messenger._Subsample.__dict__["sample"]
    broadcast = broadcast_messenger.BroadcastMessenger.__dict__["_pyro_sample"].__func__
    out: list[tuple[Any, str, Any]] = [
        (runtime, "Message", dict),
        (primitives, "Message", dict),
        (subsample_messenger, "Message", dict),
        (messenger.Messenger, "__call__", _messenger_call),
        (subsample_messenger._Subsample, "sample", subsample_sample.__wrapped__),
        (broadcast_messenger.BroadcastMessenger, "_pyro_sample", staticmethod(broadcast.__wrapped__)),
        (Distribution, "_get_checked_instance", _checked_instance),
    ]
    for module in (trace_elbo, trace_mean_field_elbo):
        out += [(module, "torch_item", _detach), (module, "warn_if_nan", _no_nan_warning)]
    return out


@functools.lru_cache(maxsize=1)
def _checked() -> tuple[tuple[Any, str, Any, Any], ...]:
    """The replacements with the originals they stand for; checked once."""
    rows = []
    for owner, name, new in _replacements():
        if name not in vars(owner):
            raise RuntimeError(f"Pyro {pyro.__version__}: {owner.__name__}.{name} not found")
        rows.append((owner, name, vars(owner)[name], new))
    return tuple(rows)


class ModuleBuffers:
    """The buffers of the modules called while :meth:`note` is a global forward pre-hook, as
    they were before their module's first call; :meth:`restore` puts them back."""

    def __init__(self):
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def note(self, module: torch.nn.Module, _inputs: Any) -> None:
        for buf in module.buffers():
            if id(buf) not in self.saved:
                self.saved[id(buf)] = (buf, buf.detach().clone())

    def restore(self) -> None:
        with torch.no_grad():
            for buf, value in self.saved.values():
                buf.copy_(value)


@contextlib.contextmanager
def buffers_kept() -> Iterator[ModuleBuffers]:
    """Buffers of the modules called inside the block (BatchNorm's running statistics and batch
    count in train mode, spectral norm's power-iteration vector) are put back on exit, also on
    error. Buffers changed without calling their module are not covered. Yields the
    :class:`ModuleBuffers` it keeps (``.saved``: the buffers it saw)."""
    saved = ModuleBuffers()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(saved.note)
    try:
        yield saved
    finally:
        hook.remove()
        saved.restore()


def largest(b: torch.Tensor) -> float:
    """The largest finite ``|entry|`` of ``b`` (0 if none)."""
    finite = b[b.isfinite()]
    return float(finite.abs().max()) if finite.numel() else 0.0


def close(a: torch.Tensor, b: torch.Tensor, scale: float = 0.0) -> bool:
    """Equal within ``rtol = 1e-4`` and ``1e-5`` of ``max(scale, b's largest finite entry)``, NaN
    and inf in the same places (a non-finite example batch is judged by where its non-finite
    entries are)."""
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, largest(b)) + 1e-7, equal_nan=True))


@contextlib.contextmanager
def pyro_compat() -> Iterator[None]:
    """Within this block Pyro's internals listed in the module docstring are the traceable
    stand-ins; on exit (also on error) the originals are back. Not thread-safe (nor is Pyro's
    global handler stack). Raises ``RuntimeError`` on a Pyro version other than
    :data:`PYRO_VERSION` (check :func:`unsupported_reason` first)."""
    reason = unsupported_reason()
    if reason is not None:
        raise RuntimeError(reason)
    rows = _checked()
    for owner, name, _, new in rows:
        setattr(owner, name, new)
    try:
        yield
    finally:
        for owner, name, old, _ in rows:
            setattr(owner, name, old)

