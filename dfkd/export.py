"""A trained student out of dfkd: TorchScript, torch.export, ONNX or a plain state_dict, verified.

Every export carries the input spec (channels, size, classes, mean, std) the model expects, and is
reloaded with plain torch or onnxruntime and run on a fixed batch before it is kept: a file whose
logits differ from the student's beyond the tolerance is deleted, never left behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from dfkd.errors import DfkdError
from dfkd.export_formats import WRITERS, Runner, reload, require_onnx
from dfkd.spec import InputSpec

SUFFIXES = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx", "state_dict": ".weights.pt"}
FORMATS = tuple(SUFFIXES)
ATOL, RTOL = 1e-4, 1e-4  # |Δlogit| allowed: ATOL + RTOL·|logit|
VERIFY_BATCH, VERIFY_SEED = 16, 0


@dataclass
class ExportResult:
    path: Path
    spec: InputSpec
    max_diff: float  # max |Δlogit| of the reloaded file against the student on the verification batch
    sidecar: Path | None = None  # state_dict: the JSON with the architecture and input spec


def spec_from_meta(meta: dict, where: str) -> InputSpec:
    missing = [k for k in ("in_channels", "image_size", "num_classes", "mean", "std") if k not in meta]
    if missing:
        raise DfkdError(
            f"{where}: its meta lacks {', '.join(missing)}; rewrite it with "
            "`dfkd convert ... --mean M --std S` to record the input spec"
        )
    return InputSpec(meta["in_channels"], meta["image_size"], meta["num_classes"], meta["mean"], meta["std"])


def student_path(source: str | Path) -> Path:
    """A student .pt, or the run directory holding student.pt."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "student.pt").is_file():
            raise DfkdError(
                f"run directory {str(path)!r} holds no student.pt (has the run finished?); "
                "name a finished run or a student .pt file"
            )
        return path / "student.pt"
    if not path.exists():
        raise DfkdError(f"{str(path)!r} not found; name a finished run directory or its student.pt")
    return path


def load_student(path: str | Path, arch: str | None = None) -> tuple[nn.Module, InputSpec]:
    """A dfkd student checkpoint (or the run directory holding student.pt), in eval mode, with its spec.
    A student of your own code loads only when `arch` names that code (its file's meta never does)."""
    model, meta = load_frozen(student_path(path), arch)
    return model, spec_from_meta(meta, str(student_path(path)))


def load_frozen(path: Path, arch: str | None = None) -> tuple[nn.Module, dict]:
    """A dfkd checkpoint's model, in eval mode and without parameter gradients, and its meta."""
    from dfkd.classifier_files import freeze, load_classifier

    model, meta = load_classifier(path, arch=arch)
    return freeze(model), meta


def spec_document(spec: InputSpec, meta: dict) -> dict:
    """What each export records about its input: enough to feed the model without dfkd."""
    doc = {
        "arch": meta.get("arch"),
        "channels": spec.channels,
        "size": spec.size,
        "num_classes": spec.num_classes,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input": "N x channels x size x size, float32, (pixel in [0, 1] - mean) / std per channel",
        "output": "N x num_classes logits",
    }
    if meta.get("kwargs"):
        doc["kwargs"] = dict(meta["kwargs"])
    if meta.get("classes"):
        doc["classes"] = list(meta["classes"])
    return doc


def default_out(source: Path, fmt: str) -> Path:
    """student.pt -> student.<ext> beside it."""
    return source.with_name(source.stem + SUFFIXES[fmt])


