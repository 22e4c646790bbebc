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


class CollapseWatch:
    """A CollapseMonitor per generator, fed the top-class fraction of each batch that generator
    makes. Generators taking turns are watched one by one: one that collapses shows in its own
    batches only, where the mean over all of them would hide it."""

    def __init__(self, monitors: list[CollapseMonitor]):
        self.monitors = monitors
        self.clear()

    @classmethod
    def for_run(
        cls, n_generators: int, threshold: float, patience: int, iterations: int, log_every: int
    ) -> CollapseWatch:
        return cls(
            [CollapseMonitor.for_run(threshold, patience, iterations, log_every) for _ in range(n_generators)]
        )

    def clear(self) -> None:
        """Starts a new log interval."""
        self.fractions: list[list[torch.Tensor]] = [[] for _ in self.monitors]

    def record(self, generator: int, top_class_frac: torch.Tensor) -> None:
        """One batch's fraction, kept where it is (no host sync)."""
        self.fractions[generator].append(top_class_frac)

    def interval_means(self) -> dict[int, float]:
        """Per generator that played in the interval, its batches' mean fraction (summed in float32
        and divided in float64, as every logged metric is); then a new interval starts."""
        means = {k: sum(f[1:], f[0]).item() / len(f) for k, f in enumerate(self.fractions) if f}
        self.clear()
        return means

    def update(self, means: dict[int, float]) -> tuple[list[int], bool]:
        """Feeds each generator's monitor its interval mean. Returns the generators that collapsed
        just now, and whether any is collapsed (one that did not play keeps its state)."""
        idle = [m for k, m in enumerate(self.monitors) if k not in means]
        flagged, newly = any(m.streak >= m.patience for m in idle), []
        for k, mean in means.items():
            monitor = self.monitors[k]
            was = monitor.streak >= monitor.patience
            collapsed = monitor.update(mean)
            flagged |= collapsed
            if collapsed and not was:
                newly.append(k)
        return newly, flagged
