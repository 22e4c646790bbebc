"""Objectives: they turn network outputs into named losses and nothing more.

A method never calls backward, step, zero_grad or .item(); the trainer owns every gradient
mechanic. Each `*_losses` returns a dict of scalar tensors with the total under "loss".
"""
from __future__ import annotations

import torch

from dfkd.config import MethodConfig
from dfkd.losses import FEATURE_LOSSES, LOSSES, PRIORS
from dfkd.registry import Registry

METHODS: Registry = Registry("method")


@METHODS.register("adversarial")
class Adversarial:
    """The DFAD / ZSKT game: the generator maximizes a discrepancy that the student minimizes."""

    def __init__(self, cfg: MethodConfig):
        self.discrepancy = LOSSES.get(cfg.loss)
        self.temperature = cfg.temperature
        self.priors = {name: (PRIORS.get(name), weight) for name, weight in cfg.priors.items()}
        self.feature_loss = FEATURE_LOSSES.get(cfg.feature_loss)
        self.feature_weight = cfg.feature_weight

    def generator_losses(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.discrepancy(student_logits, teacher_logits, self.temperature)
        out = {"loss": -d, "discrepancy": d}
        for name, (prior, weight) in self.priors.items():
            out[f"prior_{name}"] = prior(teacher_logits)
            out["loss"] = out["loss"] + weight * out[f"prior_{name}"]
        return out

    def student_losses(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
        feature_pairs: list[tuple[torch.Tensor, torch.Tensor]] = (),
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The response term, plus `feature_weight` times the feature term summed over layer pairs."""
        d = self.discrepancy(student_logits, teacher_logits, self.temperature)
        if not feature_pairs:
            return {"loss": d}
        f = sum(self.feature_loss(s, t) for s, t in feature_pairs)
        return {"loss": d + self.feature_weight * f, "response": d, "feature": f}


def build_method(cfg: MethodConfig):
    return METHODS.get(cfg.name)(cfg)
