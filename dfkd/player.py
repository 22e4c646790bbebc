"""A trained network of the game and the one place its gradients are made and applied."""

from __future__ import annotations

import torch
import torch.nn as nn

from dfkd import distributed
from dfkd.config import OptimizerConfig
from dfkd.optim import WeightAverage, build_optimizer, build_schedule
from dfkd.perf import PhaseTimer


class Player:
    """One trained network: the module, the forward its training goes through (a DDP wrapper under
    torchrun), its parameters, optimizer, schedule and gradient clip. `step(loss)` is the one place
    where its gradients are made and applied; backward reaches its own parameters only."""

    def __init__(
        self,
        module: nn.Module,
        cfg: OptimizerConfig,
        iterations: int,
        device: torch.device,
        fused: bool = False,
        phases=None,
        backward_phase: str = "backward",
    ):
        self.module = module
        self.params = list(module.parameters())
        self.forward = distributed.wrap(module, device)
        self.optimizer = build_optimizer(self.params, cfg, fused)
        self.schedule = build_schedule(self.optimizer, cfg, iterations)
        self.grad_clip = cfg.grad_clip
        self.phases = phases or PhaseTimer(device)  # off: one shared no-op context
        self.backward_phase = backward_phase
        self.average: WeightAverage | None = None  # updated after every step when set

    def step(self, loss: torch.Tensor) -> None:
        phase = self.phases
        with phase("optimizer"):
            self.optimizer.zero_grad(set_to_none=True)
        with phase(self.backward_phase):
            loss.backward(inputs=self.params)
        self._apply_grads()

    def step_along(self, grads: list[torch.Tensor]) -> None:
        """A step on gradients made elsewhere (the generator's meta-learned start: dfkd.meta)."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self._apply_grads()

    def _apply_grads(self) -> None:
        with self.phases("optimizer"):
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
            self.optimizer.step()
            if self.average is not None:
                self.average.update()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]
