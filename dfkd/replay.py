"""A replay memory of past synthetic batches with their teacher logits.

Student steps draw from it instead of from the latest generator batch alone: the student keeps
seeing the regions the generator has already left (no forgetting), and a draw costs no generator
or teacher forward because the teacher's logits were stored with the images.
"""

from __future__ import annotations

import torch


class ReplayMemory:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.images: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        self.size = 0
        self.cursor = 0

    def add(self, images: torch.Tensor, logits: torch.Tensor) -> None:
        """Insert a batch, overwriting the oldest entries once full (a ring buffer)."""
        if self.images is None:
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.logits = logits.new_empty((self.capacity, *logits.shape[1:]))
        n = min(len(images), self.capacity)
        idx = (self.cursor + torch.arange(n, device=images.device)) % self.capacity
        self.images[idx] = images[:n]
        self.logits[idx] = logits[:n]
        self.cursor = (self.cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(self.size, (n,), generator=generator).to(self.images.device)
        return self.images[idx], self.logits[idx]

    def state_dict(self) -> dict:
        return {
            "images": self.images[: self.size] if self.images is not None else None,
            "logits": self.logits[: self.size] if self.logits is not None else None,
            "cursor": self.cursor,
            "size": self.size,
        }

    def load_state_dict(self, state: dict) -> None:
        self.images = self.logits = None
        self.size = self.cursor = 0
        if state["images"] is not None:
            self.add(state["images"], state["logits"])
        self.cursor, self.size = state["cursor"], state["size"]
