"""Classifier files (teachers, students) read into a model and its meta, whatever their format.

`load_classifier` recognises a file by its content, not its name:

- dfkd's own checkpoint (what `save_classifier` writes, for teachers and distilled students alike):
  a `torch.save`d dict `{"state_dict": {name: tensor}, "meta": {...}}` whose meta holds
    arch         str          the network, as build_classifier names it (registered,
                              `torchvision.<name>`, `timm.<name>`, `path/to/file.py:ClassName`
                              or `package.module:factory`)
    num_classes  int          the logits it gives
    in_channels  int          the channels of its input images
    image_size   int          the height (= width) of its input images
    mean, std    list[float]  per channel, of pixel values in [0, 1]: inputs are (pixels - mean) / std
    dataset      str          what it was trained on (optional)
    test_acc     float        its test accuracy in percent (optional)
    kwargs       dict         for a user's class or factory (optional; else the caller's kwargs)
  and any other keys (recipe, train_s, teacher_acc, distilled, ...), kept as they are. arch,
  num_classes, in_channels and image_size rebuild the network: a meta without one is an error.
- a plain state_dict (a dict of tensors, or the one such dict under `state_dict`, `model` or
  `model_state_dict` of a dict without `meta`; a DDP `module.` or torch.compile `_orig_mod.`
  prefix is stripped): the weights of `arch`, rebuilt for `shape` = (channels, size, num_classes).
- a TorchScript archive (`torch.jit.save`): `torch.jit.load`, used as it is. Its code is
  TorchScript, run by TorchScript's interpreter, not Python. A run turns one with BatchNorm layers
  into a graph whose BatchNorm calls are modules (dfkd.graph_files.torchscript_as_graph).
- a torch.export program (`torch.export.save`, usually .pt2): `torch.export.load(path).module()`,
  its BatchNorm calls made modules (dfkd.graph_files.with_batchnorm_modules).
  Export the model in eval mode, with a dynamic batch dimension. Its pickled entries must hold
  plain tensors and it must hold no compiled code (AOTInductor), unless trust_pickle is set.
- a whole pickled module (`torch.save(model)`): unpickling it runs code from the file, so it is
  refused unless trust_pickle is set. A pickle that calls code (`os.system`, `eval`, ...) is
  always refused, and never run.

TorchScript, exported and pickled teachers are run once on zeros of `shape` (`check_runs`).
The meta of a file in a format other than dfkd's: `arch` ("torchscript", "exported", the pickled
class or the given arch of a state_dict), `format` ("state_dict", "torchscript", "exported",
"pickle"; dfkd's own checkpoints get "dfkd"), `path`, and `num_classes`, `in_channels`,
`image_size` where `shape` gives them. No mean and std: whoever loads such a teacher must be
told its normalization.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dfkd.checkpoint import PickleRefused, load_safe
from dfkd.errors import DfkdError
from dfkd.graph_files import archive_kind, load_exported, load_torchscript
from dfkd.models import build_classifier
from dfkd.user_code import error_line, is_user_code

# (channels, size, num_classes); None where unknown: a loaded model may tell its classes itself.
Shape = tuple[int | None, int | None, int | None]
DFKD_META_KEYS = ("arch", "num_classes", "in_channels", "image_size")
NESTED_KEYS = ("state_dict", "model", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's
STATE_DICT_FIX = "set teacher.arch to the network these weights belong to"


def load_classifier(
    path: str | Path,
    arch: str | None = None,
    kwargs: dict | None = None,
    shape: Shape | None = None,
    trust_pickle: bool = False,
) -> tuple[nn.Module, dict]:
    """A classifier from a file of any format the module docstring lists, and its meta.

    `arch` and `kwargs` rebuild a plain state_dict's network for `shape` = (channels, size,
    num_classes); `shape` also checks a TorchScript, exported or pickled model with one forward.
    `trust_pickle` also loads a whole pickled module: unpickling it runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"checkpoint {str(path)!r} not found")
    kind = archive_kind(path)
    if kind == "torchscript":
        return _self_contained(load_torchscript(path), "torchscript", kind, path, shape)
    if kind == "exported":
        return _self_contained(load_exported(path, trust_pickle), "exported", kind, path, shape)
    try:
        obj = load_safe(path)
    except PickleRefused as refused:
        obj = _load_trusted(path, refused, trust_pickle)
    if isinstance(obj, nn.Module):
        return _self_contained(obj, f"{type(obj).__module__}.{type(obj).__qualname__}", "pickle", path, shape)
    if isinstance(obj, dict) and "state_dict" in obj and "meta" in obj:
        return _from_dfkd(obj, path, kwargs, arch)
    state = _state_dict_in(obj)
    if state is None:
        raise DfkdError(
            f"checkpoint {str(path)!r} holds a {type(obj).__name__} that is neither a dfkd "
            "checkpoint nor a state_dict (a dict of tensors); save model.state_dict() instead"
        )
    return _from_state_dict(state, path, arch, kwargs, shape)


