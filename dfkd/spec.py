"""What a classifier takes and gives: the input spec every part of a run agrees on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputSpec:
    """Images of `channels` × `size` × `size`, normalized per channel with `mean` and `std` (the
    pixel values in [0, 1] minus mean, divided by std), classified into `num_classes` classes."""

    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (N×C×H×W) -> model inputs."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels - mean) / std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Model inputs -> [0, 1] pixels, for image grids."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)

    def as_meta(self) -> dict:
        """The keys a dfkd classifier checkpoint's meta records the spec under."""
        return {
            "in_channels": self.channels,
            "image_size": self.size,
            "num_classes": self.num_classes,
            "mean": list(self.mean),
            "std": list(self.std),
        }
