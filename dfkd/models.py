"""The classifier zoo, registered by name: build(name, in_channels, num_classes, image_size).

`build_classifier` also takes `torchvision.<name>`, `timm.<name>` and the user's own code:
`path/to/file.py:ClassName` or `package.module:factory`, called with the kwargs it is given.
"""

from __future__ import annotations

import difflib

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.registry import Registry
from dfkd.user_code import error_line, is_user_code, user_classifier

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

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0, batchnorm: bool = False
    ):
        super().__init__()
        c1, c2, c3, f1 = (max(1, round(c * width)) for c in (6, 16, 120, 84))

        def conv(cin, cout):  # with BatchNorm: the same layer paths, the norm sits in the ReLU slot's stead
            return [
                nn.Conv2d(cin, cout, 5),
                nn.Sequential(nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
                if batchnorm
                else nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *conv(in_channels, c1),
            nn.MaxPool2d(2),
            *conv(c1, c2),
            nn.MaxPool2d(2),
            *conv(c2, c3),
        )
        self.classifier = nn.Sequential(nn.Linear(c3, f1), nn.ReLU(inplace=True), nn.Linear(f1, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _lenet(width: float, batchnorm: bool = False):
    def build(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
        if image_size != 32:
            raise DfkdError(f"LeNet-5 takes 32×32 inputs, not {image_size}×{image_size}")
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
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
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
    CLASSIFIERS.register(f"wrn{_depth}_{_widen}")(lambda c, k, s, d=_depth, w=_widen: WideResNet(d, w, c, k))


@CLASSIFIERS.register("mlp")
def _mlp(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )


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
                    setattr(
                        parent,
                        child_name,
                        nn.Conv2d(
                            in_channels,
                            child.out_channels,
                            child.kernel_size,
                            child.stride,
                            child.padding,
                            child.dilation,
                            child.groups,
                            child.bias is not None,
                        ),
                    )
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
        return timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except Exception as err:
        raise DfkdError(f"timm.create_model({name!r}, kwargs={kwargs}) failed: {error_line(err)}") from None


def check_output(model: nn.Module, arch: str, in_channels: int, num_classes: int, image_size: int) -> None:
    """One forward of zeros in eval mode must give (2, num_classes); the train/eval mode is restored."""
    shape = (2, in_channels, image_size, image_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape))
    except Exception as err:
        raise DfkdError(
            f"arch {arch!r} fails on inputs of shape {shape}: {error_line(err)}; it must take "
            f"{in_channels}×{image_size}×{image_size} images"
        ) from None
    finally:
        model.train(was_training)
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != (2, num_classes):
        raise DfkdError(
            f"arch {arch!r} gives {got} for inputs of shape {shape}; expected "
            f"(2, {num_classes}): it must return one logit per class"
        )


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
        model = user_classifier(name, kwargs)
    else:
        rest = name.partition(".")[2]  # `torchvison.resnet18` is close to `torchvision.resnet18`
        builder = CLASSIFIERS.get(name, also=[TORCHVISION_PREFIX + rest, TIMM_PREFIX + rest] if rest else [])
        if kwargs:
            raise DfkdError(
                f"classifier {name!r} takes no kwargs (got {kwargs}); kwargs are for "
                "torchvision, timm and user models: remove them"
            )
        return builder(in_channels, num_classes, image_size)
    check_output(model, name, in_channels, num_classes, image_size)
    return model


def classifier_names() -> list[str]:
    """Every name build_classifier takes: the registered ones, then the other forms."""
    return CLASSIFIERS.names() + FORMS
