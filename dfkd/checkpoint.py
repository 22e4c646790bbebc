"""Checkpoint files: written atomically, read with `weights_only=True` (never arbitrary pickle)."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dfkd.errors import DfkdError


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safe(path: str | Path) -> Any:
    """Load tensors and plain containers only; a file that carries pickled code is refused unrun."""
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"checkpoint {str(path)!r} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if not found:  # not a pickle the weights-only reader understands: junk or truncated
            raise DfkdError(f"checkpoint {str(path)!r} is unreadable or corrupt") from None
        first = f"it would call {found.group(1)}"
        raise DfkdError(
            f"checkpoint {str(path)!r} holds pickled objects beyond plain weights ({first}); refusing to load it. "
            "If you trust its source, convert it once: "
            "torch.save(torch.load(path, weights_only=False)['state_dict'], new_path)"
        ) from None
    except Exception as err:  # truncated or not a torch file at all
        raise DfkdError(f"checkpoint {str(path)!r} is unreadable or corrupt ({type(err).__name__})") from None


def load_weights(model: nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict with a one-line error when the weights do not fit the architecture."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        detail = str(err).splitlines()
        raise DfkdError(f"{what} does not fit its architecture: {' '.join(l.strip() for l in detail[1:3])}") from None
