"""Declared models: train a Pyro model/guide pair that lives in the user's own file.

``ppgen train model FILE.py:model --guide FILE.py:guide --data DATA --out RUN`` names a model
(and a guide, or ``auto`` for :class:`ppgen.infer.autoguide.AmortizedGuide`) as
``path.py:name``, where ``name`` is a callable defined at the top level of the file, or a dotted
attribute path to one (``net.model`` for a method of an object the file creates). The data is a
built-in dataset (:data:`ppgen.data.DATASETS`, e.g. ``digits``) or the user's own file:

- ``.npy``: one array, ``model(x)``;
- ``.npz``: named arrays, ``model(**arrays)``;
- ``.pt``: a tensor or a dict of tensors aligned on dim 0 (``model(**batch)``), loaded with
  ``torch.load(weights_only=True)``: nothing in the data file runs code.

A file's rows are split once, by ``split_seed``, into train / validation / test
(``val_fraction``, ``test_fraction``); a built-in dataset brings its own splits.

The run directory is the usual one (:class:`ppgen.runs.Run`): config.json holds
:class:`ModelRunConfig` with the SHA-256 of the model, guide and data files, and the SVI loop
(:func:`ppgen.infer.svi.train_svi`) writes metrics.jsonl and checkpoint.pt. Code is never
stored: resuming or evaluating the run imports the file again. **A changed file refuses a
resume** (its checkpoint may not fit the new code, and the continuation would not be the run
that was started); ``allow_changed_files=True`` (``--allow-changed-files``) continues with a
warning and records the new digest. Evaluating a run whose file changed warns.

Importing a file runs it, as ``python FILE.py`` would: only name files you trust. The file's
directory is on ``sys.path`` during the import only, so it can import its neighbours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import pyro
import torch

from ppgen.data import BINARIZATIONS, DATASETS, DataConfig, binarize
from ppgen.devices import distributed, resolve_device
from ppgen.infer.batches import as_batch
from ppgen.infer.svi import SVIConfig, SVIResult, evaluate_elbo, load_params, train_svi
from ppgen.runs import Run, check_resumable, config_from_dict, config_to_dict, load_checkpoint, seed_everything

__all__ = [
    "ModelDataConfig",
    "ModelRunConfig",
    "ModelData",
    "ModelRun",
    "load_object",
    "load_model_data",
    "train_model",
    "load_model_run",
    "FILE_SUFFIXES",
]

#: Data file suffixes ppgen reads (see the module docstring).
FILE_SUFFIXES = (".npy", ".npz", ".pt")
#: Data dtypes: floating-point tensors are cast to the named one ("keep": as stored). NumPy saves
#: float64 by default, and a float64 batch meets float32 network weights in most models.
DTYPES = ("float32", "float64", "keep")
#: The guide spec that asks for :class:`ppgen.infer.autoguide.AmortizedGuide`.
AUTO = "auto"


# --------------------------------------------------------------------------- configs


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

    @property
    def is_file(self) -> bool:
        """Whether ``name`` is a data file (by its suffix) rather than a built-in dataset."""
        return Path(self.name).suffix.lower() in FILE_SUFFIXES


@dataclasses.dataclass(frozen=True)
class ModelRunConfig:
    """Everything ``ppgen train model`` needs; stored as the run's config.json."""

    model: str  # "path.py:name" of the Pyro model (path absolute once resolved)
    guide: str = AUTO  # "path.py:name" of the guide, or "auto" for AmortizedGuide
    data: ModelDataConfig = ModelDataConfig()  # built-in dataset or data file, and its split
    svi: SVIConfig = SVIConfig()  # estimator and loop settings
    data_plate: str = "data"  # name of the model's plate over datapoints
    guide_family: str = "diag"  # guide "auto": posterior family of local latents (diag, fullcov, iaf)
    guide_hidden: tuple[int, ...] = (400,)  # guide "auto": hidden widths of the encoder trunk
    guide_flows: int = 2  # guide "auto": IAF steps (guide_family "iaf")
    guide_discrete: str = "enumerate"  # guide "auto": discrete local latents, "enumerate" or "score"
    model_sha256: Optional[str] = None  # digest of the model file, recorded when the run starts
    guide_sha256: Optional[str] = None  # digest of the guide file (None for "auto")
    family: str = "model"  # run family, for `ppgen sample`, evidence, variance and reports

    def __post_init__(self) -> None:
        split_spec(self.model, "model")
        if self.guide != AUTO:
            split_spec(self.guide, "guide")
        if not isinstance(self.data_plate, str) or not self.data_plate:
            raise ValueError(f"data_plate must be the name of the model's datapoint plate, got {self.data_plate!r}")
        if self.guide == AUTO:  # AmortizedGuide checks its own arguments; fail before training starts
            from ppgen.infer.autoguide import DISCRETE_MODES
            from ppgen.models.posteriors import POSTERIORS

            if self.guide_family not in POSTERIORS:
                raise ValueError(f"unknown guide_family {self.guide_family!r}; choose one of {', '.join(POSTERIORS)}")
            if self.guide_discrete not in DISCRETE_MODES:
                raise ValueError(f"guide_discrete must be one of {', '.join(DISCRETE_MODES)}, got {self.guide_discrete!r}")