def sidecar_of(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def verification_batch(spec: InputSpec) -> torch.Tensor:
    gen = torch.Generator().manual_seed(VERIFY_SEED)
    return torch.randn(VERIFY_BATCH, *spec.shape, generator=gen)


def export_student(
    source: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    arch: str | None = None,
) -> Path:
    """Write the student at `source` (a run directory or student .pt) as `fmt`, verified; return the file.
    `arch` names a student of your own code (see load_student)."""
    return export_verified(source, fmt, out, overwrite=overwrite, arch=arch).path


def export_verified(
    source: str | Path,
    fmt: str,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    arch: str | None = None,
) -> ExportResult:
    """export_student, also giving the spec and the max |Δlogit| of the reloaded file."""
    if fmt not in SUFFIXES:
        raise DfkdError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = student_path(source)
    out = Path(out).expanduser() if out is not None else default_out(src, fmt)
    targets = [out, sidecar_of(out)] if fmt == "state_dict" else [out]
    for target in targets:
        check_target(target, overwrite)
    if fmt == "onnx":
        require_onnx()
    model, meta = load_frozen(src, arch)
    spec = spec_from_meta(meta, str(src))
    doc = spec_document(spec, meta)
    sidecar = sidecar_of(out) if fmt == "state_dict" else None

    def publish(tmp: Path, dest: Path) -> None:
        if sidecar is not None:  # the sidecar first: a weights file never appears without its spec
            sidecar.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, dest)

    diff = write_verified(
        model,
        spec,
        out,
        lambda tmp: _write(fmt, model, spec, doc, tmp),
        lambda tmp: reload(fmt, tmp, doc),
        publish,
    )
    return ExportResult(out, spec, diff, sidecar)


def write_verified(
    model: nn.Module,
    spec: InputSpec,
    out: Path,
    write: Callable[[Path], None],
    load_back: Callable[[Path], Runner],
    publish: Callable[[Path, Path], None] = os.replace,
) -> float:
    """`write` the model to a temporary file beside `out`, `load_back` that file and `publish` it as
    `out` only if it gives the model's logits on the verification batch: the max |Δlogit|. On any
    failure the temporary file is removed and `out` is left as it was."""
    x = verification_batch(spec)
    with torch.no_grad():
        expected = model(x)
    tmp = _temp_beside(out)
    try:
        write(tmp)
        run = load_back(tmp)
        with torch.no_grad():
            diff = _check_close(run(x), expected)
        publish(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return diff


def _write(fmt: str, model: nn.Module, spec: InputSpec, doc: dict, path: Path) -> None:
    try:
        WRITERS[fmt](model, spec, doc, path)
    except DfkdError:
        raise
    except Exception as err:  # an operator the exporter cannot express, most often
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DfkdError(
            f"torch cannot write {doc.get('arch')} as {fmt} ({type(err).__name__}: {first}); "
            "try another --format"
        ) from None


def check_target(path: Path, overwrite: bool) -> None:
    """`path` may be written: not a directory, not an existing file unless `overwrite`, not below a file."""
    if path.is_dir():
        raise DfkdError(f"--out {str(path)!r} is a directory; name the file to write")
    if path.exists() and not overwrite:
        raise DfkdError(
            f"{str(path)!r} exists; pass --overwrite (overwrite=True) to replace it or choose another --out"
        )
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DfkdError(
            f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory; choose another --out"
        )


def _temp_beside(out: Path) -> Path:
    """A fresh file in out's folder (created if missing), so the final rename cannot cross file systems."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".tmp" + out.suffix)
    except OSError as err:
        raise DfkdError(
            f"cannot write to {str(out.parent)!r}: {err.strerror}; choose another --out"
        ) from None
    os.close(fd)
    return Path(name)


def _check_close(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        raise DfkdError(
            f"export verification failed: the reloaded model gives shape {tuple(got.shape)}, "
            f"the student {tuple(expected.shape)}; the file is removed"
        )
    diff = (got.double() - expected.double()).abs()
    bound = ATOL + RTOL * expected.double().abs()
    worst = float(diff.max())
    if not torch.isfinite(diff).all() or (diff > bound).any():
        raise DfkdError(
            f"export verification failed: max |Δlogit| = {worst:.3g} > "
            f"{ATOL:g} + {RTOL:g}·|logit|; the file is removed "
            "(try another --format)"
        )
    return worst
