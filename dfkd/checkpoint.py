"""Checkpoint files: written atomically, read with `weights_only=True` (never arbitrary pickle).

A refused pickle is explained from a static scan of its opcodes (`pickletools.genops` parses, it
builds nothing): code it would call (`posix.system`, `builtins.eval`, ...), a whole pickled object
(`torch.save(model)`), or other objects beyond plain weights.
"""

from __future__ import annotations

import _compat_pickle
import errno
import io
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn as nn

from dfkd.errors import DfkdError

# Modules and callables a checkpoint has no business calling: they run commands or evaluate code.
CODE_MODULES = {
    "os",
    "posix",
    "nt",
    "sys",
    "subprocess",
    "_posixsubprocess",
    "shutil",
    "socket",
    "importlib",
    "runpy",
    "pty",
    "code",
    "codeop",
    "pickle",
    "_pickle",
    "marshal",
    "ctypes",
    "webbrowser",
    "multiprocessing",
    "asyncio",
    "signal",
    "pdb",
    "bdb",
    "timeit",
    "commands",
    "popen2",
    "cProfile",
    "profile",
    "trace",
    "zipimport",
    "pkgutil",
    "site",
}
CODE_BUILTINS = {
    "eval",
    "exec",
    "compile",
    "open",
    "__import__",
    "getattr",
    "setattr",
    "delattr",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
    "exit",
    "quit",
}
CODE_CALLABLES = {
    "io.open",
    "_io.open",
    "platform.popen",
    "types.FunctionType",
    "types.CodeType",
    "types.MethodType",
    "operator.attrgetter",
    "operator.methodcaller",
    "torch.load",
    "torch.hub.load",
    "torch.jit.load",
}


class PickleRefused(DfkdError):
    """weights_only refused the file. `kind`: code | object (a whole pickled object at the top, such
    as a module) | objects (plain containers holding other pickled objects); `name` is what it names."""

    def __init__(self, message: str, kind: str, name: str):
        super().__init__(message)
        self.kind, self.name = kind, name


class DiskFull(DfkdError):
    """The device filled up while a file was written; the file's previous version is intact."""


def _is_disk_full(err: BaseException) -> bool:
    # torch's zip writer reports a short write as "unexpected pos" instead of passing on ENOSPC
    return getattr(err, "errno", None) == errno.ENOSPC or "unexpected pos" in str(err)


def remove_stale_temp_files(path: Path) -> None:
    """A process killed while save_atomic wrote `path` leaves its temporary file behind."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)) and _is_disk_full(err):
            raise DiskFull(f"no space left on device while writing {path}") from None
        raise


def is_code(name: str) -> bool:
    """Whether a pickle global (`posix.system`, `builtins.eval`, `eval`) runs commands or evaluates code."""
    module, _, attr = name.rpartition(".")
    if module in ("", "builtins"):
        return attr in CODE_BUILTINS
    return module.split(".")[0] in CODE_MODULES or name in CODE_CALLABLES


@dataclass
class PickleScan:
    globals: list[str] = field(default_factory=list)  # in the order the pickle names them
    top: str | None = None  # the class of the top-level object, when it is not a plain container


_STRINGS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}
_PREAMBLE = {"PROTO", "FRAME", "MEMOIZE", *_STRINGS, *_MEMO_PUT, *_MEMO_GET}


def _py3_name(module: str, name: str, proto: int) -> str:
    """The Python 3 name of a global, as the unpickler maps the Python 2 names of protocols 0-2."""
    if proto < 3:
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


def _scan_one(stream: IO[bytes], scan: PickleScan) -> None:
    """One pickle up to its STOP: the globals it names and, if its first construct is a global, that."""
    pushed: list[Any] = []  # recent string pushes: STACK_GLOBAL takes module and name from them
    memo: dict[int, Any] = {}
    proto, first = 0, True
    for op, arg, _ in pickletools.genops(stream):
        name, found = op.name, None
        if name == "PROTO":
            proto = arg
        elif name in _STRINGS:
            pushed.append(arg)
        elif name == "MEMOIZE" and pushed:
            memo[len(memo)] = pushed[-1]
        elif name in _MEMO_PUT and pushed:
            memo[arg] = pushed[-1]
        elif name in _MEMO_GET:
            pushed.append(memo.get(arg))
        elif name in ("GLOBAL", "INST"):
            found = _py3_name(*str(arg).split(" ", 1), proto)
        elif name == "STACK_GLOBAL":
            found = _py3_name(*map(str, pushed[-2:]), proto) if len(pushed) >= 2 else "?"
        if found is not None:
            scan.globals.append(found)
        if first and name not in _PREAMBLE:
            scan.top = scan.top or found
            first = False


def scan_pickle(data: bytes) -> PickleScan:
    """The globals of every pickle in `data`, read in sequence (torch's legacy format holds several)."""
    scan, stream = PickleScan(), io.BytesIO(data)
    while stream.tell() < len(data):
        try:
            _scan_one(stream, scan)
        except Exception:  # raw tensor bytes after the pickles, or a truncated file
            break
    return scan


def _pickle_bytes(path: Path) -> bytes:
    """The pickle inside torch's zip format (`<name>/data.pkl`), or the whole file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
            return archive.read(pkl[0]) if pkl else b""
    return path.read_bytes()


def _allowed_globals() -> set[str]:
    """What torch's weights-only reader accepts (a private API: without it, torch's message names it)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:
        return set()


def _refusal(path: Path, err: Exception) -> DfkdError:
    """The one-line error for a file weights_only refused: what it holds, read without running it."""
    where = f"checkpoint {str(path)!r}"
    try:
        scan = scan_pickle(_pickle_bytes(path))
    except Exception:
        scan = PickleScan()
    text = str(err)
    found = re.search(r"GLOBAL (\S+?)\.? whose module \S+ is blocked", text)
    code = next((g for g in scan.globals if is_code(g)), found.group(1) if found else None)
    if code:
        return PickleRefused(f"{where} holds code ({code}) and was refused; it was not run", "code", code)
    allowed = _allowed_globals()
    refused = [g for g in scan.globals if g not in allowed]
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    name = refused[0] if refused else (found.group(1) if found else None)
    if scan.top is not None and scan.top in refused:
        return PickleRefused(
            f"{where} holds a whole pickled object ({scan.top}); loading it runs code from the file; "
            "refusing to load it. Save model.state_dict() instead",
            "object",
            scan.top,
        )
    if name is None:  # not a pickle the weights-only reader understands: junk or truncated
        return DfkdError(f"{where} is unreadable or corrupt (UnpicklingError)")
    convert = "torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)"
    return PickleRefused(
        f"{where} holds pickled objects beyond plain weights (it would call {name}); refusing to load it. "
        f"If you trust its source, convert it once: {convert}",
        "objects",
        name,
    )


def load_safe(path: str | Path) -> Any:
    """Load tensors and plain containers only; a file that carries pickled code is refused unrun
    (PickleRefused says what it holds). torch's warnings while probing a file do not reach the user."""
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"checkpoint {str(path)!r} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refusal(path, err) from None
    except Exception as err:  # truncated or not a torch file at all
        raise DfkdError(f"checkpoint {str(path)!r} is unreadable or corrupt ({type(err).__name__})") from None


def load_weights(model: nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict with a one-line error when the weights do not fit the architecture."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        detail = str(err).splitlines()
        raise DfkdError(
            f"{what} does not fit its architecture: {' '.join(line.strip() for line in detail[1:3])}"
        ) from None
