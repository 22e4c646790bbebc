"""CMI's contrastive term for the generator (Fang et al., "Contrastive Model Inversion for Data-Free
Knowledge Transfer", IJCAI 2021): synthetic images that differ from each other and from the
batches before them, so that the generator cannot settle on a few modes.

The teacher describes each image by the per-image channel means of the inputs of its BatchNorm
layers, concatenated. Two views of a batch are described: the images as made ("global") and each
image under a random resized crop ("local"). A learned projection head maps both onto the unit
sphere, and each local view must pick out its own global view among those of the batch and of a
memory bank of past images (InfoNCE at `temperature`). The generator and the head minimize the
same loss: the head learns what tells images apart, the generator makes images it can tell apart.

Departures from the authors' code (zju-vipa/DataFree, `CMISynthesizer`): the whole bank serves as
negatives (there: 4,096 drawn from a bank of 40,960); every generator step's batch joins the bank
(there: the best batch of each synthesis); the head's hidden width is at most 512 (there: the
feature width, which for a ResNet-18 is a 4,800×4,800 layer); crops are square (there: aspect
3/4 to 4/3) and the global view is the image itself (there: a padded crop and a flip).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def instance_features(layer_inputs: list[torch.Tensor]) -> torch.Tensor:
    """N×D: per image, each layer input's channel means (spatial maps averaged), concatenated."""
    means = [x.float().mean(tuple(range(2, x.dim()))) if x.dim() > 2 else x.float() for x in layer_inputs]
    return torch.cat(means, dim=1)


class InstanceContrast(nn.Module):
    """The projection head and the memory bank. The bank is a buffer (checkpointed with the head);
    how much of it is written is Python state, so the loss never reads a number back from the device."""

    def __init__(self, feature_dim: int, bank_size: int, temperature: float, head_dim: int = 128):
        super().__init__()
        hidden = min(feature_dim, 512)
        self.head = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, head_dim))
        self.temperature = temperature
        self.register_buffer("bank", torch.zeros(bank_size, 2, feature_dim))  # [local, global] per image
        self.filled, self.cursor = 0, 0

    def loss(self, local: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """InfoNCE of each local view against every global view (the batch's, then the bank's), the
        global projections held fixed; the batch's rows and the bank's rows averaged apart, so the
        batch keeps its weight however full the bank is."""
        past = self.bank[: self.filled]
        queries = F.normalize(self.head(torch.cat([local, past[:, 0]])), dim=1)
        keys = F.normalize(self.head(torch.cat([whole, past[:, 1]])), dim=1).detach()
        logits = queries @ keys.T / self.temperature
        per_row = F.cross_entropy(logits, torch.arange(len(logits), device=logits.device), reduction="none")
        n = local.shape[0]
        return per_row[:n].mean() + (per_row[n:].mean() if self.filled else 0.0)

    @torch.no_grad()
    def remember(self, local: torch.Tensor, whole: torch.Tensor) -> None:
        """Write the batch's features over the oldest entries of the bank."""
        size = self.bank.shape[0]
        rows = torch.stack([local, whole], dim=1)[-size:]
        index = (self.cursor + torch.arange(len(rows))) % size
        self.bank[index.to(self.bank.device)] = rows.to(self.bank.dtype)
        self.cursor = (self.cursor + len(rows)) % size
        self.filled = min(self.filled + len(rows), size)

    def get_extra_state(self) -> dict:
        return {"filled": self.filled, "cursor": self.cursor}

    def set_extra_state(self, state: dict) -> None:
        self.filled, self.cursor = state["filled"], state["cursor"]
