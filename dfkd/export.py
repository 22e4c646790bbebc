"""A trained student out of dfkd: TorchScript, torch.export, ONNX or a plain state_dict, verified.

Every export carries the input spec (channels, size, classes, mean, std) the model expects, and is
reloaded with plain torch or onnxruntime and run on a fixed batch before it is kept: a file whose
logits differ from the student's beyond the tolerance is deleted, never left behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from dfkd.errors import DfkdError
from dfkd.spec import InputSpec

SUFFIXES = {"torchscript": ".ts", "exported": ".pt2", "onnx": ".onnx", "state_dict": ".weights.pt"}
FORMATS = tuple(SUFFIXES)
SPEC_KEY = "dfkd_spec.json"  # TorchScript / torch.export extra file, and ONNX metadata_props key
ATOL, RTOL = 1e-4, 1e-4  # |Δlogit| allowed: ATOL + RTOL·|logit|
VERIFY_BATCH, VERIFY_SEED = 16, 0
ONNX_OPSET = 17

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ExportResult:
    path: Path
    spec: InputSpec
    max_diff: float  # max |Δlogit| of the reloaded file against the student on the verification batch
    sidecar: Path | None = None  # state_dict: the JSON with the architecture and input spec


def spec_from_meta(meta: dict, where: str) -> InputSpec:
    missing = [k for k in ("in_channels", "image_size", "num_classes", "mean", "std") if k not in meta]
    if missing:
        raise DfkdError(f"{where}: its meta lacks {', '.join(missing)}; rewrite it with "
                        "`dfkd convert ... --mean M --std S` to record the input spec")  # fmt: skip
    return InputSpec(meta["in_channels"], meta["image_size"], meta["num_classes"], meta["mean"], meta["std"])


def student_path(source: str | Path) -> Path:
    """A student .pt, or the run directory holding student.pt."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "student.pt").is_file():
            raise DfkdError(f"run directory {str(path)!r} holds no student.pt (has the run finished?); "
                            "name a finished run or a student .pt file")  # fmt: skip
        return path / "student.pt"
    if not path.exists():
        raise DfkdError(f"{str(path)!r} not found; name a finished run directory or its student.pt")
    return path


def load_student(path: str | Path) -> tuple[nn.Module, InputSpec]:
    """A dfkd student checkpoint (or the run directory holding student.pt), in eval mode, with its spec."""
    model, meta = _load(student_path(path))
    return model, spec_from_meta(meta, str(student_path(path)))


def _load(path: Path) -> tuple[nn.Module, dict]:
    from dfkd.teachers import load_classifier

    model, meta = load_classifier(path)
    return model.eval().requires_grad_(False), meta


def spec_document(spec: InputSpec, meta: dict) -> dict:
    """What each export records about its input: enough to feed the model without dfkd."""
    doc = {"arch": meta.get("arch"), "channels": spec.channels, "size": spec.size,
           "num_classes": spec.num_classes, "mean": list(spec.mean), "std": list(spec.std),
           "input": "N x channels x size x size, float32, (pixel in [0, 1] - mean) / std per channel",
           "output": "N x num_classes logits"}  # fmt: skip
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
    source: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False
) -> Path:
    """Write the student at `source` (a run directory or student .pt) as `fmt`, verified; return the file."""
    return export_verified(source, fmt, out, overwrite=overwrite).path


def export_verified(
    source: str | Path, fmt: str, out: str | Path | None = None, *, overwrite: bool = False
) -> ExportResult:
    """export_student, also giving the spec and the max |Δlogit| of the reloaded file."""
    if fmt not in SUFFIXES:
        raise DfkdError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src = student_path(source)
    out = Path(out).expanduser() if out is not None else default_out(src, fmt)
    targets = [out, sidecar_of(out)] if fmt == "state_dict" else [out]
    for target in targets:
        _check_target(target, overwrite)
    if fmt == "onnx":
        _require_onnx()
    model, meta = _load(src)
    spec = spec_from_meta(meta, str(src))
    doc = spec_document(spec, meta)
    x = verification_batch(spec)
    with torch.no_grad():
        expected = model(x)
    tmp = _temp_beside(out)
    try:
        _write(fmt, model, spec, doc, tmp)
        got = reload(fmt, tmp, doc)(x)
        diff = _check_close(got, expected)
        sidecar = _publish(tmp, out, fmt, doc)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out, spec, diff, sidecar)


def _write(fmt: str, model: nn.Module, spec: InputSpec, doc: dict, path: Path) -> None:
    try:
        WRITERS[fmt](model, spec, doc, path)
    except DfkdError:
        raise
    except Exception as err:  # an operator the exporter cannot express, most often
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DfkdError(f"torch cannot write {doc.get('arch')} as {fmt} ({type(err).__name__}: {first}); "
                        "try another --format") from None  # fmt: skip


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise DfkdError(f"--out {str(path)!r} is a directory; name the file to write")
    if path.exists() and not overwrite:
        raise DfkdError(f"{str(path)!r} exists; pass --overwrite to replace it or choose another --out")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DfkdError(f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory; "
                        "choose another --out")  # fmt: skip


