"""Objectives: they turn network outputs into named losses and nothing more.

A method never calls backward, step, zero_grad or .item(); the trainer owns every gradient
mechanic. Each `*_losses` returns a dict of scalar tensors with the total under "loss".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.config import MethodConfig
from dfkd.losses import FEATURE_LOSSES, GAN_LOSSES, LOSSES, PRIOR_TAPS, PRIORS, kl
from dfkd.registry import Registry

METHODS: Registry = Registry("method")


@METHODS.register("adversarial")
class Adversarial:
    """The DFAD / ZSKT game: the generator maximizes a discrepancy that the student minimizes."""

    def __init__(self, cfg: MethodConfig):
        self.discrepancy = LOSSES.get(cfg.loss)
        self.temperature = cfg.temperature
        self.adversarial_weight = cfg.adversarial_weight
        self.priors = {name: (PRIORS.get(name), weight) for name, weight in cfg.priors.items()}
        self.feature_loss = FEATURE_LOSSES.get(cfg.feature_loss)
        self.feature_weight = cfg.feature_weight

    @property
    def taps(self) -> set[str]:
        """What the priors read from inside the teacher (dfkd.losses.PRIOR_TAPS)."""
        return {PRIOR_TAPS[name] for name in self.priors if name in PRIOR_TAPS}

    def generator_losses(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, **taps) -> dict[str, torch.Tensor]:
        """Minus the discrepancy (the generator ascends it), plus the weighted priors."""
        d = self.discrepancy(student_logits, teacher_logits, self.temperature)
        out = {"loss": -self.adversarial_weight * d, "discrepancy": d}
        for name, (prior, weight) in self.priors.items():
            out[f"prior_{name}"] = prior(teacher_logits, **taps)
            out["loss"] = out["loss"] + weight * out[f"prior_{name}"]
        return out

    uses_discriminator = False

    def student_losses(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
        feature_pairs: list[tuple[torch.Tensor, torch.Tensor]] = (), d_fake: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The response term, plus `feature_weight` times the feature term summed over layer pairs."""
        d = self.discrepancy(student_logits, teacher_logits, self.temperature)
        if not feature_pairs:
            return {"loss": d}
        return self._with_features({"loss": d, "response": d}, feature_pairs)

    def _with_features(self, out: dict[str, torch.Tensor], feature_pairs) -> dict[str, torch.Tensor]:
        if feature_pairs:
            out["feature"] = sum(self.feature_loss(s, t) for s, t in feature_pairs)
            out["loss"] = out["loss"] + self.feature_weight * out["feature"]
        return out


@METHODS.register("gankd")
class GanKD(Adversarial):
    """GAN-KD without data: the generator plays the same hard-example game; the student minimizes
    CE(student, teacher argmax) + alpha * KL(teacher || student) + beta * GAN loss, where a
    discriminator tells teacher outputs (real) from student outputs (fake)."""

    def __init__(self, cfg: MethodConfig):
        super().__init__(cfg)
        self.alpha, self.beta = cfg.alpha, cfg.beta
        self.gan = GAN_LOSSES.get(cfg.gan_loss)()
        self.uses_discriminator = cfg.beta > 0

    def student_losses(self, student_logits, teacher_logits, feature_pairs=(), d_fake=None):
        ce = F.cross_entropy(student_logits, teacher_logits.argmax(1))
        div = kl(student_logits, teacher_logits, self.temperature)
        out = {"loss": ce + self.alpha * div, "ce": ce, "kl": div}
        if d_fake is not None:
            out["gan"] = self.gan.student(d_fake)
            out["loss"] = out["loss"] + self.beta * out["gan"]
        return self._with_features(out, feature_pairs)

    def discriminator_losses(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminator's loss, and its accuracy (a metric, no gradient) on both halves."""
        with torch.no_grad():
            t = self.gan.threshold
            acc = 0.5 * ((d_real > t).float().mean() + (d_fake <= t).float().mean())
        return {"loss": self.gan.discriminator(d_real, d_fake), "acc": acc}


def build_method(cfg: MethodConfig):
    return METHODS.get(cfg.name)(cfg)
