"""The data of a declared model (``ppgen train model --data``): a built-in dataset or the user's
own file, read, cast and split into train / validation / test.

A data file is one of

- ``.npy``: one array, ``model(x)``;
- ``.npz``: named arrays, ``model(**arrays)``; arrays saved without names
  (``numpy.savez(f, x, mask)``, stored as ``arr_0``, ``arr_1``, ...) are positional, ``model(x, mask)``;
- ``.pt``: a tensor (``model(x)``), a tuple of tensors (``model(x, mask)``) or a dict of tensors
  (``model(**batch)``), all aligned on dim 0, loaded with ``torch.load(weights_only=True)``:
  nothing in the data file runs code.

Only floating-point tensors are cast (``dtype``): labels (integer) and masks (boolean) keep their
dtype, and nothing in a file is binarized. A file's rows are split once, by ``split_seed``, into
train / validation / test (``val_fraction``, ``test_fraction``); a built-in dataset brings its own
splits. Every aligned tensor of a row goes with it (:func:`ppgen.infer.batches.as_batch`).

**Labels for training only.** A semi-supervised model (M2 of Kingma et al. 2014,
``model(xs, ys=None, labelled=None)``) trains on images, labels and a mask of which labels are
given, but its evidence is ``log p(x)``: the model called without the labels. ``train_only``
(``--train-only ys,labelled``) names the dict keys that the training split keeps and the
validation and test splits drop, so the validation ELBO, the test ELBO, ``ppgen evidence``,
``ppgen sample`` and ``ppgen variance`` call ``model(xs)``.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch

from ppgen.data import BINARIZATIONS, DATASETS, DataConfig
from ppgen.infer.batches import as_batch

__all__ = ["FILE_SUFFIXES", "DTYPES", "ModelDataConfig", "ModelData", "load_model_data", "without_keys",
           "check_train_only", "drop_keys"]

#: Data file suffixes ppgen reads (see the module docstring).
FILE_SUFFIXES = (".npy", ".npz", ".pt")
#: Data dtypes: floating-point tensors are cast to the named one ("keep": as stored). NumPy saves
#: float64 by default, and a float64 batch meets float32 network weights in most models.
DTYPES = ("float32", "float64", "keep")


@dataclasses.dataclass(frozen=True)
class ModelDataConfig:
    """Which data a declared model trains on."""

    name: str = "digits"  # a built-in dataset (ppgen.data.DATASETS) or the path of a .npy/.npz/.pt file
    binarization: str = "dynamic"  # built-in datasets: "dynamic", "static" or "none"; files: "none"
    data_dir: Optional[str] = None  # built-in datasets: folder with torchvision's dataset folders
    split_seed: int = 0  # seed of the train/validation/test split
    val_fraction: float = 0.1  # files: share of rows held out for validation
    test_fraction: float = 0.1  # files: share of rows held out for testing (ppgen evidence --split test)
    sha256: Optional[str] = None  # files: digest of the data file, recorded when the run starts
    dtype: str = "float32"  # floating-point tensors cast to "float32" (torch's default) or "float64", or "keep"
    train_only: tuple[str, ...] = ()  # dict files: keys the training split keeps and validation/test drop (labels)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("data must name a built-in dataset or a .npy/.npz/.pt file, got an empty name")
        if self.is_file:
            if self.binarization != "none":
                raise ValueError(
                    f"binarization {self.binarization!r} applies to built-in datasets only; a data file "
                    f"({self.name}) is used as it is: binarize it yourself or leave --binarize out"
                )
        elif self.name not in DATASETS:
            raise ValueError(
                f"data {self.name!r} is neither a built-in dataset ({', '.join(DATASETS)}) nor a file "
                f"ending in {', '.join(FILE_SUFFIXES)}"
            )
        elif self.binarization not in BINARIZATIONS:
            raise ValueError(f"unknown binarization {self.binarization!r}; choose one of {', '.join(BINARIZATIONS)}")
        for field in ("val_fraction", "test_fraction"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{field} must be a number in (0, 1), got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must leave rows to train on, got "
                f"{self.val_fraction} + {self.test_fraction} >= 1"
            )
        keys = self.train_only
        if not isinstance(keys, tuple) or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
            raise ValueError(f"train_only must be a tuple of distinct dict keys (e.g. ('ys', 'labelled')), got {keys!r}")
        if keys and not self.is_file:
            raise ValueError(f"train_only ({', '.join(keys)}) names keys of a dict data file; the built-in dataset "
                             f"{self.name!r} is one tensor of images: leave --train-only out")

    @property
    def is_file(self) -> bool:
        """Whether ``name`` is a data file (by its suffix) rather than a built-in dataset."""
        return Path(self.name).suffix.lower() in FILE_SUFFIXES


class ModelData(NamedTuple):
    """The splits of a declared model's data, each a tensor, a tuple or a dict of aligned tensors
    (CPU); validation and test without the config's ``train_only`` keys."""

    train: Any
    val: Any
    test: Any
    dynamic: bool  # binarize each training batch afresh (built-in data, binarization "dynamic")


def _positional(names: list) -> bool:
    """Whether ``names`` are numpy.savez's names for arrays passed without a keyword."""
    return bool(names) and list(names) == [f"arr_{i}" for i in range(len(names))]