def _temp_beside(out: Path) -> Path:
    """A fresh file in out's folder (created if missing), so the final rename cannot cross file systems."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".tmp" + out.suffix)
    except OSError as err:
        raise DfkdError(f"cannot write to {str(out.parent)!r}: {err.strerror}; "
                        "choose another --out") from None  # fmt: skip
    os.close(fd)
    return Path(name)


def _publish(tmp: Path, out: Path, fmt: str, doc: dict) -> Path | None:
    sidecar = None
    if fmt == "state_dict":  # the sidecar first: a weights file never appears without its spec
        sidecar = sidecar_of(out)
        sidecar.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    return sidecar


def _check_close(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        raise DfkdError(f"export verification failed: the reloaded model gives shape {tuple(got.shape)}, "
                        f"the student {tuple(expected.shape)}; the file is removed")  # fmt: skip
    diff = (got.double() - expected.double()).abs()
    bound = ATOL + RTOL * expected.double().abs()
    worst = float(diff.max())
    if not torch.isfinite(diff).all() or (diff > bound).any():
        raise DfkdError(f"export verification failed: max |Δlogit| = {worst:.3g} > "
                        f"{ATOL:g} + {RTOL:g}·|logit|; the file is removed "
                        "(try another --format)")  # fmt: skip
    return worst


# --- writers: (model, spec, spec document, path) -----------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """torch warns that TorchScript and the TorchScript-based ONNX exporter are deprecated; both still
    write files that torch and onnxruntime load, and their output is verified here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _example(spec: InputSpec) -> torch.Tensor:
    return torch.zeros(2, *spec.shape)  # batch 2: a batch size of 1 would be baked in as a constant


def write_torchscript(model: nn.Module, spec: InputSpec, doc: dict, path: Path) -> None:
    with _quiet():
        traced = torch.jit.trace(model, _example(spec))
        torch.jit.save(traced, str(path), _extra_files={SPEC_KEY: json.dumps(doc)})


def write_exported(model: nn.Module, spec: InputSpec, doc: dict, path: Path) -> None:
    batch = getattr(torch.export.Dim, "AUTO", None) or torch.export.Dim("batch")
    program = torch.export.export(model, (_example(spec),), dynamic_shapes=({0: batch},))
    with open(path, "wb") as f:  # a file object: torch.export warns about paths not ending in .pt2
        torch.export.save(program, f, extra_files={SPEC_KEY: json.dumps(doc)})


def write_onnx(model: nn.Module, spec: InputSpec, doc: dict, path: Path) -> None:
    import onnx

    with _quiet():  # dynamo=False: the TorchScript-based exporter needs no onnxscript
        torch.onnx.export(model, (_example(spec),), str(path), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = SPEC_KEY, json.dumps(doc)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_state_dict(model: nn.Module, spec: InputSpec, doc: dict, path: Path) -> None:
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, str(path))


WRITERS = {"torchscript": write_torchscript, "exported": write_exported, "onnx": write_onnx,
           "state_dict": write_state_dict}  # fmt: skip


# --- reloading, as a user without dfkd would (state_dict aside: it needs the architecture) ------------


def reload(fmt: str, path: Path, doc: dict) -> Runner:
    """The written file, loaded back from disk as a function of a batch of inputs."""
    return RELOADERS[fmt](path, doc)


def _reload_torchscript(path: Path, doc: dict) -> Runner:
    with _quiet():
        module = torch.jit.load(str(path), map_location="cpu")
    return _no_grad(module.eval())


def _reload_exported(path: Path, doc: dict) -> Runner:
    with open(path, "rb") as f:
        return _no_grad(torch.export.load(f).module())


def _reload_onnx(path: Path, doc: dict) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


def _reload_state_dict(path: Path, doc: dict) -> Runner:
    from dfkd.models import build_classifier

    model = build_classifier(doc["arch"], doc["channels"], doc["num_classes"], doc["size"])
    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    return _no_grad(model.eval())


def _no_grad(fn: Callable) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(x)

    return run


RELOADERS = {"torchscript": _reload_torchscript, "exported": _reload_exported, "onnx": _reload_onnx,
             "state_dict": _reload_state_dict}  # fmt: skip


def _require_onnx() -> None:
    import importlib.util

    for name in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(name) is None:
            raise DfkdError(f"--format onnx needs the {name} package; pip install 'dfkd[onnx]'")


# --- convert: a teacher from elsewhere into a dfkd checkpoint -----------------------------------------


