"""`dfkd convert`: a plain state_dict (or a dfkd checkpoint without its input spec) of a dfkd
architecture, stored as a dfkd checkpoint whose meta records the input spec, verified by reloading.

TorchScript archives and torch.export programs are refused: they are graphs, not weights, and are
used as teachers directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from dfkd.checkpoint import load_safe
from dfkd.classifier_files import freeze, load_classifier
from dfkd.errors import DfkdError
from dfkd.export import check_target, load_frozen, write_verified
from dfkd.graph_files import archive_kind
from dfkd.spec import InputSpec
from dfkd.teachers import save_classifier


def convert_to_checkpoint(
    src: str | Path,
    out: str | Path,
    arch: str,
    shape: tuple = (None, None, None),
    mean: Sequence[float] = (),
    std: Sequence[float] = (),
    overwrite: bool = False,
) -> tuple[InputSpec, float]:
    """Store a plain state_dict (or a dfkd checkpoint) of `arch` as a dfkd checkpoint whose meta records
    the input spec; verified by reloading. Returns the spec and the max |Δlogit|."""
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_file():
        raise DfkdError(f"{str(src)!r} not found; name the state_dict file to convert")
    check_target(out, overwrite)
    kind = archive_kind(src)
    if kind != "torch":
        what = "a TorchScript archive" if kind == "torchscript" else "a torch.export program"
        raise DfkdError(
            f"{str(src)!r} is {what} (a graph, not weights of a dfkd architecture) and cannot "
            "be stored as a dfkd state_dict checkpoint; use it directly: "
            f"teacher.checkpoint={src}"
        )
    if not mean or not std:
        raise DfkdError("dfkd convert needs --mean and --std: the normalization the model was trained with")
    meta = _dfkd_meta(src)
    if meta is not None and meta.get("arch") not in (None, arch):
        raise DfkdError(
            f"--arch {arch} disagrees with the checkpoint's arch {meta['arch']}; give --arch {meta['arch']}"
        )
    spec = conversion_spec(meta, shape, list(mean), list(std))
    model = _load_for_conversion(src, arch, spec)
    new_meta = {**(meta or {}), "arch": arch, **spec.as_meta(), "converted_from": str(src)}
    return spec, _save_verified(model, new_meta, spec, out)


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
            raise DfkdError(
                f"{flag} {given} disagrees with the checkpoint's {key}={known[key]}; drop {flag} or fix it"
            )
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
            raise DfkdError(
                f"{flag} has {len(numbers)} values for {channels} channel(s); give one per channel"
            )
        per_channel[flag] = list(numbers) * channels if len(numbers) == 1 else list(numbers)
    if any(s <= 0 for s in per_channel["--std"]):
        raise DfkdError(f"--std must be positive, got {' '.join(map(str, std))}")
    return InputSpec(
        channels, values["image_size"], values["num_classes"], per_channel["--mean"], per_channel["--std"]
    )


def _dfkd_meta(path: Path) -> dict | None:
    """The meta of a dfkd checkpoint, None for a plain state_dict."""
    ckpt = load_safe(path)
    return ckpt["meta"] if isinstance(ckpt, dict) and isinstance(ckpt.get("meta"), dict) else None


def _load_for_conversion(src: Path, arch: str, spec: InputSpec) -> nn.Module:
    model, _ = load_classifier(src, arch=arch, shape=(spec.channels, spec.size, spec.num_classes))
    if isinstance(model, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        raise DfkdError(
            f"{str(src)!r} holds a graph, not weights: use it directly as teacher.checkpoint={src}"
        )
    return freeze(model)


def _save_verified(model: nn.Module, meta: dict, spec: InputSpec, out: Path) -> float:
    return write_verified(
        model, spec, out, lambda tmp: save_classifier(tmp, model, meta), lambda tmp: load_frozen(tmp)[0]
    )
