"""The classifier zoo, registered by name: build(name, in_channels, num_classes, image_size).

`build_classifier` also takes `torchvision.<name>`, `timm.<name>` and the user's own code:
`path/to/file.py:ClassName` or `package.module:factory`, called with the kwargs it is given.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.registry import Registry

TORCHVISION_PREFIX = "torchvision."
TIMM_PREFIX = "timm."
FORMS = [
    TORCHVISION_PREFIX + "<name>",
    TIMM_PREFIX + "<name>",
    "path/to/file.py:ClassName",
    "package.module:factory",
]
CLASSIFIERS: Registry = Registry(
    "classifier",
    forms=f"{FORMS[0]} (any torchvision classification model), {FORMS[1]} (needs pip install 'dfkd[timm]'), "
    f"{FORMS[2]} or {FORMS[3]} (your own code, called with the kwargs)",
)


class LeNet5(nn.Module):
    """LeNet-5 on 32×32 inputs, as in DFAD; `width` scales every layer (0.5 gives LeNet-5-half)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0, batchnorm: bool = False):
        super().__init__()
        c1, c2, c3, f1 = (max(1, round(c * width)) for c in (6, 16, 120, 84))

        def conv(cin, cout):  # with BatchNorm: the same layer paths, the norm sits in the ReLU slot's stead
            return [nn.Conv2d(cin, cout, 5), nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True)) if batchnorm
                    else nn.ReLU(inplace=True)]  # fmt: skip

        self.features = nn.Sequential(
            *conv(in_channels, c1), nn.MaxPool2d(2),
            *conv(c1, c2), nn.MaxPool2d(2),
            *conv(c2, c3),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Linear(c3, f1), nn.ReLU(inplace=True), nn.Linear(f1, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _lenet(width: float, batchnorm: bool = False):
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        if image_size != 32:
            raise DfkdError(f"LeNet-5 takes 32×32 inputs, not {image_size}×{image_size}: "
                            "set data.image_size=32 (or input.size=32)")
        return LeNet5(in_channels, num_classes, width, batchnorm)

    return build


CLASSIFIERS.register("lenet5")(_lenet(1.0))
CLASSIFIERS.register("lenet5_half")(_lenet(0.5))
# LeNet-5 with BatchNorm after each convolution: a teacher for the BN-statistics prior (DFQ, DeepInversion).
CLASSIFIERS.register("lenet5_bn")(_lenet(1.0, batchnorm=True))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: 3×3 stem, no max-pool (the variant DFAD and CMI distil)."""

    def __init__(self, blocks: list[int], in_channels: int, num_classes: int, widths=(64, 128, 256, 512)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, (n, cout) in enumerate(zip(blocks, widths)):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


CLASSIFIERS.register("resnet18")(lambda c, k, s: CifarResNet([2, 2, 2, 2], c, k))
CLASSIFIERS.register("resnet34")(lambda c, k, s: CifarResNet([3, 4, 6, 3], c, k))
# He et al.'s CIFAR ResNet-8 widths (16, 32, 64): a small residual teacher that trains in a minute on a CPU.
CLASSIFIERS.register("resnet8")(lambda c, k, s: CifarResNet([1, 1, 1], c, k, widths=(16, 32, 64)))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for g, cout in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(cin, cout, 2 if (g > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


for _depth, _widen in [(16, 1), (16, 2), (40, 2)]:
    CLASSIFIERS.register(f"wrn{_depth}_{_widen}")(
        lambda c, k, s, d=_depth, w=_widen: WideResNet(d, w, c, k)
    )


@CLASSIFIERS.register("mlp")
def _mlp(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 256), nn.ReLU(inplace=True),
        nn.Linear(256, 256), nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )  # fmt: skip


def _torchvision_classifier(name: str, in_channels: int, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision.models as tvm

    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except ValueError:
        known = tvm.list_models(module=tvm)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DfkdError(f"unknown torchvision model {name!r}; {hint}known: {', '.join(known)}") from None
    except TypeError as err:  # a keyword the model does not take
        raise DfkdError(f"torchvision model {name!r} refuses kwargs {kwargs}: {error_line(err)}") from None
    if in_channels != 3:  # swap the first convolution for one that takes our channel count
        for parent in model.modules():
            for child_name, child in parent.named_children():
                if isinstance(child, nn.Conv2d):
                    setattr(parent, child_name, nn.Conv2d(
                        in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, child.groups, child.bias is not None,
                    ))  # fmt: skip
                    return model
    return model


def _timm_classifier(name: str, in_channels: int, num_classes: int, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise DfkdError(f"arch {TIMM_PREFIX}{name} needs timm: pip install 'dfkd[timm]'") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=1)
        hint = f"; did you mean {TIMM_PREFIX}{close[0]}?" if close else ""
        raise DfkdError(f"unknown timm model {name!r}{hint} (timm.list_models() lists them)")
    try:  # never pretrained: nothing is downloaded at run time
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                 **kwargs)  # fmt: skip
    except Exception as err:
        raise DfkdError(f"timm.create_model({name!r}, kwargs={kwargs}) failed: {error_line(err)}") from None


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
        raise DfkdError(f"arch {arch!r}: file {str(path)!r} does not exist "
                        f"(relative paths start at {Path.cwd()})")  # fmt: skip
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
        raise DfkdError(f"arch {arch!r}: cannot import {module_name!r} ({error_line(err)}); install it or "
                        "put its folder on PYTHONPATH, or write the arch as path/to/file.py:Name") from None
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
        raise DfkdError(f"arch {arch!r}: write user code as path/to/file.py:ClassName or "
                        "package.module:factory")  # fmt: skip
    if where.endswith(".py"):
        module = _import_file(Path(where).expanduser(), arch)
    else:
        module = _import_module(where, arch)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DfkdError(f"arch {arch!r}: {where} has no {attr!r}; it defines: {_defined_in(module)} "
                            f"(write the arch as {where}:<one of them>)")  # fmt: skip
        obj = getattr(obj, part)
    if not callable(obj):
        raise DfkdError(f"arch {arch!r}: {attr} is a {type(obj).__name__}, not a class or factory")
    return obj


def _user_classifier(arch: str, kwargs: dict) -> nn.Module:
    """Imports and runs the user's code: the user chose it by naming it as the arch."""
    factory = _user_factory(arch)
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise DfkdError(f"arch {arch!r}: calling it with kwargs {kwargs} failed: {error_line(err)}; "
                        "set teacher.kwargs / student.kwargs to what it takes") from None  # fmt: skip
    if not isinstance(model, nn.Module):
        raise DfkdError(f"arch {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def check_output(model: nn.Module, arch: str, in_channels: int, num_classes: int, image_size: int) -> None:
    """One forward of zeros in eval mode must give (2, num_classes); the train/eval mode is restored."""
    shape = (2, in_channels, image_size, image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as err:
        raise DfkdError(f"arch {arch!r} fails on inputs of shape {shape}: {error_line(err)}; it must take "
                        f"{in_channels}×{image_size}×{image_size} images") from None  # fmt: skip
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise DfkdError(f"arch {arch!r} gives {got} for inputs of shape {shape}; expected "
                        f"(2, {num_classes}): it must return one logit per class")  # fmt: skip


def build_classifier(
    name: str, in_channels: int, num_classes: int, image_size: int, kwargs: dict | None = None
) -> nn.Module:
    """A registered classifier, any torchvision classification model as `torchvision.<name>`, a timm
    model as `timm.<name>` (untrained), or the user's own code: `path/to/file.py:ClassName` (a file,
    relative to the working directory) or `package.module:factory` (an importable module).

    User code is imported and run, by the user's choice of arch: `Name(**kwargs)` must return an
    nn.Module. `kwargs` also go to torchvision's and timm's constructors. User and timm models are
    checked with one forward of zeros: (2, in_channels, image_size, image_size) must give
    (2, num_classes)."""
    kwargs = dict(kwargs or {})
    if name.startswith(TIMM_PREFIX):  # before user code: some timm names hold a colon (hf-hub:...)
        model = _timm_classifier(name[len(TIMM_PREFIX) :], in_channels, num_classes, kwargs)
    elif name.startswith(TORCHVISION_PREFIX):
        return _torchvision_classifier(name[len(TORCHVISION_PREFIX) :], in_channels, num_classes, kwargs)
    elif is_user_code(name):
        model = _user_classifier(name, kwargs)
    else:
        rest = name.partition(".")[2]  # `torchvison.resnet18` is close to `torchvision.resnet18`
        builder = CLASSIFIERS.get(name, also=[TORCHVISION_PREFIX + rest, TIMM_PREFIX + rest] if rest else [])
        if kwargs:
            raise DfkdError(f"classifier {name!r} takes no kwargs (got {kwargs}); kwargs are for "
                            "torchvision, timm and user models: remove them")  # fmt: skip
        return builder(in_channels, num_classes, image_size)
    check_output(model, name, in_channels, num_classes, image_size)
    return model


def classifier_names() -> list[str]:
    """Every name build_classifier takes: the registered ones, then the other forms."""
    return CLASSIFIERS.names() + FORMS
