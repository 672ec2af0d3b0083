"""The user's own code for ``ppgen train model``: ``FILE.py:NAME`` specs, importing the file, and
the SHA-256 digests that tie a run to the files it was trained with.

A spec names a callable defined at the top level of a Python file, or a dotted attribute path to
one (``net.model`` for a method of an object the file creates). Importing a file runs it, as
``python FILE.py`` would: only name files you trust. The file's directory is on ``sys.path``
during the import only, so it can import its neighbours. Code is never stored in a run:
resuming or evaluating it imports the file again (:mod:`ppgen.user_models`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Union

__all__ = ["AUTO", "split_spec", "resolve_spec", "file_sha256", "load_object"]

#: The guide spec that asks for :class:`ppgen.infer.autoguide.AmortizedGuide`.
AUTO = "auto"


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
