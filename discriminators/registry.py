import torch.nn as nn

from dfkd.registry import Registry

DISCRIMINATORS: Registry = Registry("discriminator")


def build_discriminator(name: str, in_features: int, width: int, spectral_norm: bool) -> nn.Module:
    """`in_features`: classes for a discriminator over outputs, channels for one over feature maps."""
    return DISCRIMINATORS.get(name)(in_features, width, spectral_norm)
