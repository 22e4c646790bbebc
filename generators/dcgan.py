"""A DCGAN-style generator: latent -> transposed convolutions doubling the size up to the image."""

import torch
import torch.nn as nn

from dfkd.errors import DfkdError
from generators.registry import GENERATORS, output_layer


class DCGANGenerator(nn.Module):
    def __init__(
        self,
        latent_dim: int = 100,
        width: int = 64,
        channels: int = 1,
        image_size: int = 32,
        pixel_stats=None,
    ):
        super().__init__()
        n_up = 0
        while 4 * 2**n_up < image_size:
            n_up += 1
        if 4 * 2**n_up != image_size:
            raise DfkdError(
                f"the dcgan generator needs data.image_size = 4·2^k (8, 16, 32, 64...), got {image_size}"
            )
        top = width * 2**n_up
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, top, 4, 1, 0, bias=False),
            nn.BatchNorm2d(top),
            nn.ReLU(True),
        ]
        c = top
        for _ in range(n_up - 1):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(True),
            ]
            c //= 2
        layers += [
            nn.ConvTranspose2d(c, channels, 4, 2, 1, bias=False),
            nn.Tanh(),
            output_layer(channels, pixel_stats),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))


GENERATORS.register("dcgan")(DCGANGenerator)
