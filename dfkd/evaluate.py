from __future__ import annotations

import torch
import torch.nn as nn

from dfkd.data import Split


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, device: torch.device | str = "cpu", batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent, in eval mode; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(split), batch_size):
        x = split.images[i : i + batch_size].to(device, non_blocking=True)
        y = split.labels[i : i + batch_size].to(device, non_blocking=True)
        correct += (model(x).argmax(1) == y).sum()
    model.train(was_training)
    return 100.0 * int(correct) / max(1, len(split))
