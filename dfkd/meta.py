"""Fast-DFKD's meta-learned generator start (method.meta_generator; Fang et al. 2022, "Up to 100x
Faster Data-free Knowledge Distillation").

Every iteration the live generator starts again from a learned initialisation, takes the
iteration's n_generator_steps with an optimizer whose state starts afresh, and the initialisation
then moves, so that a few steps from it reach a good batch:

- `fomaml` (first-order MAML, the rule of the published runs): the initialisation's gradient is the
  sum of the gradients of the inner steps, each taken where that step stood;
- `reptile`: its gradient is the initialisation minus where the inner steps ended.

The initialisation is a Player of its own (optimizer, schedule, checkpoint keys `generator_meta`
and `m`), stepped once per iteration at generator_optim.lr x n_generator_steps, as Fast-DFKD does.
Only parameters restart: the live generator's BatchNorm running statistics carry on, so its
eval-mode sample grids show what the recent batches looked like.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from dfkd.player import Player

META_RULES = ("fomaml", "reptile")


class MetaStart:
    """The initialisation every iteration's generator steps start from, and its update rule."""

    def __init__(self, rule: str, player: Player):
        self.rule, self.player = rule, player
        self.module = player.module  # the initialisation's weights
        self._summed: list[torch.Tensor] | None = None

    @torch.no_grad()
    def begin(self, generator: nn.Module, inner: Player) -> None:
        """The generator back at the initialisation, its optimizer's state forgotten."""
        torch._foreach_copy_(list(generator.parameters()), self.player.params)
        inner.optimizer.state.clear()
        if self.rule == "fomaml":
            self._summed = [torch.zeros_like(p) for p in self.player.params]

    @torch.no_grad()
    def observe(self, generator: nn.Module) -> None:
        """After each inner step: fomaml adds the gradient that step took."""
        if self.rule == "fomaml":
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in generator.parameters()]
            torch._foreach_add_(self._summed, grads)

    @torch.no_grad()
    def end(self, generator: nn.Module) -> None:
        """The initialisation's own step, once the inner steps are done."""
        if self.rule == "fomaml":
            grads = self._summed
        else:  # Adam is invariant to the gradient's scale: no factor on the difference
            grads = torch._foreach_sub(self.player.params, list(generator.parameters()))
        self._summed = None
        self.player.step_along(grads)

    def reset(self, state: dict) -> None:
        """A fresh initialisation (after a collapse), with a fresh optimizer state."""
        self.module.load_state_dict(state)
        self.player.optimizer.state.clear()
