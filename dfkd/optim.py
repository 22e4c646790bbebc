"""Optimizers and learning-rate schedules by name, weight averaging, learning-rate scaling."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from dfkd.registry import Registry

if TYPE_CHECKING:
    from dfkd.config import OptimizerConfig

# name -> (params, cfg, kernel options) -> optimizer; config validation reads these names.
OPTIMIZERS: Registry = Registry("optimizer")
# name -> (optimizer, iterations) -> schedule, stepped once per iteration.
SCHEDULES: Registry = Registry("schedule")


@OPTIMIZERS.register("adam")
def _adam(params, cfg: OptimizerConfig, kernel: dict) -> torch.optim.Optimizer:
    return torch.optim.Adam(
        params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernel
    )


@OPTIMIZERS.register("sgd")
def _sgd(params, cfg: OptimizerConfig, kernel: dict) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kernel)


@SCHEDULES.register("cosine")
def _cosine(opt: torch.optim.Optimizer, iterations: int):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)


@SCHEDULES.register("constant")
def _constant(opt: torch.optim.Optimizer, iterations: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def build_optimizer(params, cfg: OptimizerConfig, fused: bool = False) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(params, cfg, {"fused": True} if fused else {})


def build_schedule(opt: torch.optim.Optimizer, cfg: OptimizerConfig, iterations: int):
    return SCHEDULES.get(cfg.schedule)(opt, iterations)


def scale_lr(opt: torch.optim.Optimizer, sched, factor: float) -> None:
    """Multiply the current and scheduled learning rates by `factor`."""
    for group in opt.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    sched.base_lrs = [lr * factor for lr in sched.base_lrs]


def replan(opt: torch.optim.Optimizer, sched, iterations: int) -> None:
    """Continue a schedule as if the run had been planned for `iterations` from the start (a longer
    or shorter resume): the cosine's length changes and the current rate moves onto the new curve."""
    if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) or sched.T_max == iterations:
        return
    sched.T_max = iterations
    progress = math.cos(math.pi * min(sched.last_epoch, iterations) / iterations)
    for group, base in zip(opt.param_groups, sched.base_lrs):
        group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + progress) / 2


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay · average + (1 - decay) · model, for the weights; buffers are copied."""
    torch._foreach_lerp_(list(average.parameters()), list(model.parameters()), 1.0 - decay)
    for a, b in zip(average.buffers(), model.buffers()):
        a.copy_(b)


class WeightAverage:
    """An exponential moving average of `source`'s weights, as a frozen copy of the network."""

    def __init__(self, source: nn.Module, decay: float):
        self.source, self.decay = source, decay
        self.model = copy.deepcopy(source).requires_grad_(False)

    def update(self) -> None:
        ema_update(self.model, self.source, self.decay)
