"""What every method has: it turns network outputs into named losses and nothing more, and it
declares (and builds, and checks) what it needs from the run: layers read inside the teacher,
feature adapters, a discriminator.

A method never calls backward, step, zero_grad or .item(); the game (dfkd.game) owns every
gradient mechanic. Each `*_losses` returns a dict of scalar tensors with the total under "loss".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dfkd.config import DiscriminatorConfig, MethodConfig
from dfkd.errors import DfkdError
from dfkd.features import layer_shapes
from dfkd.registry import Registry
from dfkd.spec import InputSpec

METHODS: Registry = Registry("method")


@dataclass
class Setting:
    """What a method sees of the run when it builds and checks its modules."""

    student: nn.Module
    student_arch: str
    teachers: list[nn.Module]
    teacher_archs: list[str]
    # The teachers a feature term may read (none where a pool mixes several teachers' logits).
    feature_sources: list[int]
    pool_strategy: str
    spec: InputSpec
    device: torch.device
    discriminator: DiscriminatorConfig
    rng: torch.Generator | None = None  # the game's latent stream, for a method's own random draws

    def need_one_teacher_per_iteration(self, what: str) -> None:
        if not self.feature_sources:
            raise DfkdError(
                f"{what} read one teacher's layers per iteration; pool.strategy={self.pool_strategy} "
                "mixes several: use random, round_robin or split"
            )

    def pair_shapes(self, s_path: str, t_path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Output shapes (without the batch) of a student layer and of the teacher layer it meets."""
        s_shape = {p: sh for p, _, sh in layer_shapes(self.student, self.spec.shape)}[s_path]
        t_shapes = {
            {p: sh for p, _, sh in layer_shapes(self.teachers[i], self.spec.shape)}[t_path]
            for i in self.feature_sources
        }
        if len(t_shapes) > 1:
            raise DfkdError(
                f"teacher layer {t_path!r} differs in shape across the pool ({sorted(t_shapes)}); "
                "use pool.strategy=split to read one teacher"
            )
        return s_shape, t_shapes.pop()


class Method:
    """The interface the game calls. Subclasses register by name in METHODS."""

    uses_discriminator = False
    # The trainable modules beside the student (adapters) and beside the generator (a contrastive
    # head), each trained by that player's step, and the discriminator.
    student_modules: list[nn.Module]
    generator_modules: list[nn.Module]
    discriminator: nn.Module | None = None

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg
        self.student_modules, self.generator_modules = [], []

    def prepare(self, setting: Setting) -> None:
        """Check what the method reads against the run's networks; build its own modules."""

    @property
    def taps(self) -> set[str]:
        """What the generator's terms read from inside the teacher (dfkd.losses.PRIOR_TAPS)."""
        return set()

    @property
    def layer_pairs(self) -> list[list[str]]:
        """[student layer, teacher layer] pairs the student step reads."""
        return []

    def generator_losses(self, student_logits, teacher_logits, **taps) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def student_losses(self, student_logits, teacher_logits, feature_pairs=(), d_fake=None):
        raise NotImplementedError


def build_method(cfg: MethodConfig) -> Method:
    return METHODS.get(cfg.name)(cfg)
