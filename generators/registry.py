from __future__ import annotations

import torch
import torch.nn as nn

from dfkd.errors import DfkdError
from dfkd.registry import Registry

GENERATORS: Registry = Registry("generator")
OUTPUTS = ("standardized", "pixels")


class PixelsToNormalized(nn.Module):
    """Maps tanh outputs in (-1, 1) to pixel values in (0, 1), then into the data's normalized
    space: every synthetic image is one a camera could have taken (no darker than black)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2 - self.mean) / self.std


def output_layer(channels: int, pixel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None) -> nn.Module:
    """What follows a generator's tanh: DFAD's non-affine BatchNorm (outputs standardized per
    channel and batch) or, given the data's (mean, std), the valid pixel range in normalized space."""
    return nn.BatchNorm2d(channels, affine=False) if pixel_stats is None else PixelsToNormalized(*pixel_stats)


def build_generator(
    name: str,
    latent_dim: int,
    width: int,
    channels: int,
    image_size: int,
    output: str = "standardized",
    mean=None,
    std=None,
) -> nn.Module:
    """`output`: `standardized` (DFAD) or `pixels` (needs the data's normalization `mean`, `std`)."""
    if output not in OUTPUTS:
        raise DfkdError(f"generator.output must be one of {', '.join(OUTPUTS)}; got {output!r}")
    pixel_stats = (tuple(mean), tuple(std)) if output == "pixels" else None
    return GENERATORS.get(name)(latent_dim, width, channels, image_size, pixel_stats)