def _load_trusted(path: Path, refused: PickleRefused, trust_pickle: bool) -> Any:
    """A pickle weights_only refused: loaded with weights_only=False if the user trusts it, else an error.
    A pickle that calls code is refused either way."""
    where = f"checkpoint {str(path)!r}"
    if refused.kind == "code":
        unless = "; teacher.trust_pickle does not load it either" if trust_pickle else ""
        raise DfkdError(f"{refused}{unless}: ask its source for the weights as a plain state_dict") from None
    if not trust_pickle:
        if refused.kind == "object":
            what, instead = f"a whole pickled module ({refused.name})", "model.state_dict()"
        else:
            what, instead = f"pickled objects beyond plain weights ({refused.name})", "the state_dict alone"
        raise DfkdError(
            f"{where} holds {what}; loading it runs code from the file: set "
            f"teacher.trust_pickle=true if you trust its source, or save {instead} instead"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise DfkdError(f"{where} does not load: {error_line(err)}") from None
    warnings.warn(
        f"{where} was loaded with teacher.trust_pickle: unpickling it ran code from the file", stacklevel=3
    )
    if refused.kind == "object" and not isinstance(obj, nn.Module):
        raise DfkdError(f"{where} holds a pickled {type(obj).__name__}, not a torch.nn.Module; save a model")
    return obj


def _self_contained(
    model: nn.Module, arch: str, fmt: str, path: Path, shape: Shape | None
) -> tuple[nn.Module, dict]:
    """A TorchScript, exported or pickled model and its meta; run once on `shape` when its input is known."""
    meta = {"arch": arch, "format": fmt, "path": str(path)}
    channels, size, num_classes = shape or (None, None, None)
    if channels is not None and size is not None:
        num_classes = check_runs(model, (channels, size, num_classes), repr(str(path)))
        meta.update(num_classes=num_classes, in_channels=channels, image_size=size)
    return model, meta


def _run_zeros(model: nn.Module, batch: int, channels: int, size: int) -> Any:
    with torch.no_grad():
        return model(torch.zeros(batch, channels, size, size))


def check_runs(model: nn.Module, shape: Shape, source: str) -> int:
    """Run `model` once (no grad, eval mode, then its mode restored) on zeros of (2, channels, size,
    size): it must give (2, num_classes), and take a batch of 3 too. The classes it gives, which
    num_classes=None accepts whatever they are."""
    channels, size, num_classes = shape
    was_training = model.training
    model.eval()
    try:
        try:
            out = _run_zeros(model, 2, channels, size)
        except Exception as err:
            raise DfkdError(
                f"teacher {source} does not take {channels}×{size}×{size} inputs: "
                f"{error_line(err)}; set input.channels / input.size to what it takes"
            ) from None
        _check_logits(out, shape, source)
        try:
            _run_zeros(model, 3, channels, size)
        except Exception as err:
            raise DfkdError(
                f"teacher {source} takes a batch of 2 images but not of 3 ({error_line(err)}); "
                "export it with a dynamic batch: dynamic_shapes=({0: torch.export.Dim('batch')},)"
            ) from None
    finally:
        model.train(was_training)
    return int(out.shape[1])


def _check_logits(out: Any, shape: Shape, source: str) -> None:
    channels, size, num_classes = shape
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        want = f"(2, {num_classes})" if num_classes is not None else "(2, classes)"
        raise DfkdError(
            f"teacher {source} gives {got} for 2 images of {channels}×{size}×{size}; a teacher "
            f"must give logits of shape {want}"
        )
    if num_classes is not None and out.shape[1] != num_classes:
        raise DfkdError(
            f"teacher {source} gives {out.shape[1]} classes, input.num_classes says "
            f"{num_classes}; set input.num_classes={out.shape[1]} or use a teacher of "
            f"{num_classes} classes"
        )


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _state_dict_in(obj: Any) -> dict | None:
    """A dict of tensors, or the one such dict under `state_dict`, `model` or `model_state_dict`."""
    if _is_tensor_dict(obj):
        return obj
    if isinstance(obj, dict) and "meta" not in obj:
        nested = [obj[key] for key in NESTED_KEYS if _is_tensor_dict(obj.get(key))]
        if len(nested) == 1:
            return nested[0]
    return None


def strip_wrapper_prefix(state: dict) -> dict:
    """The keys without the `module.` (DDP) or `_orig_mod.` (torch.compile) that every key starts with."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state, changed = {k[len(prefix) :]: v for k, v in state.items()}, True
    return state


def fit_weights(model: nn.Module, state: dict, arch: str, what: str, fix: str) -> None:
    """load_state_dict, with a one-line error that counts and names the keys that do not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    found = (("missing", missing), ("unexpected", unexpected), ("of other shapes", resized))
    wrong = [(label, keys) for label, keys in found if keys]
    if wrong:
        parts = "; ".join(
            f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
            for label, keys in wrong
        )
        raise DfkdError(f"{what} does not fit its architecture {arch}: keys {parts}; {fix}")
    model.load_state_dict(state)


def _from_dfkd(ckpt: dict, path: Path, kwargs: dict | None, arch: str | None) -> tuple[nn.Module, dict]:
    where = f"checkpoint {str(path)!r}"
    meta = ckpt["meta"]
    if not isinstance(meta, dict):
        raise DfkdError(
            f"{where} has a meta that is a {type(meta).__name__}, not a dict; "
            "save it with dfkd.teachers.save_classifier"
        )
    missing = [key for key in DFKD_META_KEYS if key not in meta]
    if missing:
        raise DfkdError(
            f"{where} has a meta without {', '.join(missing)} (a dfkd checkpoint's meta needs "
            f"{', '.join(DFKD_META_KEYS)}): add them, or save the bare state_dict and set "
            "teacher.arch"
        )
    if is_user_code(meta["arch"]) and arch != meta["arch"]:
        # a file's meta never chooses code to run: the user names it, or nothing runs
        raise DfkdError(
            f"{where} is a network of user code ({meta['arch']}); dfkd imports and runs code only when "
            f"you name it: set teacher.arch (or arch=) to {meta['arch']!r}"
        )
    size = meta["image_size"]
    try:
        model = build_classifier(
            meta["arch"], meta["in_channels"], meta["num_classes"], size, meta.get("kwargs", kwargs)
        )
    except DfkdError as err:
        raise DfkdError(
            f"{where}: its meta (arch {meta['arch']}, image_size {size}) fits no network: {err}"
        ) from None
    fit_weights(
        model,
        strip_wrapper_prefix(ckpt["state_dict"]),
        meta["arch"],
        where,
        "its meta's arch must name the network these weights belong to",
    )
    return model, {**meta, "format": "dfkd"}


def _from_state_dict(
    state: dict, path: Path, arch: str | None, kwargs: dict | None, shape: Shape | None
) -> tuple[nn.Module, dict]:
    where = f"checkpoint {str(path)!r}"
    if not arch:
        raise DfkdError(f"{where} holds a plain state_dict: {STATE_DICT_FIX}")
    channels, size, num_classes = shape or (None, None, None)
    unknown = [
        key
        for key, value in (
            ("input.channels", channels),
            ("input.size", size),
            ("input.num_classes", num_classes),
        )
        if value is None
    ]
    if unknown:
        raise DfkdError(
            f"{where} holds a plain state_dict of {arch}, which does not record its input and "
            f"classes: set {', '.join(unknown)}"
        )
    model = build_classifier(arch, channels, num_classes, size, kwargs)
    fit_weights(model, strip_wrapper_prefix(state), arch, where, STATE_DICT_FIX)
    meta = {"arch": arch, "format": "state_dict", "path": str(path)}
    return model, {**meta, "num_classes": num_classes, "in_channels": channels, "image_size": size}


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients, once for the whole run (ScriptModules included, which
    have no requires_grad_); gradients still flow through the model into its inputs."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
