"""Classifier files that hold a graph rather than weights for an architecture: TorchScript archives
and torch.export programs, told apart by their entries, checked before loading and loaded."""

from __future__ import annotations

import io
import json
import logging
import warnings
import zipfile
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.features import device_of
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
    """An exported program's module (or a TorchScript graph turned into one) as a teacher, its
    BatchNorm calls as BatchNorm modules (`with_batchnorm_modules`). Its train/eval behaviour was
    fixed at export and the exported module refuses train() and eval(), so they set only this
    wrapper's flag."""

    def __init__(self, program: nn.Module):
        super().__init__()
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def train(self, mode: bool = True) -> ExportedTeacher:
        self.training = mode
        return self


class GraphBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A graph's batch_norm call as a BatchNorm module, so that whatever reads a teacher's BatchNorm
    layers (the `bn` priors, the recipe, `dfkd layers`) finds it. It normalizes with its running
    statistics in either mode, as the saved graph does, and takes an input of any rank."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


_BATCHNORM_ARGS = ("weight", "bias", "running_mean", "running_var")  # aten.batch_norm's args 1-4


def _batchnorm_owner(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    """The module that holds a batch_norm call's own weight, bias and running statistics under those
    names, and nothing more; None for a call this rewrite leaves alone (batch statistics, or
    tensors shared, computed or named otherwise)."""
    if len(node.args) < 8:  # given by keyword: not how torch.export and the converter write it
        return None
    named = {name: arg for name, arg in zip(_BATCHNORM_ARGS, node.args[1:5]) if arg is not None}
    training = node.args[5]
    if (
        training
        or not {"running_mean", "running_var"} <= named.keys()
        or ("weight" in named) != ("bias" in named)
    ):
        return None
    paths = set()
    for name, arg in named.items():
        if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and len(arg.users) == 1):
            return None
        path, _, attr = arg.target.rpartition(".")
        if attr != name:
            return None
        paths.add(path)
    if len(paths) != 1 or "" in paths:
        return None
    owner = gm.get_submodule(paths.pop())
    held = {**dict(owner.named_parameters(recurse=False)), **dict(owner.named_buffers(recurse=False))}
    alone = not list(owner.children()) and held.keys() <= {*_BATCHNORM_ARGS, "num_batches_tracked"}
    return owner if alone else None


def with_batchnorm_modules(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with each eval-mode aten.batch_norm call on its own weights made a call to a
    GraphBatchNorm module at the path that held them (stem.1, layers.0.bn1: the original model's
    layer paths). The same computation; forward hooks on those layers then see their inputs."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        owner = _batchnorm_owner(gm, node)
        if owner is None:
            continue
        x, weight, _, mean, *_ = node.args
        momentum, eps = node.args[6], node.args[7]
        layer = GraphBatchNorm(owner.running_mean.numel(), eps, momentum, affine=weight is not None).eval()
        layer.running_mean, layer.running_var = owner.running_mean, owner.running_var
        if weight is not None:
            layer.weight, layer.bias = (
                t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
                for t in (owner.weight, owner.bias)
            )
        path = mean.target.rpartition(".")[0]
        gm.add_submodule(path, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (x,))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for arg in node.args[1:5]:
            if arg is not None:
                gm.graph.erase_node(arg)
    gm.recompile()
    return gm


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
    return ExportedTeacher(with_batchnorm_modules(program.module()))


def _has_batchnorm(model: torch.jit.ScriptModule) -> bool:
    return any("BatchNorm" in getattr(m, "original_name", "") for m in model.modules())


def torchscript_as_graph(model: nn.Module, channels: int, size: int) -> nn.Module:
    """A TorchScript model with BatchNorm layers as an ExportedTeacher whose BatchNorm calls are
    modules (with_batchnorm_modules). TorchScript runs its layers inside one graph, where no forward
    hook reaches them, so the `bn` priors and the recipe would not see them. The graph gives the
    same logits, checked on a random batch of 3; any other model, and one the converter cannot
    take, stays as it is (the latter with a warning that says what is lost)."""
    if not isinstance(model, torch.jit.ScriptModule) or not _has_batchnorm(model):
        return model
    device = device_of(model)
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    try:
        from torch._export.converter import TS2EPConverter

        torch_log.setLevel(logging.ERROR)  # the converter logs each shape it specializes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample = (torch.zeros(2, channels, size, size, device=device),)
            graph = ExportedTeacher(with_batchnorm_modules(TS2EPConverter(model, sample).convert().module()))
        probe = torch.randn(3, channels, size, size, device=device)
        with torch.no_grad():
            same = torch.allclose(graph(probe), model(probe), rtol=1e-4, atol=1e-5)
        reason = "its graph gives other logits" if not same else None
    except Exception as err:  # the converter takes most traced and scripted CNNs, not every graph
        reason = error_line(err)
    finally:
        torch_log.setLevel(level)
    if reason is None:
        return graph
    warnings.warn(
        f"the TorchScript teacher's BatchNorm layers cannot be read ({reason}): the `bn` priors "
        "cannot use them, and the recipe plays the game for teachers without BatchNorm; save the "
        "teacher as a state_dict or with torch.export to have them read",
        stacklevel=2,
    )
    return model
