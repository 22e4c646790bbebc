"""Where each student step's batch comes from, as one pipeline built from the method config.

Source: the generator step's own batch and teacher logits (`reuse_samples`), a replay memory of
past batches (`replay_size`; each stored with its twin drawn by another pen and hand, which the
teacher labels, under `replay_pen_width` and `replay_elastic`), or a fresh batch from the
generator. Then the averaged generator's share of the batch (`generator_ema`, MAD), then
augmentations (`student_shift`, `student_flip`, `student_mixup`), which the teacher relabels.
Every draw uses the run's latent generator, so a resumed run draws what the uninterrupted one would
have.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dfkd.augment import random_elastic, random_hflip, random_mixup, random_pen_width, random_translate
from dfkd.config import MethodConfig
from dfkd.optim import WeightAverage
from dfkd.replay import ReplayMemory

Batch = tuple[torch.Tensor, torch.Tensor]  # images, teacher logits


class StudentBatches:
    def __init__(
        self,
        cfg: MethodConfig,
        batch_size: int,
        rng: torch.Generator,
        synthesize: Callable[..., Batch],
        label: Callable[[torch.Tensor], torch.Tensor],
        generator_average: WeightAverage | None = None,
    ):
        """`synthesize` draws a fresh batch with its teacher logits (Game.synthesize); `label` gives
        the teacher's logits for images made here (Game.label: the run's teacher and precision)."""
        self.cfg, self.batch_size, self.rng = cfg, batch_size, rng
        self.synthesize, self.label = synthesize, label
        self.memory = ReplayMemory(cfg.replay_size) if cfg.replay_size else None
        self.generator_average = generator_average
        self.average_batch: Batch | None = None

    def refresh(self, latest: Batch, owner: int = 0) -> None:
        """After the generator step(s) of generator `owner`: remember the newest batch (and its
        twin, which the teacher labels), advance the averaged generator and draw its share of this
        iteration's student batches."""
        if self.memory is not None:
            self.memory.add(*latest, owner=owner)
            if self.cfg.replay_pen_width or self.cfg.replay_elastic:
                twin = self._twin(latest[0])
                self.memory.add(twin, self.label(twin), owner=owner)
        if self.generator_average is not None:
            self.generator_average.update()
            share = max(1, round(self.cfg.generator_ema_mix * self.batch_size))
            self.average_batch = self.synthesize(self.generator_average.model, share)

    def draw(self, latest: Batch) -> Batch:
        """One student step's batch; the teacher labels augmented images."""
        batch = self._source(latest)
        if self.average_batch is not None:
            keep = len(batch[0]) - len(self.average_batch[0])
            batch = tuple(torch.cat([a[:keep], b]) for a, b in zip(batch, self.average_batch))
        return self._augment(batch)

    def _source(self, latest: Batch) -> Batch:
        if self.memory is not None:
            return self.memory.sample(self.batch_size, self.rng)
        return latest if self.cfg.reuse_samples else self.synthesize()

    def _twin(self, x: torch.Tensor) -> torch.Tensor:
        """`x` drawn again by another pen (thicker or thinner strokes), then by another hand (an
        elastic warp), as the method config asks."""
        m = self.cfg
        x = random_pen_width(x, m.replay_pen_width, self.rng) if m.replay_pen_width else x
        return random_elastic(x, m.replay_elastic, self.rng) if m.replay_elastic else x

    def _augment(self, batch: Batch) -> Batch:
        m, rng = self.cfg, self.rng
        if not (m.student_shift or m.student_flip or m.student_mixup):
            return batch
        x = batch[0]
        x = random_translate(x, m.student_shift, rng) if m.student_shift else x
        x = random_hflip(x, rng) if m.student_flip else x
        x = random_mixup(x, m.student_mixup, rng) if m.student_mixup else x
        return x, self.label(x)

    def forget(self, generator_state: dict, owner: int = 0) -> None:
        """After generator `owner` starts afresh: its average restarts from `generator_state` and the
        replay memory lets go of the old generator's batches (another generator's stay)."""
        if self.generator_average is not None:
            self.generator_average.model.load_state_dict(generator_state)
        if self.memory is not None:
            self.memory.drop(owner)
        self.average_batch = None

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict()} if self.memory is not None else {}

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"], device)
