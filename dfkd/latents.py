"""The generator's latent space: Gaussian noise, optionally carrying a class code.

A class-conditional latent (generator.conditional) holds a one-hot code of a drawn class in its first
`num_classes` coordinates and noise in the rest. The generator's first linear layer then reads the
code as a learned class embedding, so one unconditional architecture serves both, and the `target`
prior can ask the teacher to see the drawn class: every class gets its share by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError


class LatentSpace:
    def __init__(self, dim: int, num_classes: int = 0):
        """`num_classes` 0: plain noise; otherwise the first `num_classes` coordinates are a class code."""
        if num_classes and dim <= num_classes:
            raise DfkdError(
                f"generator.conditional writes a one-hot class code into the first {num_classes} latent "
                f"coordinates, so generator.latent_dim ({dim}) must be larger; raise it"
            )
        self.dim, self.num_classes = dim, num_classes

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def draw(self, n: int, rng: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.dim, generator=rng)
        if self.conditional:
            classes = torch.randint(self.num_classes, (n,), generator=rng)
            z[:, : self.num_classes] = F.one_hot(classes, self.num_classes)
        return z

    def targets(self, z: torch.Tensor) -> torch.Tensor | None:
        """The class each latent codes for (None for plain noise); on z's device, no host sync."""
        return z[:, : self.num_classes].argmax(1) if self.conditional else None
