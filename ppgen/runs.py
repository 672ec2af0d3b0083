"""Run directories and the helpers every training loop calls.

A run directory holds::

    config.json        the run's configuration (nested dataclasses as JSON)
    checkpoint.pt      the latest checkpoint (tensors only; loaded with weights_only=True)
    metrics.jsonl      one JSON object per logged event (epoch metrics)
    figures/           PNG figures
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import pyro
import torch

__all__ = [
    "Run",
    "RunExistsError",
    "CheckpointError",
    "Interrupted",
    "StopSignal",
    "check_resumable",
    "config_to_dict",
    "config_from_dict",
    "seed_everything",
    "seeded",
    "rng_state",
    "set_rng_state",
]


class RunExistsError(FileExistsError):
    """The run directory already holds a run and neither resume nor overwrite was asked."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or from another configuration."""


# --------------------------------------------------------------------------- configs


def config_to_dict(cfg: Any) -> dict:
    """A frozen dataclass (possibly nested) as a JSON-ready dict."""
    return dataclasses.asdict(cfg)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {type(value).__name__}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if dataclasses.is_dataclass(hint):
        return config_from_dict(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
    ):
        raise TypeError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def config_from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build the frozen dataclass ``cls`` from parsed JSON, checking names and types."""
    if not isinstance(data, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where} has unknown fields {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resumable(stored: dict, new: dict, may_change: "typing.Collection[str]" = ()) -> None:
    """Refuse to resume a run whose stored config differs from ``new`` in any setting outside
    ``may_change`` (dotted names, e.g. ``"svi.epochs"``)."""
    a, b = _flat(stored), _flat(json.loads(json.dumps(new)))  # tuples compare as JSON lists
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in may_change)
    if diff:
        changes = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff)
        allowed = ", ".join(sorted(may_change)) or "nothing"
        raise ValueError(
            f"cannot resume: the run was made with other settings ({changes}); only {allowed} may "
            "change on --resume (use --overwrite to start afresh)"
        )


# --------------------------------------------------------------------------- seeds


@contextlib.contextmanager
def seeded(seed: Optional[int], device: torch.device) -> "typing.Iterator[None]":
    """Run the block under ``torch.manual_seed(seed)`` and give the caller back its own CPU (and
    ``device``'s CUDA) random stream afterwards. With ``seed`` None the block simply draws from
    the caller's stream."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch (all devices) and Pyro."""
    pyro.set_rng_seed(seed)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors (safe for ``weights_only`` loading).

    Besides the Mersenne Twister words, Python's ``random`` keeps the second normal of its last
    Box-Muller pair (``gauss_next``) and NumPy's legacy generator its cached Gaussian; both are
    kept here (a flag and a float64) so that ``random.gauss`` / ``np.random.normal`` continue
    exactly after :func:`set_rng_state`.
    """
    version, words, gauss_next = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": torch.tensor(words, dtype=torch.int64),  # 624 words and the position
        "python_has_gauss": torch.tensor(gauss_next is not None),
        "python_gauss": torch.tensor(0.0 if gauss_next is None else gauss_next, dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": torch.tensor(int(pos)),
        "numpy_has_gauss": torch.tensor(bool(has_gauss)),
        "numpy_gauss": torch.tensor(float(cached), dtype=torch.float64),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved (checkpoints written before the cached Gaussians were
    stored restore without them: the next ``random.gauss`` starts a fresh pair). The tensors may
    be on any device (a checkpoint loaded with ``map_location="cuda"``): they are read on the CPU."""
    state = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    if "python_has_gauss" in state:
        gauss_next = float(state["python_gauss"]) if bool(state["python_has_gauss"]) else None
    else:  # older checkpoints kept int(gauss_next) under "python_pos": a lost value, not a state
        gauss_next = None
    random.setstate((3, tuple(int(v) for v in state["python"]), gauss_next))
    np.random.set_state((
        "MT19937",
        state["numpy"].numpy().astype(np.uint32),
        int(state["numpy_pos"]),
        int(bool(state.get("numpy_has_gauss", False))),
        float(state.get("numpy_gauss", 0.0)),
    ))
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


# --------------------------------------------------------------------------- interruption


class Interrupted(RuntimeError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint."""


class StopSignal:
    """Context manager for training loops: the first SIGINT or SIGTERM sets :attr:`requested`
    (the signal's name) so the loop can checkpoint and stop cleanly; a second one raises
    ``KeyboardInterrupt`` at once. Outside the main thread it does nothing."""

    def __enter__(self) -> "StopSignal":
        self.requested: Optional[str] = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: writing a checkpoint after this step "
              "(send it again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- run directory


class Run:
    """A run directory: config, checkpoint, metrics log and figures.

    :param path: the directory.
    :param resume: continue the run already in ``path``.
    :param overwrite: start afresh even if ``path`` holds a run (its files are replaced).
    """

    CONFIG, CHECKPOINT, METRICS = "config.json", "checkpoint.pt", "metrics.jsonl"

    def __init__(self, path: Union[str, Path], resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.resume = resume
        exists = (self.path / self.CONFIG).exists()
        if resume and not exists:
            raise FileNotFoundError(f"cannot resume: {self.path} holds no run ({self.CONFIG} missing)")
        if exists and not resume:
            if not overwrite:
                raise RunExistsError(
                    f"{self.path} already holds a run; pass --resume to continue it or "
                    "--overwrite to start afresh"
                )
            for name in (self.CONFIG, self.CHECKPOINT, self.METRICS, "checkpoint.prev.pt",
                         "checkpoint.pt.sha256", "checkpoint.prev.pt.sha256"):
                (self.path / name).unlink(missing_ok=True)
            shutil.rmtree(self.path / "checkpoints", ignore_errors=True)
        self.figures.mkdir(parents=True, exist_ok=True)

    @property
    def figures(self) -> Path:
        return self.path / "figures"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / self.CHECKPOINT

    # config ---------------------------------------------------------------
    def save_config(self, config: dict) -> None:
        _atomic_write_text(self.path / self.CONFIG, json.dumps(config, indent=2) + "\n")

    def load_config(self) -> dict:
        path = self.path / self.CONFIG
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found: is {self.path} a ppgen run directory?") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); restore it or start a new run") from None

    # metrics --------------------------------------------------------------
    def log(self, record: dict) -> None:
        with open(self.path / self.METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        path = self.path / self.METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, keep: "typing.Callable[[dict], bool]") -> None:
        """Keep only the records for which ``keep`` is true (used on resume)."""
        kept = [r for r in self.metrics() if keep(r)]
        _atomic_write_text(self.path / self.METRICS, "".join(json.dumps(r) + "\n" for r in kept))

    # checkpoints ----------------------------------------------------------
    @property
    def previous_checkpoint_path(self) -> Path:
        return self.path / "checkpoint.prev.pt"

    def save_checkpoint(self, state: dict) -> None:
        """Write ``state`` (tensors, numbers, strings, nested dicts/lists) atomically.

        The bytes go to a temporary file that is flushed to disk and renamed into place, with a
        SHA-256 sidecar; the checkpoint it replaces is kept as ``checkpoint.prev.pt``.
        """
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        tmp = self.checkpoint_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        current, previous = self.checkpoint_path, self.previous_checkpoint_path
        if current.exists():
            os.replace(current, previous)
            if _digest_path(current).exists():
                os.replace(_digest_path(current), _digest_path(previous))
        _atomic_write_text(_digest_path(current), hashlib.sha256(data).hexdigest() + "\n")
        os.replace(tmp, current)

    def keep_checkpoint(self, epoch: int) -> Path:
        """Copy the latest checkpoint (and its digest) to ``checkpoints/epoch-NNN.pt``."""
        folder = self.path / "checkpoints"
        folder.mkdir(exist_ok=True)
        kept = folder / f"epoch-{epoch:03d}.pt"
        shutil.copyfile(self.checkpoint_path, kept)
        shutil.copyfile(_digest_path(self.checkpoint_path), _digest_path(kept))
        return kept

    def load_checkpoint(self, map_location: Optional[Union[str, torch.device]] = "cpu") -> dict:
        """Load the latest checkpoint; if it is damaged, the error names the last good one."""
        try:
            return load_checkpoint(self.checkpoint_path, map_location)
        except CheckpointError as err:
            previous = self.previous_checkpoint_path
            if previous.exists() and _loads(previous):
                raise CheckpointError(
                    f"{err} The last good checkpoint is {previous}: copy it over "
                    f"{self.checkpoint_path} to resume from it."
                ) from None
            raise


def _loads(path: Path) -> bool:
    try:
        load_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: nothing in the file is executed. If a
    ``.sha256`` sidecar exists, the file's digest must match it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; the run has not finished an epoch yet")
    data = path.read_bytes()
    digest = _digest_path(path)
    if digest.exists() and digest.read_text().strip() != hashlib.sha256(data).hexdigest():
        raise CheckpointError(f"checkpoint {path} fails its SHA-256 check: it is truncated or corrupt.")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0]}. "
            "The file is corrupt, truncated or holds objects other than tensors; "
            "delete it and retrain (or --overwrite the run)."
        ) from None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
