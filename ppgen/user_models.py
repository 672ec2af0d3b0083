"""Declared models: train a Pyro model/guide pair that lives in the user's own file.

``ppgen train model FILE.py:model --guide FILE.py:guide --data DATA --out RUN`` names a model
(and a guide, or ``auto`` for :class:`ppgen.infer.autoguide.AmortizedGuide`) as ``path.py:name``
(:mod:`ppgen.user_files`); the data is a built-in dataset or the user's own ``.npy`` / ``.npz`` /
``.pt`` file, split into train / validation / test (:mod:`ppgen.user_data`).

This module is the training run and its reloading. The run directory is the usual one
(:class:`ppgen.runs.Run`): config.json holds :class:`ModelRunConfig` with the SHA-256 of the
model, guide and data files, and the SVI loop (:func:`ppgen.infer.svi.train_svi`) writes
metrics.jsonl and checkpoint.pt. Code is never stored: resuming or evaluating the run imports the
file again. **A changed file refuses a resume** (its checkpoint may not fit the new code, and the
continuation would not be the run that was started); ``allow_changed_files=True``
(``--allow-changed-files``) continues with a warning and records the new digest. Evaluating a run
whose file changed warns.

The names of :mod:`ppgen.user_files` and :mod:`ppgen.user_data` are importable from here too.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Union

import pyro
import torch

from ppgen.data import binarize
from ppgen.devices import distributed, resolve_device
from ppgen.infer.batches import as_batch
from ppgen.infer.svi import SVIConfig, SVIResult, evaluate_elbo, load_params, train_svi
from ppgen.runs import Run, check_resumable, config_from_dict, config_to_dict, load_checkpoint, seed_everything
from ppgen.user_data import (
    DTYPES,
    FILE_SUFFIXES,
    ModelData,
    ModelDataConfig,
    _first_rows,
    check_train_only,
    load_model_data,
    without_keys,
)
from ppgen.user_files import AUTO, file_sha256, load_object, resolve_spec, split_spec

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
    "DTYPES",
    "AUTO",
    "without_keys",
    "check_train_only",
    "split_spec",
    "resolve_spec",
    "file_sha256",
]

# --------------------------------------------------------------------------- configs


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


# --------------------------------------------------------------------------- loading code


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
        # the stored config read back with today's defaults: a field added since the run started is no change
        then = json.loads(json.dumps(config_to_dict(old)))
        check_resumable(then, config_to_dict(config), MAY_CHANGE | (DIGESTS if changed else set()))
    if rank == 0:
        run.save_config(config_to_dict(config))
    data = load_model_data(config.data, download)
    if config.guide == AUTO and isinstance(data.train, dict) and "x" not in data.train:
        raise ValueError(
            f"--guide auto encodes the model's argument x, but the data file's dict has keys {sorted(data.train)}: "
            "store the observations under 'x' (model(x=..., ...)) or write a guide (--guide FILE.py:NAME)"
        )
    model, guide = build_pair(config, device)
    check_train_only(model, config.data, data)
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
