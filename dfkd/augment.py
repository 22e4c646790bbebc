"""Image augmentations on normalized N×C×H×W batches (teacher training, synthetic student batches)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_batch_shift(x: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Translate the whole batch by one random offset, filling with the border value."""
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    h, w = x.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def box_blur(x: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Each pixel replaced by the mean of the size×size window around it (at the border, of the
    window's pixels inside the image)."""
    return F.avg_pool2d(x, size, stride=1, padding=size // 2, count_include_pad=False)


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own whole-pixel offset in [-max_shift, max_shift], replicating borders."""
    n, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] - shifts[:, :1]).clamp(0, h - 1)  # n×h
    cols = (torch.arange(w, device=x.device)[None, :] - shifts[:, 1:]).clamp(0, w - 1)  # n×w
    x = x.gather(2, rows[:, None, :, None].expand(n, x.shape[1], h, w))
    return x.gather(3, cols[:, None, None, :].expand(n, x.shape[1], h, w))


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_mixup(x: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Blend a random `fraction` of the images each with another image of the batch, at a mixing
    weight drawn uniformly from [0, 1) per image; the rest pass unchanged."""
    n = x.shape[0]
    partner = torch.randint(n, (n,), generator=generator).to(x.device)
    weight = torch.rand(n, generator=generator).to(x.device, x.dtype)
    chosen = (torch.rand(n, generator=generator) < fraction).to(x.device)
    weight = torch.where(chosen, weight, torch.ones_like(weight))[:, None, None, None]
    return weight * x + (1 - weight) * x[partner]


def random_resized_crop(x: torch.Tensor, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Each image's own square crop, covering a random fraction in [min_scale, 1] of its area at a
    random position, resized back to the full size (bilinear). Differentiable in `x`."""
    n = x.shape[0]
    area = min_scale + (1 - min_scale) * torch.rand(n, generator=generator)
    side = area.sqrt()  # the crop's side as a fraction of the image's
    centre = (1 - side)[:, None] * (2 * torch.rand(n, 2, generator=generator) - 1)  # inside the image
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = side, side, centre
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_rotate_scale(
    x: torch.Tensor, degrees: float, scale: float, generator: torch.Generator
) -> torch.Tensor:
    """Each image rotated by its own angle in [-degrees, degrees] and scaled by its own factor in
    [1 - scale, 1 + scale] about its centre (bilinear, borders replicated). Differentiable in `x`.
    Sampled in float32 whatever the autocast: a bf16 grid misplaces pixels by a tenth of one."""
    n = x.shape[0]
    angle = torch.deg2rad(degrees * (2 * torch.rand(n, generator=generator) - 1))
    factor = 1 + scale * (2 * torch.rand(n, generator=generator) - 1)
    cos, sin = angle.cos() / factor, angle.sin() / factor  # the grid maps output to input: 1/factor
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    with torch.autocast(x.device.type, enabled=False):
        grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype)


def random_pen_width(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Each image blended toward its 3×3 grey dilation (a weight w > 0) or erosion (w < 0), by its
    own w drawn uniformly from [-strength, strength]: strokes drawn by a wider or narrower pen."""
    w = (2 * torch.rand(x.shape[0], generator=generator) - 1) * strength
    w = w.to(x.device, x.dtype)[:, None, None, None]
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return x + w.clamp(min=0) * (dilated - x) + (-w).clamp(min=0) * (eroded - x)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel blurred by a normalized Gaussian of `sigma` pixels (two passes, one per axis),
    zeros beyond the border: blurred zero-mean noise is no stronger at the border than inside."""
    radius = max(1, round(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(x.shape[1], 1)[:, None, None, :]  # one 1×width kernel per channel
    x = F.conv2d(x, k, padding=(0, radius), groups=x.shape[1])
    return F.conv2d(x, k.transpose(2, 3), padding=(radius, 0), groups=x.shape[1])


def random_elastic(
    x: torch.Tensor, alpha: float, generator: torch.Generator, sigma: float = 4.0
) -> torch.Tensor:
    """Each image warped by its own smooth random displacement field (Simard et al., 2003): uniform
    noise in [-1, 1] per pixel and axis, blurred by a Gaussian of `sigma` pixels, times `alpha`
    pixels (at sigma 4 a pixel moves by about alpha / 30 along each axis, on average). Bilinear,
    borders replicated, sampled in float32 whatever the autocast."""
    n, _, h, w = x.shape
    noise = (2 * torch.rand(n, 2, h, w, generator=generator) - 1).to(x.device)
    with torch.autocast(x.device.type, enabled=False):
        pixels = alpha * gaussian_blur(noise, sigma).permute(0, 2, 3, 1)  # n×h×w×(dx, dy)
        step = torch.tensor([2.0 / w, 2.0 / h], device=x.device)  # one pixel in grid units
        identity = torch.eye(2, 3, device=x.device).expand(n, 2, 3)
        grid = F.affine_grid(identity, list(x.shape), align_corners=False) + pixels * step
        out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(x.dtype)
