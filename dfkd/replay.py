"""A replay memory of past synthetic batches with their teacher logits.

Student steps draw from it instead of from the latest generator batch alone: the student keeps
seeing the regions the generator has already left (no forgetting), and a draw costs no generator
or teacher forward because the teacher's logits were stored with the images. Each entry also
records which generator made it, so a generator started afresh takes only its own images along.
"""

from __future__ import annotations

import torch


class ReplayMemory:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.images: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.owners: torch.Tensor | None = None  # the index of the generator that made each entry
        self.size = 0
        self.cursor = 0

    def add(self, images: torch.Tensor, logits: torch.Tensor, owner: int = 0) -> None:
        """Insert a batch made by generator `owner`, overwriting the oldest entries once full (a
        ring buffer)."""
        if self.images is None:
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.logits = logits.new_empty((self.capacity, *logits.shape[1:]))
            self.owners = torch.zeros(self.capacity, dtype=torch.int16, device=images.device)
        n = min(len(images), self.capacity)
        idx = (self.cursor + torch.arange(n, device=images.device)) % self.capacity
        self.images[idx] = images[:n]
        self.logits[idx] = logits[:n]
        self.owners[idx] = owner
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def drop(self, owner: int) -> None:
        """Forget generator `owner`'s entries; the others stay, oldest first, and the ring goes on
        after them."""
        if self.images is None:
            return
        oldest = self.cursor if self.size == self.capacity else 0
        order = (oldest + torch.arange(self.size, device=self.images.device)) % self.capacity
        keep = order[self.owners[order] != owner]
        images, logits, owners = self.images[keep], self.logits[keep], self.owners[keep]
        self.size = len(keep)
        self.cursor = self.size % self.capacity
        self.images[: self.size], self.logits[: self.size], self.owners[: self.size] = images, logits, owners

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=generator).to(self.images.device)
        return self.images[idx], self.logits[idx]

    def state_dict(self) -> dict:
        return {
            "images": self.images[: self.size] if self.images is not None else None,
            "logits": self.logits[: self.size] if self.logits is not None else None,
            "owners": self.owners[: self.size] if self.owners is not None else None,
            "cursor": self.cursor,
            "size": self.size,
        }

    def load_state_dict(self, state: dict, device: torch.device | None = None) -> None:
        """Restore `state` onto `device` (by default where its tensors are: a checkpoint is read
        onto the CPU, and a run on an accelerator keeps its memory there)."""
        self.images = self.logits = self.owners = None
        self.size = self.cursor = 0
        if state["images"] is not None:
            self.add(state["images"].to(device), state["logits"].to(device))
            if state.get("owners") is not None:  # absent from older checkpoints: all filed under 0
                self.owners[: self.size] = state["owners"].to(device)
        self.cursor, self.size = state["cursor"], state["size"]
