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
# name -> the learning-rate factor at progress p in [0, 1] of the planned steps; config validation
# reads these names.
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
def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("constant")
def _constant(progress: float) -> float:
    return 1.0


class Plan:
    """The learning-rate factor at step i of a schedule planned for `steps`: the schedule's shape,
    under a linear rise over the first `warmup` steps (from 1/warmup of the rate). Plain attributes,
    so that the scheduler's state_dict, and with it a checkpoint, keeps the plan."""

    def __init__(self, schedule: str, steps: int, warmup: int = 0):
        self.schedule, self.steps, self.warmup = schedule, steps, warmup

    def __call__(self, step: int) -> float:
        rise = min(1.0, (step + 1) / self.warmup) if self.warmup else 1.0
        return rise * SCHEDULES.get(self.schedule)(min(step, self.steps) / max(self.steps, 1))


def build_optimizer(params, cfg: OptimizerConfig, fused: bool = False) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(cfg.name)(params, cfg, {"fused": True} if fused else {})


def build_schedule(opt: torch.optim.Optimizer, cfg: OptimizerConfig, iterations: int):
    """A schedule planned for `iterations` steps of its own; the game steps it once per iteration
    (a generator's, once per turn), however many optimizer steps an iteration takes."""
    return torch.optim.lr_scheduler.LambdaLR(opt, Plan(cfg.schedule, iterations, cfg.warmup))


def scale_lr(opt: torch.optim.Optimizer, sched, factor: float) -> None:
    """Multiply the current and scheduled learning rates by `factor`."""
    for group in opt.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    sched.base_lrs = [lr * factor for lr in sched.base_lrs]


def replan(opt: torch.optim.Optimizer, sched, steps: int) -> None:
    """Continue a schedule as if the run had been planned for `steps` from the start (a longer or
    shorter resume): the plan's length changes and the current rate moves onto the new curve."""
    for plan, group, base in zip(sched.lr_lambdas, opt.param_groups, sched.base_lrs):
        if plan.steps != steps:
            plan.steps = steps
            group["lr"] = base * plan(sched.last_epoch)


def schedule_state(saved: dict) -> dict:
    """A saved schedule's state as build_schedule's scheduler loads it. Checkpoints written before
    schedules were plans hold torch's CosineAnnealingLR: the same cosine, from the full rate to zero
    over T_max steps."""
    if "lr_lambdas" in saved:
        return saved
    kept = {k: v for k, v in saved.items() if k not in ("T_max", "eta_min")}
    plan = {"schedule": "cosine", "steps": saved["T_max"], "warmup": 0}
    return {**kept, "lr_lambdas": [dict(plan) for _ in saved["base_lrs"]]}


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
