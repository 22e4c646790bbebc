"""Run health: non-finite values (divergence) and generator collapse.

Both are checked once per log interval, where the run synchronizes with the device anyway.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def first_non_finite(losses: dict[str, torch.Tensor], models: dict[str, nn.Module]) -> str | None:
    """The name of the first loss or model holding a NaN or Inf, or None when all are finite.

    One host sync whatever the number of tensors; the names are only looked up on failure."""
    named = [
        *losses.items(),
        *((f"{name} parameters", p) for name, m in models.items() for p in m.parameters()),
    ]
    flags = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(flags.all()):
        return None
    return named[int((~flags).nonzero()[0])][0]


class CollapseMonitor:
    """Flags a generator whose batches the teacher puts mostly in one class, interval after interval.

    `update` takes the mean fraction of the batch in the teacher's most frequent class over one log
    interval and returns True while that fraction has exceeded `threshold` for `patience` intervals.
    """

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience = threshold, patience
        self.streak = 0

    @classmethod
    def for_run(cls, threshold: float, patience: int, iterations: int, log_every: int) -> CollapseMonitor:
        """A window that fits the run: `patience` intervals, but at most a quarter of the run's log
        intervals (and at least 2), so a short run is watched too."""
        intervals = -(-iterations // log_every)
        return cls(threshold, max(2, min(patience, intervals // 4)))

    def update(self, top_class_frac: float) -> bool:
        self.streak = self.streak + 1 if top_class_frac > self.threshold else 0
        return self.streak >= self.patience