def split_spec(spec: str, what: str = "model") -> tuple[Path, str]:
    """``"path.py:name"`` -> ``(Path("path.py"), "name")``.

    :raises ValueError: no ``:name`` part, or a path not ending in ``.py``.
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} must be written FILE.py:NAME (e.g. my_model.py:model), got {spec!r}")
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise ValueError(f"{what} must be written FILE.py:NAME (a Python file, a colon, a name), got {spec!r}")
    return Path(path), name


def resolve_spec(spec: str, what: str = "model") -> str:
    """The spec with its path made absolute, so a resume from another folder finds the same file."""
    if spec == AUTO and what == "guide":
        return spec
    path, name = split_spec(spec, what)
    return f"{path.expanduser().resolve()}:{name}"


def file_sha256(path: Union[str, Path]) -> str:
    """SHA-256 hex digest of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- loading code


def _import_file(path: Path, what: str):
    """Import ``path`` as a fresh module (its directory on ``sys.path`` during the import only)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    digest = file_sha256(path)[:12]
    module_name = f"ppgen_user_files.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {what} file {path}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    sys.path.insert(0, folder)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(module_name, None)
        where = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
        line = f" (line {where[-1].lineno})" if where else ""
        raise ValueError(f"importing {what} file {path} failed{line}: {type(err).__name__}: {err}") from err
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:  # the file took it off itself
            pass
    return module


def load_object(spec: str, what: str = "model", modules: Optional[dict] = None) -> Callable:
    """The callable that ``spec`` (``"path.py:name"``, ``name`` possibly dotted) names.

    :param modules: ``{resolved path: module}`` of files imported already in this build, so a
        model and a guide from one file share its objects (one import per file).
    :raises FileNotFoundError: the file does not exist.
    :raises ValueError: a malformed spec, an import that fails, or a name the file lacks.
    :raises TypeError: the name is not callable.
    """
    path, name = split_spec(spec, what)
    path = path.expanduser().resolve()
    modules = {} if modules is None else modules
    if path not in modules:
        modules[path] = _import_file(path, what)
    obj: Any = modules[path]
    for i, part in enumerate(name.split(".")):
        if not hasattr(obj, part):
            have = sorted(k for k, v in vars(modules[path]).items() if callable(v) and not k.startswith("_")) if i == 0 else []
            known = f"; callables it defines: {', '.join(have)}" if i == 0 else ""
            raise ValueError(f"{what} file {path} defines no {'.'.join(name.split('.')[: i + 1])!r}{known}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{what} {name!r} in {path} is a {type(obj).__name__}, not a callable Pyro {what}")
    return obj


def build_pair(config: ModelRunConfig, device: Union[str, torch.device] = "cpu") -> tuple[Callable, Callable]:
    """Import the model (and guide) files under ``config.svi.seed`` and return ``(model, guide)``.

    Module-level ``nn.Module`` objects the files create are moved to ``device``.
    """
    seed_everything(config.svi.seed)  # networks the file builds at import start from the run's seed
    modules: dict = {}
    model = load_object(config.model, "model", modules)
    if config.guide == AUTO:
        from ppgen.infer.autoguide import AmortizedGuide

        guide = AmortizedGuide(model, family=config.guide_family, hidden=config.guide_hidden,
                               flows=config.guide_flows, discrete=config.guide_discrete, data_plate=config.data_plate)
        guide.to(device)
    else:
        guide = load_object(config.guide, "guide", modules)
    for module in modules.values():
        for value in vars(module).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
    return model, guide


def _check_files(config: ModelRunConfig, act: str) -> list[str]:
    """What changed in the run's files since ``config``'s digests were recorded, one line each."""
    changed = []
    for what, spec, digest in (("model", config.model, config.model_sha256), ("guide", config.guide, config.guide_sha256)):
        if digest is None or spec == AUTO:
            continue
        path = split_spec(spec, what)[0]
        if not path.is_file():
            raise FileNotFoundError(f"cannot {act} the run: its {what} file {path} is gone")
        now = file_sha256(path)
        if now != digest:
            changed.append(f"{what} file {path} (sha256 {digest[:12]}... -> {now[:12]}...)")
    if config.data.is_file and config.data.sha256 is not None:
        path = Path(config.data.name)
        if not path.is_file():
            raise FileNotFoundError(f"cannot {act} the run: its data file {path} is gone")
        now = file_sha256(path)
        if now != config.data.sha256:
            changed.append(f"data file {path} (sha256 {config.data.sha256[:12]}... -> {now[:12]}...)")
    return changed


def with_digests(config: ModelRunConfig) -> ModelRunConfig:
    """``config`` with the SHA-256 of its model, guide and data files filled in as they are now."""
    model_path = split_spec(config.model, "model")[0]
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} not found")
    guide_digest = None
    if config.guide != AUTO:
        guide_path = split_spec(config.guide, "guide")[0]
        if not guide_path.is_file():
            raise FileNotFoundError(f"guide file {guide_path} not found")
        guide_digest = file_sha256(guide_path)
    data = config.data
    if data.is_file:
        if not Path(data.name).is_file():
            raise FileNotFoundError(f"data file {data.name} not found")
        data = dataclasses.replace(data, sha256=file_sha256(data.name))
    return dataclasses.replace(config, model_sha256=file_sha256(model_path), guide_sha256=guide_digest, data=data)


# --------------------------------------------------------------------------- data


class ModelData(NamedTuple):
    """The splits of a declared model's data, each a tensor or a dict of aligned tensors (CPU)."""

    train: Any
    val: Any
    test: Any
    dynamic: bool  # binarize each training batch afresh (built-in data, binarization "dynamic")


