"""A pool of frozen teachers and the strategies that pick who plays each iteration.

A strategy turns (step, seeded generator) into a `Choice`: whose logits, with what weights, form
the teacher the generator and the student's response term see this iteration, and whose
features the feature term reads. A single teacher is a pool of one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn as nn

from dfkd.config import PoolConfig
from dfkd.errors import DfkdError
from dfkd.features import device_of
from dfkd.registry import Registry
from dfkd.spec import InputSpec

STRATEGIES: Registry = Registry("teacher strategy")


@dataclass(frozen=True)
class Choice:
    response: dict[int, float]  # teacher index -> weight of its logits
    feature: int | None  # the teacher whose layers the feature term reads


class Strategy:
    def __init__(self, n: int, cfg: PoolConfig):
        self.n = n
        # The teachers the feature term may read (none where the logits of several are mixed).
        self.feature_sources = list(range(n))

    def choose(self, step: int, rng: random.Random) -> Choice:
        raise NotImplementedError


@STRATEGIES.register("random")
class RandomTeacher(Strategy):
    """One teacher uniformly at random per iteration, from the run's seeded generator."""

    def choose(self, step, rng):
        if self.n == 1:  # no draw: nothing to choose, and no tensor to read back
            return Choice({0: 1.0}, 0)
        i = rng.randrange(self.n)  # a host-side draw: no tensor is read back
        return Choice({i: 1.0}, i)


@STRATEGIES.register("round_robin")
class RoundRobin(Strategy):
    def choose(self, step, rng):
        return Choice({step % self.n: 1.0}, step % self.n)


@STRATEGIES.register("weighted")
class Weighted(Strategy):
    """A fixed weighted average of all teachers' logits (`pool.weights`, normalized to sum 1)."""

    def __init__(self, n, cfg):
        super().__init__(n, cfg)
        self.feature_sources = []
        if len(cfg.weights) != n or any(w < 0 for w in cfg.weights) or sum(cfg.weights) <= 0:
            raise DfkdError(
                f"pool.weights must hold {n} non-negative weights, one per teacher, not all 0; "
                f"got {cfg.weights}"
            )
        total = sum(cfg.weights)
        self.weights = {i: w / total for i, w in enumerate(cfg.weights) if w > 0}

    def choose(self, step, rng):
        return Choice(self.weights, None)


@STRATEGIES.register("mean")
class Mean(Weighted):
    """The average of all teachers' logits."""

    def __init__(self, n, cfg):
        super().__init__(n, PoolConfig(weights=[1.0] * n))


@STRATEGIES.register("split")
class KnowledgeSplit(Strategy):
    """One teacher supplies the response term (and plays the generator), another the feature term."""

    def __init__(self, n, cfg):
        super().__init__(n, cfg)
        for key in ("response_teacher", "feature_teacher"):
            if not 0 <= getattr(cfg, key) < n:
                raise DfkdError(
                    f"pool.{key} must index one of the {n} teachers (0..{n - 1}), got {getattr(cfg, key)}"
                )
        self.choice = Choice({cfg.response_teacher: 1.0}, cfg.feature_teacher)
        self.feature_sources = [cfg.feature_teacher]

    def choose(self, step, rng):
        return self.choice


class Ensemble(nn.Module):
    """Weighted sum of the members' logits."""

    def __init__(self, members: list[nn.Module], weights: list[float]):
        super().__init__()
        self.members, self.weights = nn.ModuleList(members), weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * m(x) for m, w in zip(self.members, self.weights))


class Renormalized(nn.Module):
    """A teacher that hooks cannot reach (TorchScript), taking the generator's input space."""

    def __init__(self, model: nn.Module, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x * self.scale + self.shift)


def renormalize_inputs(model: nn.Module, data_mean, data_std, own_mean, own_std):
    """For a teacher trained on other input statistics than the data's: the generator's space
    (normalized with the data's mean and std) mapped into the teacher's own. A forward pre-hook
    keeps the layer paths those of the model itself; returns (the model to use, the hook's handle
    to remove when the run ends, or None where the model is wrapped instead)."""
    shape = (1, -1, 1, 1)
    device = device_of(model)
    dm, ds, om, os_ = (
        torch.tensor(v, dtype=torch.float32, device=device).view(shape)
        for v in (data_mean, data_std, own_mean, own_std)
    )
    scale, shift = ds / os_, (dm - om) / os_
    if isinstance(model, torch.jit.ScriptModule):
        return Renormalized(model, scale, shift), None
    return model, model.register_forward_pre_hook(lambda _m, args: (args[0] * scale + shift, *args[1:]))


class TeacherPool:
    """The frozen teachers, each taking the generator's input space, and the strategy that picks
    who plays; `uses` counts iterations per teacher."""

    def __init__(
        self, models: list[nn.Module], metas: list[dict], spec: InputSpec, cfg: PoolConfig, seed: int
    ):
        self.models, self.metas, self.hooks = list(models), metas, []
        for i, meta in enumerate(metas):
            if not _same(meta, spec):
                self.models[i], hook = renormalize_inputs(
                    models[i], spec.mean, spec.std, meta["mean"], meta["std"]
                )
                self.hooks += [hook] if hook is not None else []
        self.strategy = STRATEGIES.get(cfg.strategy)(len(models), cfg)
        self.rng = random.Random(seed)
        self.uses = [0] * len(models)

    def __len__(self) -> int:
        return len(self.models)

    def release(self) -> None:
        """Take the input hooks off the teachers (a caller's module is left as it came)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    @property
    def names(self) -> list[str]:
        return [f"t{i}" for i in range(len(self))]

    def choose(self, step: int) -> tuple[nn.Module, int | None]:
        """This iteration's teacher (one member or a weighted ensemble) and its feature source."""
        choice = self.strategy.choose(step, self.rng)
        for i in choice.response:
            self.uses[i] += 1
        if len(choice.response) == 1 and next(iter(choice.response.values())) == 1.0:
            return self.models[next(iter(choice.response))], choice.feature
        members = [self.models[i] for i in choice.response]
        return Ensemble(members, list(choice.response.values())), choice.feature

    def ensemble(self) -> nn.Module:
        return Ensemble(self.models, [1.0 / len(self)] * len(self))

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng_state": [version, list(internal), gauss], "uses": torch.tensor(self.uses)}

    def load_state_dict(self, state: dict) -> None:
        if "rng_state" in state:
            version, internal, gauss = state["rng_state"]
            self.rng.setstate((version, tuple(internal), gauss))
        else:  # a checkpoint from before host-side draws: continue from a stream seeded by its state
            self.rng.seed(int(state["rng"].sum()))
        self.uses = state["uses"].tolist()


def _same(meta: dict, info) -> bool:
    return list(meta.get("mean", info.mean)) == list(info.mean) and list(meta.get("std", info.std)) == list(
        info.std
    )


def check_agreement(metas: list[dict], sources: list[str]) -> None:
    """Every teacher must agree with the first on the label space and the input shape."""
    for key in ("num_classes", "in_channels", "image_size"):
        for i in range(1, len(metas)):
            if metas[i].get(key) != metas[0].get(key):
                raise DfkdError(
                    f"teachers {sources[0]} and {sources[i]} disagree on {key}: "
                    f"{metas[0].get(key)} vs {metas[i].get(key)}"
                )
