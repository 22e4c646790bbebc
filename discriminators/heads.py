"""Discriminators: one real/fake logit per example, teacher views being real, student views fake."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from discriminators.registry import DISCRIMINATORS


def _maybe_sn(layer: nn.Module, spectral_norm: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer


@DISCRIMINATORS.register("mlp")
class OutputMLP(nn.Module):
    """Over class probabilities (N×K): two hidden layers with leaky ReLU."""

    reads = "outputs"

    def __init__(self, num_classes: int, width: int = 128, spectral_norm: bool = False):
        super().__init__()
        sn = functools.partial(_maybe_sn, spectral_norm=spectral_norm)
        self.net = nn.Sequential(
            sn(nn.Linear(num_classes, width)),
            nn.LeakyReLU(0.2),
            sn(nn.Linear(width, width)),
            nn.LeakyReLU(0.2),
            sn(nn.Linear(width, 1)),
        )

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.net(probs).squeeze(1)


@DISCRIMINATORS.register("conv")
class FeatureConv(nn.Module):
    """Over feature maps (N×C×H×W): two 3×3 convolutions, global average pooling, a linear logit."""

    reads = "features"

    def __init__(self, channels: int, width: int = 64, spectral_norm: bool = False):
        super().__init__()
        sn = functools.partial(_maybe_sn, spectral_norm=spectral_norm)
        self.net = nn.Sequential(
            sn(nn.Conv2d(channels, width, 3, padding=1)),
            nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, width, 3, padding=1)),
            nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            sn(nn.Linear(width, 1)),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


@DISCRIMINATORS.register("feature_mlp")
class FeatureMLP(nn.Module):
    """Over feature maps reduced to their channel means (N×C): for small or 1×1 maps."""

    reads = "features"

    def __init__(self, channels: int, width: int = 128, spectral_norm: bool = False):
        super().__init__()
        self.mlp = OutputMLP(channels, width, spectral_norm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features.flatten(2).mean(2) if features.dim() > 2 else features)
