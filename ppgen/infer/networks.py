"""The networks behind a Pyro model/guide pair, and evaluation mode for them.

Evaluation (the ELBO of a validation set, importance-sampled evidence) must run every network
the way it runs at test time: ``BatchNorm`` with its running statistics and ``Dropout`` off.
In train mode a BatchNorm layer normalises by the batch's own statistics, so a datapoint's
ELBO depends on which others share its chunk, and the training-time number is another quantity
(ProdLDA's ELBO is about 11 nats per document worse in train mode). A Pyro model does not hand
its networks over, so :func:`networks_of` looks for them wherever the callables can reach:

- the callable itself when it is an ``nn.Module`` (``PyroModule``, an amortized guide);
- a bound method's ``__self__`` (``vae.model``), ``functools.partial``'s function and
  arguments, ``__wrapped__``;
- a plain function's closure cells and the module-level names its code reads (Pyro's examples
  build ``encoder = Encoder()`` at module level and call ``pyro.module("encoder", encoder)``);
- the attributes of any non-module object found so far (a model class that holds its encoder
  and decoder, a guide wrapper that holds the guide), three levels deep, and lists, tuples and
  dicts of them;
- the networks registered with ``pyro.module(name, net)`` in Pyro's param store (the store
  keeps their parameters, not the modules: each is found as the module whose parameter dict
  holds a stored ``name$$$...`` parameter).

:func:`eval_mode` switches every module found (and its submodules) to eval and restores each
one's own previous ``training`` flag afterwards, also when the block raises.
"""

from __future__ import annotations

import functools
import gc
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pyro
import torch.nn as nn

__all__ = ["networks_of", "eval_mode"]

_DEPTH = 3  # how many object-attribute hops to follow from a callable


def _walk(obj: Any, found: dict, seen: set, depth: int) -> None:
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        found[id(obj)] = obj
        return  # its submodules come with .modules()
    if isinstance(obj, (str, bytes, int, float, bool, type(None), types.ModuleType, type)):
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for item in obj:
            _walk(item, found, seen, depth)
        return
    if isinstance(obj, dict):
        for item in obj.values():
            _walk(item, found, seen, depth)
        return
    if isinstance(obj, types.MethodType):
        _walk(obj.__self__, found, seen, depth)
        _walk(obj.__func__, found, seen, depth)
        return
    if isinstance(obj, functools.partial):
        for item in (obj.func, obj.args, obj.keywords):
            _walk(item, found, seen, depth)
        return
    if isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                _walk(cell.cell_contents, found, seen, depth - 1)
            except ValueError:  # an empty cell
                pass
        for name in obj.__code__.co_names:
            if name in obj.__globals__:
                value = obj.__globals__[name]
                # only a function's data globals: a module-level network, or a list/dict of them
                if isinstance(value, (nn.Module, list, tuple, dict)):
                    _walk(value, found, seen, depth - 1)
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is not None:
            _walk(wrapped, found, seen, depth)
        return
    try:  # a proxy or an extension type may refuse attribute access: it holds no networks we can reach
        attrs = getattr(obj, "__dict__", None)
    except Exception:
        return
    if isinstance(attrs, dict) and depth > 0:
        for item in attrs.values():
            _walk(item, found, seen, depth - 1)


def _registered_modules(known: list[nn.Module]) -> list[nn.Module]:
    """Modules owning ``pyro.module`` parameters of the param store that ``known`` lacks."""
    store = pyro.get_param_store()
    have = {id(p) for m in known for p in m.parameters()}
    orphans = [store._params[k] for k in store.keys() if "$$$" in k and id(store._params[k]) not in have]
    if not orphans:
        return []
    # parameter <- module._parameters (a dict) <- module.__dict__ (a dict) <- module
    param_dicts = [d for d in gc.get_referrers(*orphans) if isinstance(d, dict)]
    attr_dicts = [d for d in gc.get_referrers(*param_dicts) if isinstance(d, dict)] if param_dicts else []
    owners = gc.get_referrers(*attr_dicts) if attr_dicts else []
    held = {id(d) for d in param_dicts}
    out = {id(m): m for m in owners if isinstance(m, nn.Module) and id(m._parameters) in held}
    return list(out.values())


def networks_of(*fns: Callable, registered: bool = True) -> list[nn.Module]:
    """Every ``nn.Module`` reachable from the callables ``fns`` (see the module docstring), each
    once, in the order found (their submodules not listed separately).

    :param registered: also the modules whose parameters ``pyro.module`` put in the param store.
    """
    found: dict = {}
    seen: set = set()
    for fn in fns:
        _walk(fn, found, seen, _DEPTH)
    modules = list(found.values())
    return modules + _registered_modules(modules) if registered else modules


@contextmanager
def eval_mode(*fns: Callable, registered: bool = True) -> Iterator[list[nn.Module]]:
    """Run the block with every network of ``fns`` (:func:`networks_of`) in eval mode; afterwards
    each module, submodules included, gets back its own previous ``training`` flag.

    :param fns: the model, the guide, or any object holding networks.
    :param registered: also the modules registered with ``pyro.module`` that ``fns`` do not
        reach (found through the garbage collector's referrers: tens of milliseconds).
    :yields: the top-level modules switched.
    """
    roots = networks_of(*fns, registered=registered)
    before = {id(m): (m, m.training) for root in roots for m in root.modules()}
    try:
        for root in roots:
            root.eval()
        yield roots
    finally:
        for module, training in before.values():
            module.training = training
