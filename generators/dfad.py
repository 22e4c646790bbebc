"""The DFAD generator (Fang et al. 2019):
linear -> BN -> 2×(upsample, conv, BN, LeakyReLU) -> conv -> tanh -> BN."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.errors import DfkdError
from generators.registry import GENERATORS, output_layer


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last only for a tensor stored NHWC and not also NCHW (one channel, or 1×1 maps, are both)."""
    channels_last = (
        t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    )
    return torch.channels_last if channels_last else torch.contiguous_format


class _Upsample2x(torch.autograd.Function):
    """Nearest-neighbour 2× upsampling as a broadcast and reshape (forward), with the gradient as a
    2×2 sum pooling, 4 · avg_pool2d (backward). Autograd's own backward of the broadcast is a
    strided sum over the two repeated axes: on this project's CPU (torch 2.14) 3.4× slower in
    float32 and 22× slower in bf16 channels_last than the pooling, and the costliest kernel of the
    demo's iteration."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if memory_format_of(x) is torch.channels_last:
            nhwc = x.permute(0, 2, 3, 1)
            return (
                nhwc[:, :, None, :, None, :]
                .expand(n, h, 2, w, 2, c)
                .reshape(n, 2 * h, 2 * w, c)
                .permute(0, 3, 1, 2)
            )
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(grad, 2) * 4


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2× upsampling, equal to F.interpolate(x, scale_factor=2) but, as a
    broadcast and reshape, measured 8× faster forward on this project's CPU (torch 2.14).
    Keeps the memory layout: a channels_last input is repeated in its NHWC view (one copy),
    rather than copied to NCHW and back (perf.channels_last)."""
    return _Upsample2x.apply(x)


class DFADGenerator(nn.Module):
    def __init__(
        self,
        latent_dim: int = 100,
        width: int = 64,
        channels: int = 1,
        image_size: int = 32,
        pixel_stats=None,
    ):
        super().__init__()
        if image_size % 4:
            raise DfkdError(f"the dfad generator needs data.image_size divisible by 4, got {image_size}")
        self.init_size = image_size // 4
        self.fc = nn.Linear(latent_dim, 2 * width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.block1 = nn.Sequential(
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(2 * width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2, inplace=True)
        )
        # tanh, then a non-affine BN (outputs standardized per channel, like normalized real images)
        # or the valid pixel range in normalized space (generator.output: pixels).
        self.head = nn.Sequential(
            nn.Conv2d(width, channels, 3, 1, 1), nn.Tanh(), output_layer(channels, pixel_stats)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.bn0(self.fc(z).view(z.shape[0], -1, self.init_size, self.init_size))
        # In the convolutions' own layout from here on (NHWC under perf.channels_last): the small
        # 8×8 map is converted once instead of each upsampled map before every convolution.
        x = x.contiguous(memory_format=memory_format_of(self.block1[0].weight))
        x = self.block1(upsample2x(x))
        x = self.block2(upsample2x(x))
        return self.head(x)


GENERATORS.register("dfad")(DFADGenerator)
