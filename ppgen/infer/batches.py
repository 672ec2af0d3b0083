"""How a batch of user data is cut into rows: one rule for every tool that chunks datapoints.

A Pyro model is called as ``model(x, *args, **kwargs)``. Besides the data ``x`` of shape
``(N, ...)`` a user may pass further per-datapoint tensors (labels ``y`` of shape ``(N,)``, a mask
``(N, D)``, covariates) and arguments that belong to the whole dataset (a scale, a weight matrix,
a flag). A tool that works on datapoints ``i:j`` (evidence chunks, a one-row probe, a minibatch
``perm[i:j]``) must hand the model *the same rows* of every per-datapoint argument and the
others unchanged. The rule, decided here and nowhere else (DESIGN, "user data in one place"):

    a tensor whose dim 0 has the data's length ``N`` holds one row per datapoint and is sliced
    with the data; every other value (scalars, tensors of another length, non-tensors) is
    passed through unchanged.

Tuples, lists and dicts are searched recursively (a ``dict`` of per-datapoint tensors is sliced
entry by entry). The rule is a convention: a dataset-level tensor that happens to have ``N``
rows (an ``(N, N)`` kernel, say) would be sliced too; give such a tensor another length or pass
it through a closure instead of as an argument.

The data itself arrives in one of the three forms Pyro users pass: one tensor, a tuple of model
arguments aligned on dim 0, or a dict of keyword arguments. :func:`as_batch` turns each into a
:class:`Batch` (``args``, ``kwargs``, the number of datapoints ``N``), checking that every
top-level tensor has the same ``N`` (a mismatch is an error naming the arguments); ``Batch.rows``
cuts it by the rule above. The SVI loop, ``evaluate_elbo``, ``log_evidence`` and
``gradient_stats`` all call it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

__all__ = ["Batch", "as_batch", "select_rows", "slice_arguments"]

Index = Union[slice, torch.Tensor]


def _check_index(index: Any) -> None:
    if isinstance(index, slice):
        return
    if isinstance(index, torch.Tensor) and index.ndim == 1 and (
        index.dtype == torch.bool or not (index.is_floating_point() or index.is_complex())
    ):
        return
    raise TypeError(
        "index must be a slice or a 1-D integer/bool tensor of row positions, got "
        f"{type(index).__name__}{tuple(index.shape) if isinstance(index, torch.Tensor) else ''}"
    )


def select_rows(value: Any, num_rows: int, index: Index) -> Any:
    """``value[index]`` if ``value`` is a tensor with ``num_rows`` rows (dim 0), recursively for
    tuples, lists and dicts; anything else unchanged.

    :param value: a model argument.
    :param num_rows: ``N``, the number of datapoints (``len(data)``).
    :param index: which rows: a ``slice`` or a 1-D integer (or bool) tensor.
    """
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == num_rows:
            return value[index.to(value.device) if isinstance(index, torch.Tensor) else index]
        return value
    if isinstance(value, dict):
        return type(value)((k, select_rows(v, num_rows, index)) for k, v in value.items())
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(select_rows(v, num_rows, index) for v in value)
    if isinstance(value, tuple):  # a NamedTuple: rebuild it field by field
        return type(value)(*(select_rows(v, num_rows, index) for v in value))
    return value


def slice_arguments(args: tuple, kwargs: dict, num_rows: int, index: Index) -> tuple[tuple, dict]:
    """The model's extra arguments for the datapoints ``index`` of ``data`` (``num_rows = len(data)``).

    Every positional and keyword tensor whose dim 0 equals ``num_rows`` is cut with ``index``,
    the rest passed through (see the module docstring for the rule and its one caveat).

    :param args: positional arguments after the data, as the tool received them.
    :param kwargs: keyword arguments, likewise.
    :param num_rows: ``N``, the number of datapoints.
    :param index: a ``slice`` (a chunk ``i:j``, the probe ``0:1``) or a 1-D integer tensor (a
        minibatch's positions).
    :returns: ``(args, kwargs)`` for ``model(data[index], *args, **kwargs)``.
    """
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise ValueError(f"num_rows must be a non-negative integer (len(data)), got {num_rows!r}")
    _check_index(index)
    return (
        tuple(select_rows(a, num_rows, index) for a in args),
        {k: select_rows(v, num_rows, index) for k, v in kwargs.items()},
    )


# -- a batch as Pyro users pass it -------------------------------------------------------------

class Batch(NamedTuple):
    """User data normalised for ``model(*args, **kwargs)``: what :func:`as_batch` returns.

    :param args: positional model arguments (a tensor batch ``x`` is ``(x,)``).
    :param kwargs: keyword model arguments (a dict batch).
    :param size: ``N``, the number of datapoints: the common length of dim 0 of every aligned
        tensor (see :func:`as_batch`).
    :param form: how the user passed it: ``"tensor"``, ``"tuple"`` or ``"dict"``
        (:attr:`data` rebuilds that form, e.g. for a ``transform`` the user wrote).
    """

    args: tuple
    kwargs: dict
    size: int
    form: str

    def rows(self, index: Index) -> "Batch":
        """The datapoints ``index`` (a ``slice`` or a 1-D integer/bool tensor) of every tensor
        with ``size`` rows, the other values unchanged (the module's one rule)."""
        args, kwargs = slice_arguments(self.args, self.kwargs, self.size, index)
        first = next((a for a in (*args, *kwargs.values()) if _aligned(a)), None)
        if first is not None:
            size = first.shape[0]
        elif isinstance(index, slice):
            size = len(range(*index.indices(self.size)))
        else:
            size = int(index.sum()) if index.dtype == torch.bool else len(index)
        return Batch(args, kwargs, size, self.form)

    def to(self, device) -> "Batch":
        """Every tensor (recursively) moved to ``device``."""
        return Batch(_to(self.args, device), _to(self.kwargs, device), self.size, self.form)

    @property
    def data(self) -> Any:
        """The batch in the form the user passed it: a tensor, a tuple or a dict."""
        if self.form == "tensor":
            return self.args[0]
        if self.form == "dict":
            return dict(self.kwargs)
        return tuple(self.args)

    @property
    def device(self) -> torch.device:
        """Device of the first aligned tensor (CPU if there is none)."""
        first = next((a for a in (*self.args, *self.kwargs.values()) if isinstance(a, torch.Tensor)), None)
        return first.device if first is not None else torch.device("cpu")


def _aligned(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim >= 1


def _to(value: Any, device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return type(value)((k, _to(v, device)) for k, v in value.items())
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(_to(v, device) for v in value)
    return value


def _positional_names(fn: Optional[Callable], count: int) -> list[str]:
    """``argument 'x' (position 0)`` for each position, from ``fn``'s signature when it has one."""
    names: list[Optional[str]] = [None] * count
    if fn is not None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        for i, p in enumerate(params[:count]):
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names[i] = p.name
            else:
                break
    return [f"argument {n!r} (position {i})" if n else f"positional argument {i}" for i, n in enumerate(names)]


def as_batch(data: Any, what: str = "data", model: Optional[Callable] = None) -> Batch:
    """Normalise user data into model arguments and check that its datapoints line up.

    The three forms Pyro users pass (DESIGN, "user data in one place"):

    - one tensor ``x`` of shape ``(N, ...)``: ``model(x)``;
    - a tuple (or list) ``(x, y, ...)``: ``model(x, y, ...)``, e.g. images and labels;
    - a dict ``{"x": x, "y": y}``: ``model(**batch)``.

    Every top-level tensor with at least one dim is *aligned*: it holds one row per datapoint,
    and all aligned tensors must have the same length ``N`` along dim 0. Anything else passes
    through unchanged: ``None`` (an unlabelled split, ``model(x, None)``), numbers, 0-dim
    tensors, modules. Partly labelled data is a label tensor plus a mask tensor, both aligned.
    A tensor that belongs to the whole dataset (a weight matrix) does not belong in the batch:
    bind it with ``functools.partial`` or a closure.

    :param data: a tensor, a tuple/list or a dict, as above.
    :param what: the caller's name for ``data`` in error messages (``"train_data"``).
    :param model: the model, if known: its signature names the positional arguments in errors.
    :returns: :class:`Batch` with ``size = N``.
    :raises TypeError: another kind of ``data``, no tensor in it at all, or a dict with
        non-string keys.
    :raises ValueError: no aligned tensor, an empty one, or aligned tensors of different lengths
        (the message names the arguments and their lengths).
    """
    if isinstance(data, Batch):
        return data
    if isinstance(data, torch.Tensor):
        args, kwargs, form = (data,), {}, "tensor"
        labels = [what]
    elif isinstance(data, (tuple, list)) and not hasattr(data, "_fields"):
        args, kwargs, form = tuple(data), {}, "tuple"
        labels = _positional_names(model, len(args))
    elif isinstance(data, dict):
        if not all(isinstance(k, str) for k in data):
            raise TypeError(f"{what} as a dict must have string keys (the model's keyword arguments), "
                            f"got keys {list(data)!r}")
        args, kwargs, form = (), dict(data), "dict"
        labels = [f"keyword {k!r}" for k in kwargs]
    else:
        raise TypeError(
            f"{what} must be a tensor (N, ...), a tuple of model arguments aligned on dim 0 "
            f"(model(x, y)) or a dict of keyword arguments (model(**batch)), got {type(data).__name__}"
        )
    lengths = [(label, v.shape[0]) for label, v in zip(labels, (*args, *kwargs.values())) if _aligned(v)]
    if not lengths and not any(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values())):
        raise TypeError(
            f"{what} must hold the data as torch tensors of shape (N, ...) (one tensor, a tuple or a "
            f"dict of them), got {form} of {', '.join(type(v).__name__ for v in (*args, *kwargs.values())) or 'nothing'}"
        )
    if not lengths:
        raise ValueError(
            f"{what} holds no tensor with a datapoint dim (dim 0): give the data as tensors of shape (N, ...)"
        )
    size = lengths[0][1]
    wrong = [(label, n) for label, n in lengths if n != size]
    if wrong:
        listed = ", ".join(f"{label} has {n} rows" for label, n in lengths)
        raise ValueError(
            f"{what}: tensors passed together must have one row per datapoint, all the same length "
            f"along dim 0, but {listed}. Slice them to the same datapoints; pass a dataset-level "
            f"tensor through functools.partial or a closure instead"
        )
    if size == 0:
        raise ValueError(f"{what} is empty (0 datapoints)")
    return Batch(args, kwargs, size, form)