def _read_file(path: Path) -> Any:
    import numpy as np

    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, OSError, RuntimeError, EOFError) as err:  # a pickle or a damaged file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"cannot read data file {path}: {first}. Save a tensor or a dict of tensors "
            f"(torch.save / numpy.save / numpy.savez without object arrays)"
        ) from None
    if isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values()) and data:
        return data
    if isinstance(data, torch.Tensor):
        return data
    raise TypeError(
        f"data file {path} holds a {type(data).__name__}; ppgen reads a tensor (N, ...) or a dict of "
        f"tensors aligned on dim 0 ({{'x': x, 'y': y}}, passed as model(**batch))"
    )


def load_model_data(config: ModelDataConfig, download: bool = True) -> ModelData:
    """Load a built-in dataset's splits, or read a data file and split its rows by ``split_seed``."""
    if not config.is_file:
        data = DataConfig(config.name, config.binarization, config.data_dir, config.split_seed).load(download)
        return ModelData(*(_cast(x, config.dtype) for x in (data.train, data.val, data.test)), data.dynamic)
    path = Path(config.name)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    batch = as_batch(_cast(_read_file(path), config.dtype), f"data file {path}")
    if batch.form == "dict" and not batch.kwargs:
        raise ValueError(f"data file {path} holds an empty dict")
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
    return ModelData(train, val, test, False)


def _cast(data: Any, dtype: str) -> Any:
    """Floating-point tensors of ``data`` (a tensor or a dict of them) cast to ``dtype``; others kept."""
    if dtype == "keep":
        return data
    if isinstance(data, dict):
        return {k: _cast(v, dtype) for k, v in data.items()}
    return data.to(getattr(torch, dtype)) if data.is_floating_point() else data


def _first_rows(data: Any, count: int) -> Any:
    """The first ``count`` datapoints of a tensor or dict split, in the same form."""
    return as_batch(data, "data").rows(slice(0, count)).data


# --------------------------------------------------------------------------- training


class ModelRun(NamedTuple):
    """A trained declared model: model, guide, data, config, run directory and training result."""

    model: Callable
    guide: Callable
    data: ModelData
    config: ModelRunConfig
    run: Optional[Run]
    result: SVIResult


#: Settings that may change on --resume (besides the file digests with allow_changed_files).
MAY_CHANGE = {"svi.epochs", "svi.device", "svi.keep_checkpoints"}
DIGESTS = {"model_sha256", "guide_sha256", "data.sha256"}


