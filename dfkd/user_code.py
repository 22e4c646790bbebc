"""The user's own classes and factories, named as `path/to/file.py:Name` or `package.module:factory`.

Naming one imports and runs that code: the user's choice, as with any Python import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from dfkd.errors import DfkdError


def error_line(err: BaseException) -> str:
    """`Type: message` on one line; TorchScript puts the real error on the last line of its trace."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    line = lines[-1] if lines[0].startswith("The following operation failed") else lines[0]
    return line if line.startswith(f"{type(err).__name__}:") else f"{type(err).__name__}: {line}"


def is_user_code(name: str) -> bool:
    """`path/to/file.py:Name` or `package.module:factory`: the user's own code."""
    return ":" in name


def _import_file(path: Path, arch: str):
    """Import a .py file by its path; its folder is on sys.path meanwhile, so it may import its neighbours."""
    if not path.is_file():
        raise DfkdError(
            f"arch {arch!r}: file {str(path)!r} does not exist (relative paths start at {Path.cwd()})"
        )
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:8]
    name = f"_dfkd_user_{resolved.stem}_{digest}"  # one module name per file, so pickle and copy find it
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(resolved.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules.pop(name, None)
        raise DfkdError(f"arch {arch!r}: importing {str(path)!r} failed: {error_line(err)}") from None
    finally:
        sys.path.remove(str(resolved.parent))
    return module


def _import_module(module_name: str, arch: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise DfkdError(
            f"arch {arch!r}: cannot import {module_name!r} ({error_line(err)}); install it or "
            "put its folder on PYTHONPATH, or write the arch as path/to/file.py:Name"
        ) from None
    except Exception as err:
        raise DfkdError(f"arch {arch!r}: importing {module_name!r} failed: {error_line(err)}") from None


def _defined_in(module) -> str:
    own = {k: v for k, v in vars(module).items() if getattr(v, "__module__", None) == module.__name__}
    names = sorted(k for k, v in own.items() if callable(v) and not k.startswith("_"))
    return ", ".join(names) or "nothing callable"


def _user_factory(arch: str) -> Callable[..., Any]:
    """The class or factory that `path/to/file.py:Name` or `package.module:factory` names, imported."""
    where, _, attr = arch.rpartition(":")
    if not where or not attr:
        raise DfkdError(
            f"arch {arch!r}: write user code as path/to/file.py:ClassName or package.module:factory"
        )
    if where.endswith(".py"):
        module = _import_file(Path(where).expanduser(), arch)
    else:
        module = _import_module(where, arch)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DfkdError(
                f"arch {arch!r}: {where} has no {attr!r}; it defines: {_defined_in(module)} "
                f"(write the arch as {where}:<one of them>)"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise DfkdError(f"arch {arch!r}: {attr} is a {type(obj).__name__}, not a class or factory")
    return obj


def user_classifier(arch: str, kwargs: dict) -> nn.Module:
    """Imports and runs the user's code: the user chose it by naming it as the arch."""
    factory = _user_factory(arch)
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise DfkdError(
            f"arch {arch!r}: calling it with kwargs {kwargs} failed: {error_line(err)}; "
            "set teacher.kwargs / student.kwargs to what it takes"
        ) from None
    if not isinstance(model, nn.Module):
        raise DfkdError(f"arch {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
