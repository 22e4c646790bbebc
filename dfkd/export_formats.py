"""Each export format's writer and its reloader (plain torch or onnxruntime, never dfkd): what
dfkd.export runs to write a student and to verify the written file."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from dfkd.errors import DfkdError
from dfkd.spec import InputSpec

SPEC_KEY = "dfkd_spec.json"  # TorchScript / torch.export extra file, and ONNX metadata_props key
ONNX_OPSET = 17

Runner = Callable[[torch.Tensor], torch.Tensor]


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
        torch.onnx.export(
            model,
            (_example(spec),),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = SPEC_KEY, json.dumps(doc)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_state_dict(model: nn.Module, spec: InputSpec, doc: dict, path: Path) -> None:
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, str(path))


WRITERS = {
    "torchscript": write_torchscript,
    "exported": write_exported,
    "onnx": write_onnx,
    "state_dict": write_state_dict,
}


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

    model = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = model.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(model.run(None, {name: x.numpy()})[0])

    return run


def _reload_state_dict(path: Path, doc: dict) -> Runner:
    from dfkd.models import build_classifier

    model = build_classifier(doc["arch"], doc["channels"], doc["num_classes"], doc["size"], doc.get("kwargs"))
    model.load_state_dict(torch.load(str(path), map_location="cpu", weights_only=True))
    return _no_grad(model.eval())


def _no_grad(fn: Callable) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(x)

    return run


RELOADERS = {
    "torchscript": _reload_torchscript,
    "exported": _reload_exported,
    "onnx": _reload_onnx,
    "state_dict": _reload_state_dict,
}


def require_onnx() -> None:
    import importlib.util

    for name in ("onnx", "onnxruntime"):
        if importlib.util.find_spec(name) is None:
            raise DfkdError(f"--format onnx needs the {name} package; pip install 'dfkd[onnx]'")