def train_model(
    config: ModelRunConfig,
    out: Union[str, Path],
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    download: bool = True,
    allow_changed_files: bool = False,
) -> ModelRun:
    """Train the declared model/guide pair of ``config`` by SVI into run directory ``out``.

    Writes config.json (with the files' SHA-256), metrics.jsonl (one line per epoch, then the
    test ELBO per datapoint) and checkpoint.pt. With ``resume`` the files are imported again and
    the loop continues from the checkpoint exactly as an uninterrupted run would.

    :param allow_changed_files: on ``resume``, continue even if the model, guide or data file
        changed since the run started (a warning names them, and the new digests are recorded);
        without it such a resume is refused.
    """
    config = with_digests(config)
    job = distributed(resolve_device(config.svi.device))
    rank, device = job.rank, job.place(resolve_device(config.svi.device))
    run = Run(out, resume=resume, overwrite=overwrite) if rank == 0 or resume else None
    if resume:
        stored = run.load_config()
        if stored.get("family") != "model":
            raise ValueError(f"cannot resume: {run.path} holds a run of family {stored.get('family')!r}, not a model run")
        old = config_from_dict(ModelRunConfig, stored)
        changed = _check_files(old, "resume")
        if changed and not allow_changed_files:
            raise ValueError(
                "cannot resume: changed since the run started: " + "; ".join(changed) + ". The checkpoint "
                "belongs to the old code and data; restore them, pass --allow-changed-files to continue "
                "with the new ones anyway, or --overwrite to start afresh"
            )
        if changed:
            warnings.warn("resuming with changed files: " + "; ".join(changed) + " (new digests recorded)",
                          stacklevel=2)
        check_resumable(stored, config_to_dict(config), MAY_CHANGE | (DIGESTS if changed else set()))
    if rank == 0:
        run.save_config(config_to_dict(config))
    data = load_model_data(config.data, download)
    if config.guide == AUTO and isinstance(data.train, dict) and "x" not in data.train:
        raise ValueError(
            f"--guide auto encodes the model's argument x, but the data file's dict has keys {sorted(data.train)}: "
            "store the observations under 'x' (model(x=..., ...)) or write a guide (--guide FILE.py:NAME)"
        )
    model, guide = build_pair(config, device)
    result = train_svi(model, guide, data.train, data.val, config.svi, run=run,
                       transform=binarize if data.dynamic else None, progress=progress, data_plate=config.data_plate)
    if rank == 0:
        test = as_batch(data.test, "test data", model).to(device).data
        run.log({"epoch": config.svi.epochs, "test_elbo": evaluate_elbo(model, guide, test)})
    return ModelRun(model, guide, data, config, run if rank == 0 else None, result)


# --------------------------------------------------------------------------- loading a trained run


def _register(model: Callable, guide: Callable, example: Any) -> set[str]:
    """Put every parameter of ``model``/``guide`` into a cleared param store by one trace on
    ``example`` (off the caller's random stream); returns their names."""
    from pyro import poutine
    from pyro.infer import Trace_ELBO

    batch = as_batch(example, "data", model)
    pyro.clear_param_store()
    cuda = [batch.device] if batch.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), poutine.trace(param_only=True) as capture:
        Trace_ELBO().loss(model, guide, *batch.args, **batch.kwargs)
    return {name for name, site in capture.trace.nodes.items() if site["type"] == "param"}


def _open(path: Union[str, Path], act: str) -> tuple[Run, ModelRunConfig]:
    run = Run(path, resume=True)
    stored = run.load_config()
    if stored.get("family") != "model":
        raise ValueError(f"{path} holds a run of family {stored.get('family')!r}, not a model run (ppgen train model)")
    config = config_from_dict(ModelRunConfig, stored)
    changed = _check_files(config, act)
    if changed:
        warnings.warn(f"{path}: changed since the run was trained: " + "; ".join(changed), stacklevel=3)
    return run, config


def _setup(config: ModelRunConfig, device: str, checkpoint: Optional[Path], run_path) -> tuple:
    """Model, guide and data of a model run, parameters from ``checkpoint`` (None: fresh init)."""
    device = resolve_device(device)
    data = load_model_data(config.data, download=False)
    model, guide = build_pair(config, device)
    first = as_batch(_first_rows(data.train, config.svi.batch_size), "train data", model).to(device).data
    if data.dynamic:  # the first training batch as the loop saw it, binarized (guides size themselves on it)
        first = binarize(first, torch.Generator(device=first.device).manual_seed(config.svi.seed))
    registered = _register(model, guide, first)
    if checkpoint is not None:
        params = load_checkpoint(checkpoint, map_location=device)["params"]
        missing = sorted(registered - set(params))
        if missing:
            raise ValueError(f"checkpoint {checkpoint} lacks parameters {missing} that the model/guide of {run_path} "
                             "registers: the files changed since it was trained, or it comes from another run")
        load_params({k: v for k, v in params.items() if k in registered})
    return model, guide, data


def load_model_run(path: Union[str, Path], device: str = "cpu") -> tuple[Callable, Callable, ModelRunConfig, ModelData]:
    """Import the files of model run ``path`` again and load its checkpoint into Pyro's param store.

    :returns: ``(model, guide, config, data)``; the data on the CPU.
    """
    run, config = _open(path, "load")
    model, guide, data = _setup(config, device, run.checkpoint_path, path)
    return model, guide, config, data