def archive_kind(path: Path) -> str | None:
    """'torchscript' or 'exported' for those zip archives, else None (a torch.save file or something else)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    parts = [n.split("/", 1)[-1] for n in names]
    if any(p.startswith("code/") or p == "constants.pkl" for p in parts):
        return "torchscript"
    if any(p in ("archive_format", "models/model.json") or p.startswith("serialized_") for p in parts):
        return "exported"
    return None


def _dfkd_meta(path: Path) -> dict | None:
    """The meta of a dfkd checkpoint, None for a plain state_dict."""
    from dfkd.checkpoint import load_safe

    ckpt = load_safe(path)
    return ckpt["meta"] if isinstance(ckpt, dict) and isinstance(ckpt.get("meta"), dict) else None


def conversion_spec(
    meta: dict | None, shape: tuple, mean: Sequence[float], std: Sequence[float]
) -> InputSpec:
    """The spec from --channels/--size/--classes (a dfkd checkpoint's meta fills those not given) and
    --mean/--std (one value stands for every channel)."""
    known = meta or {}
    values = {}
    flags = {"--channels": "in_channels", "--size": "image_size", "--classes": "num_classes"}
    for (flag, key), given in zip(flags.items(), shape):
        if given is not None and key in known and known[key] != given:
            raise DfkdError(f"{flag} {given} disagrees with the checkpoint's {key}={known[key]}; "
                            f"drop {flag} or fix it")  # fmt: skip
        value = given if given is not None else known.get(key)
        if value is None:
            raise DfkdError(f"a plain state_dict records no input shape; give {flag}")
        if value <= 0:
            raise DfkdError(f"{flag} must be positive, got {value}")
        values[key] = value
    channels = values["in_channels"]
    per_channel = {}
    for flag, numbers in (("--mean", mean), ("--std", std)):
        if len(numbers) not in (1, channels):
            raise DfkdError(f"{flag} has {len(numbers)} values for {channels} channel(s); "
                            "give one per channel")  # fmt: skip
        per_channel[flag] = list(numbers) * channels if len(numbers) == 1 else list(numbers)
    if any(s <= 0 for s in per_channel["--std"]):
        raise DfkdError(f"--std must be positive, got {' '.join(map(str, std))}")
    return InputSpec(channels, values["image_size"], values["num_classes"], per_channel["--mean"],
                     per_channel["--std"])  # fmt: skip


def convert_to_checkpoint(
    src: str | Path, out: str | Path, arch: str, shape: tuple = (None, None, None),
    mean: Sequence[float] = (), std: Sequence[float] = (), overwrite: bool = False,
) -> tuple[InputSpec, float]:
    """Store a plain state_dict (or a dfkd checkpoint) of `arch` as a dfkd checkpoint whose meta records
    the input spec; verified by reloading. Returns the spec and the max |Δlogit|."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_file():
        raise DfkdError(f"{str(src)!r} not found; name the state_dict file to convert")
    _check_target(out, overwrite)
    kind = archive_kind(src)
    if kind is not None:
        what = "a TorchScript archive" if kind == "torchscript" else "a torch.export program"
        raise DfkdError(f"{str(src)!r} is {what} (a graph, not weights of a dfkd architecture) and cannot "
                        "be stored as a dfkd state_dict checkpoint; use it directly: "
                        f"teacher.checkpoint={src}")  # fmt: skip
    if not mean or not std:
        raise DfkdError("dfkd convert needs --mean and --std: the normalization the model was trained with")
    meta = _dfkd_meta(src)
    if meta is not None and meta.get("arch") not in (None, arch):
        raise DfkdError(f"--arch {arch} disagrees with the checkpoint's arch {meta['arch']}; "
                        f"give --arch {meta['arch']}")  # fmt: skip
    spec = conversion_spec(meta, shape, list(mean), list(std))
    model = _load_for_conversion(src, arch, spec)
    new_meta = {**(meta or {}), "arch": arch, **spec.as_meta(), "converted_from": str(src)}
    return spec, _save_verified(model, new_meta, spec, out)


def _load_for_conversion(src: Path, arch: str, spec: InputSpec) -> nn.Module:
    import inspect

    from dfkd.teachers import load_classifier

    if "arch" in inspect.signature(load_classifier).parameters:
        model, _ = load_classifier(src, arch=arch, shape=(spec.channels, spec.size, spec.num_classes))
    elif _dfkd_meta(src) is not None:
        model, _ = load_classifier(src)
    else:
        raise DfkdError(f"{str(src)!r} is a plain state_dict, and this dfkd's load_classifier reads only "
                        "dfkd checkpoints; update dfkd to convert it")  # fmt: skip
    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        raise DfkdError(f"{str(src)!r} holds a graph, not weights: use it directly as "
                        f"teacher.checkpoint={src}")  # fmt: skip
    return model.eval().requires_grad_(False)


def _save_verified(model: nn.Module, meta: dict, spec: InputSpec, out: Path) -> float:
    from dfkd.teachers import save_classifier

    x = verification_batch(spec)
    with torch.no_grad():
        expected = model(x)
    tmp = _temp_beside(out)
    try:
        save_classifier(tmp, model, meta)
        reloaded, _ = _load(tmp)
        with torch.no_grad():
            diff = _check_close(reloaded(x), expected)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return diff
