"""Classifier files that hold a graph rather than weights for an architecture: TorchScript archives
and torch.export programs, told apart by their entries, checked before loading and loaded."""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from dfkd.errors import DfkdError
from dfkd.user_code import error_line


def archive_kind(path: Path) -> str:
    """'torchscript', 'exported' or 'torch' (torch.save's format, or no torch file at all), told
    apart by the entries of the zip archive the first two are."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "torch"
    entries = {name.partition("/")[2] for name in names}  # below the archive's root folder
    if "archive_format" in entries or any(e.startswith("models/") and e.endswith(".json") for e in entries):
        return "exported"
    if "constants.pkl" in entries or any(e.startswith("code/") for e in entries):
        return "torchscript"
    return "torch"


class ExportedTeacher(nn.Module):
    """An exported program's module as a teacher. Its train/eval behaviour was fixed at export and
    the exported module refuses train() and eval(), so they set only this wrapper's flag."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedTeacher:
        self.training = mode
        return self


def load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise DfkdError(f"TorchScript archive {str(path)!r} does not load: {error_line(err)}") from None


# Entries of a .pt2 archive that torch.export.load reads as text, never unpickles.
_EXPORT_TEXT = {"archive_format", "archive_version", "byteorder", "version"}


def unsafe_exported_entries(path: Path) -> list[str]:
    """Entries of a .pt2 archive torch.export.load would unpickle with weights_only=False (pickled
    weights, sample inputs, custom objects) or run (AOTInductor's compiled code), unless they load
    as plain tensors with weights_only=True."""
    unsafe = []
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        raw = _raw_payloads(archive, names)
        for name in names:
            entry = name.partition("/")[2]
            if name in raw or name.endswith("/") or _never_unpickled(entry):
                continue
            if entry.startswith("data/aotinductor/") or not _plain_tensors(archive.read(name)):
                unsafe.append(entry)
    return unsafe


def _never_unpickled(entry: str) -> bool:
    return (
        entry.endswith(".json")
        or entry in _EXPORT_TEXT
        or entry.startswith(".data/")
        or (entry.startswith("extra/") and not entry.endswith(".pt"))
    )


def _raw_payloads(archive: zipfile.ZipFile, names: list[str]) -> set[str]:
    """The weights and tensor constants stored as raw bytes: read as storage, never unpickled."""
    raw = set()
    for name in names:
        if not (name.endswith("_config.json") and "/data/" in name):
            continue
        folder = name.rpartition("/")[0]
        try:
            config = json.loads(archive.read(name)).get("config", {})
        except (ValueError, AttributeError):
            continue
        for item in config.values():
            file = str(item.get("path_name", ""))
            if not item.get("use_pickle", True) and file.startswith(("weight_", "tensor_")):
                raw.add(f"{folder}/{file}")
    return raw


def _plain_tensors(data: bytes) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return True
    except Exception:
        return False


def load_exported(path: Path, trust_pickle: bool) -> nn.Module:
    where = f"exported program {str(path)!r}"
    unsafe = [] if trust_pickle else unsafe_exported_entries(path)
    if unsafe:
        more = f" and {len(unsafe) - 1} more" if len(unsafe) > 1 else ""
        raise DfkdError(
            f"{where} holds entries that run code when loaded ({unsafe[0]}{more}); it was not "
            "loaded: set teacher.trust_pickle=true if you trust its source, or save it again "
            "with torch.export.save"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as err:
        raise DfkdError(f"{where} does not load: {error_line(err)}") from None
    return ExportedTeacher(program.module())