def _read_file(path: Path) -> Any:
    import numpy as np

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                if _positional(arrays.files):  # numpy.savez(f, x, mask): model(x, mask)
                    return tuple(torch.from_numpy(arrays[k]) for k in arrays.files)
                return {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, OSError, RuntimeError, EOFError) as err:  # a pickle or a damaged file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"cannot read data file {path}: {first}. Save a tensor, a tuple or a dict of tensors "
            f"(torch.save / numpy.save / numpy.savez without object arrays)"
        ) from None
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()) and data:
        return data
    if isinstance(data, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in data) and data:
        return tuple(data)
    if isinstance(data, torch.Tensor):
        return data
    raise TypeError(
        f"data file {path} holds a {type(data).__name__}; ppgen reads a tensor (N, ...), a tuple of tensors "
        f"aligned on dim 0 ((x, y), passed as model(x, y)) or a dict of them ({{'x': x, 'y': y}}, passed as "
        f"model(**batch))"
    )


def load_model_data(config: ModelDataConfig, download: bool = True) -> ModelData:
    """Load a built-in dataset's splits, or read a data file and split its rows by ``split_seed``;
    validation and test without the ``train_only`` keys."""
    if not config.is_file:
        data = DataConfig(config.name, config.binarization, config.data_dir, config.split_seed).load(download)
        return ModelData(*(_cast(x, config.dtype) for x in (data.train, data.val, data.test)), data.dynamic)
    path = Path(config.name)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    batch = as_batch(_cast(_read_file(path), config.dtype), f"data file {path}")
    if batch.form == "dict" and not batch.kwargs:
        raise ValueError(f"data file {path} holds an empty dict")
    if config.train_only:
        _check_keys(batch.data, config.train_only, f"data file {path}")
    n = batch.size
    n_val, n_test = round(config.val_fraction * n), round(config.test_fraction * n)
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(
            f"data file {path} has {n} rows: too few to split into train, validation "
            f"({config.val_fraction:g}) and test ({config.test_fraction:g}); give more rows or other fractions"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(config.split_seed))
    val, test, train = perm[:n_val], perm[n_val : n_val + n_test], perm[n_val + n_test :]
    train, val, test = (batch.rows(i.sort().values).data for i in (train, val, test))
    return ModelData(train, without_keys(val, config.train_only), without_keys(test, config.train_only), False)


def _check_keys(data: Any, keys: tuple[str, ...], what: str, flag: str = "--train-only") -> None:
    """Refuse keys ``flag`` cannot drop from ``data``: data not a dict, a missing key, or every key."""
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {','.join(keys)} names keys of a dict, but {what} holds a "
                         f"{'tuple of positional arrays' if isinstance(data, tuple) else 'single array'}: save a "
                         "dict (torch.save({'xs': ..., 'ys': ...}) or numpy.savez(f, xs=..., ys=...)) or leave "
                         f"{flag} out")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{flag} names {missing}, which {what} lacks; its keys: {sorted(data)}")
    if not set(data) - set(keys):
        raise ValueError(f"{flag} {','.join(keys)} would drop every key of {what}; the evaluation needs the "
                         f"observations: leave them out of {flag}")


def drop_keys(model: Callable, data: Any, keys: tuple[str, ...], what: str) -> Any:
    """``data`` (a dict split) without ``keys``, for an evaluation that calls ``model`` without
    them (``ppgen evidence --drop-keys ys,labelled``: the evidence of the observations alone, of
    a run trained without ``--train-only``). Refuses keys that are not there, all keys, and
    dropped arguments the model has no default for."""
    if not keys:
        return data
    _check_keys(data, keys, what, "--drop-keys")
    out = without_keys(data, keys)
    try:
        signature = inspect.signature(model)
    except (TypeError, ValueError):  # no signature to check: the model call will tell
        return out
    try:
        signature.bind(**out)
    except TypeError as err:
        raise ValueError(f"--drop-keys {','.join(keys)}: the model cannot be called with only "
                         f"{', '.join(sorted(out))} ({err}); give the dropped arguments a default "
                         "(e.g. ys=None, labelled=None)") from None
    return out


def without_keys(data: Any, keys: tuple[str, ...]) -> Any:
    """A dict split without ``keys`` (the model's defaults then apply, e.g. ``ys=None``); anything else as it is."""
    if not keys or not isinstance(data, dict):
        return data
    return {k: v for k, v in data.items() if k not in keys}


def check_train_only(model: Callable, config: ModelDataConfig, data: ModelData) -> None:
    """Refuse, before training, a ``train_only`` that the model cannot do without: a dropped key
    must be an optional argument of the model (``ys=None``), or evaluation would fail."""
    if not config.train_only:
        return
    try:
        signature = inspect.signature(model)
    except (TypeError, ValueError):  # no signature to check: the first evaluation will tell
        return
    try:
        signature.bind(**data.val)
    except TypeError as err:
        raise ValueError(
            f"train_only drops {', '.join(config.train_only)} from the validation and test splits, but the model "
            f"cannot be called with only {', '.join(sorted(data.val))} ({err}): give the dropped arguments a "
            "default (e.g. ys=None, labelled=None) or leave them out of --train-only"
        ) from None


def _cast(data: Any, dtype: str) -> Any:
    """Floating-point tensors of ``data`` (a tensor, a tuple or a dict of them) cast to ``dtype``;
    others (integer labels, boolean masks) kept."""
    if dtype == "keep":
        return data
    if isinstance(data, dict):
        return {k: _cast(v, dtype) for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(_cast(v, dtype) for v in data)
    return data.to(getattr(torch, dtype)) if data.is_floating_point() else data


def _first_rows(data: Any, count: int) -> Any:
    """The first ``count`` datapoints of a tensor, tuple or dict split, in the same form."""
    return as_batch(data, "data").rows(slice(0, count)).data
