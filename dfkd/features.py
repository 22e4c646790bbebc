"""Intermediate activations, read by module path through forward hooks that keep no state.

The hooks live only inside one `capture` block and write into that block's own dict, so a model
carries nothing between forwards and can be captured from by several callers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd.errors import DfkdError


def find_layers(model: nn.Module, paths: Sequence[str], owner: str) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    for path in paths:
        if path not in modules:
            raise DfkdError(f"{owner} has no layer {path!r}; list its layers with: dfkd layers ARCH")
    return {path: modules[path] for path in paths}


@contextmanager
def capture(
    model: nn.Module, paths: Sequence[str], owner: str = "model", inputs: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """`with capture(net, ["features.2"]) as feats: net(x)` leaves the layer's output (or, with
    `inputs`, its first input) in feats["features.2"]."""
    feats: dict[str, torch.Tensor] = {}
    if not paths:  # the common case on the hot path: no module walk, no hooks
        yield feats
        return

    def hook(path):
        return lambda _m, args, out: feats.__setitem__(path, args[0] if inputs else out)

    handles = [
        module.register_forward_hook(hook(path)) for path, module in find_layers(model, paths, owner).items()
    ]
    try:
        yield feats
    finally:
        for handle in handles:
            handle.remove()


def device_of(model: nn.Module) -> torch.device:
    """Where a model's weights live (the CPU for one without any)."""
    return next(iter(model.parameters()), torch.zeros(0)).device


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block (no BatchNorm statistics move); afterwards each module
    is back in its own mode, a BatchNorm the user froze in eval mode included."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def layer_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(path, module type, output shape) for every named module, from one forward of zeros."""
    names = [name for name, _ in model.named_modules() if name]
    with evaluating(model), capture(model, names) as feats:
        model(torch.zeros(1, *input_shape, device=device_of(model)))
    modules = dict(model.named_modules())
    return [
        (n, type(modules[n]).__name__, tuple(feats[n].shape[1:]))
        for n in names
        if isinstance(feats.get(n), torch.Tensor)
    ]


class Adapter(nn.Module):
    """Maps a student feature onto the teacher's shape: a 1×1 convolution for the channels and
    average pooling (or nearest upsampling) for the size, or a linear map for flat features.
    It trains with the student."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        flat = len(teacher_shape) == 1
        self.proj = (nn.Linear if flat else nn.Conv2d)(
            student_shape[0], teacher_shape[0], *(() if flat else (1,))
        )
        self.size = tuple(teacher_shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if not self.size or tuple(x.shape[-2:]) == self.size:
            return x
        if x.shape[-1] > self.size[-1]:
            return F.adaptive_avg_pool2d(x, self.size)
        return F.interpolate(x, size=self.size, mode="nearest")


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (with running statistics) of a model, by path."""
    return {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    }
