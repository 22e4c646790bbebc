from __future__ import annotations

import torch
import torch.nn as nn

from dfkd.data import Split


@torch.no_grad()
def predictions(
    model: nn.Module, split: Split, device: torch.device | str = "cpu", batch_size: int = 1000
) -> torch.Tensor:
    """Top-1 class per image (on the CPU), in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    out = [
        model(split.images[i : i + batch_size].to(device, non_blocking=True)).argmax(1).cpu()
        for i in range(0, len(split), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Percent of positions where two prediction vectors agree."""
    return 100.0 * int((a == b).sum()) / len(a) if len(a) else 0.0


def class_accuracies(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float | None]:
    """Per class, the percent of its images predicted as it (None for a class with no images)."""
    hits = torch.bincount(labels[preds == labels], minlength=num_classes)
    counts = torch.bincount(labels, minlength=num_classes)
    return [round(100.0 * int(h) / int(c), 2) if c else None for h, c in zip(hits, counts)]


def accuracy(
    model: nn.Module, split: Split, device: torch.device | str = "cpu", batch_size: int = 1000
) -> float:
    """Top-1 accuracy in percent, in eval mode; the model's train/eval mode is restored afterwards."""
    return agreement(predictions(model, split, device, batch_size), split.labels)
