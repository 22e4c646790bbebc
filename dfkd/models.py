"""The classifier zoo, registered by name: build(name, in_channels, num_classes, image_size)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.registry import Registry

CLASSIFIERS: Registry = Registry("classifier")
TORCHVISION_PREFIX = "torchvision."


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
            raise DfkdError(f"LeNet-5 takes 32×32 inputs; set data.image_size=32 (got {image_size})")
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


def _torchvision_classifier(name: str, in_channels: int, num_classes: int) -> nn.Module:
    import torchvision.models as tvm

    try:
        model = tvm.get_model(name, weights=None, num_classes=num_classes)
    except ValueError:
        known = ", ".join(tvm.list_models(module=tvm))
        raise DfkdError(f"unknown torchvision model {name!r}; known: {known}") from None
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


def build_classifier(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A registered classifier, or any torchvision classification model as `torchvision.<name>`."""
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_classifier(name[len(TORCHVISION_PREFIX) :], in_channels, num_classes)
    return CLASSIFIERS.get(name)(in_channels, num_classes, image_size)


def classifier_names() -> list[str]:
    return CLASSIFIERS.names() + [TORCHVISION_PREFIX + "<any torchvision classification model>"]
