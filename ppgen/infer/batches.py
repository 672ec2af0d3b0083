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
"""

from __future__ import annotations

from typing import Any, Union

import torch

__all__ = ["select_rows", "slice_arguments"]

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
