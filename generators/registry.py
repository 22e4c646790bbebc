import torch.nn as nn

from dfkd.registry import Registry

GENERATORS: Registry = Registry("generator")


def build_generator(name: str, latent_dim: int, width: int, channels: int, image_size: int) -> nn.Module:
    return GENERATORS.get(name)(latent_dim, width, channels, image_size)
