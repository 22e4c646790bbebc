"""What a finished run's synthetic images teach, apart from the game that made them.

A fresh student is trained offline on the replay memory in each run's last checkpoint (the images
and the teacher logits stored with them; several runs pool their memories): Adam, cosine to zero,
batches of 128, KL to the stored logits at temperature 1. Its accuracy on the run's test images is
printed at each quarter. Where it reads about what the run's own student reached, the images, not
the steps, limit the run; where it reads much less, the student learnt from the sequence of batches
(each made against the student of its time) what no one memory holds. Another architecture
(--arch) says whom the images can teach (runs/RESULTS.md, "Teacher families": a LeNet-5-half reads
the Fashion-MNIST ResNet-8 game's images at 61 %, a ResNet-8 at 83 %).

    python runs/memory_student.py OUT/fmnist_resnet8_s0
    python runs/memory_student.py OUT/fmnist_resnet8_s0 OUT/fmnist_resnet8_s1 --arch resnet8 --steps 2000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dfkd.assemble import assemble
from dfkd.checkpoint import load_safe
from dfkd.config import load_config
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy
from dfkd.losses import kl


def memory_of(run: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and stored teacher logits of a run's replay memory."""
    path = run / "checkpoints" / "last.pt"
    if not path.is_file():
        raise DfkdError(f"{run}: no checkpoints/last.pt; give the folder of a finished dfkd run")
    memory = load_safe(path).get("memory")
    if not memory or not memory["size"]:
        raise DfkdError(f"{run}: its checkpoint holds no replay memory (method.replay_size was 0)")
    return memory["images"].float(), memory["logits"].float()


def train_offline(student, images, logits, steps: int, lr: float, seed: int, batch_size: int = 128):
    """Yield (step, student) at each quarter of `steps` Adam steps on random batches of `images`."""
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(student.parameters(), lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    quarters = {max(steps * k // 4, 1) for k in (1, 2, 3, 4)}
    student.train()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(images), (batch_size,), generator=rng)
        loss = kl(student(images[index]), logits[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step in quarters:
            yield step, student


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (their memories pool)")
    parser.add_argument("--arch", help="the student to train (default: the first run's student.arch)")
    parser.add_argument("--steps", type=int, default=4000, help="Adam steps of 128 images (default 4000)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="the student's initialisation and batches")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: give at least 1")
    try:
        pooled = [memory_of(run) for run in args.runs]
        overrides = [f"student.arch={args.arch}"] if args.arch else []
        cfg = load_config(args.runs[0] / "config.yaml", [*overrides, f"train.seed={args.seed}"])
        cfg.train.device = "cpu"  # the memory is loaded to the CPU; an offline student is small work
        parts = assemble(cfg, progress=False)
        if parts.evaluation.split is None:
            raise DfkdError(f"{args.runs[0]}: the run has no labelled test images to read")
        images, logits = torch.cat([i for i, _ in pooled]), torch.cat([t for _, t in pooled])
        runs = f"{len(args.runs)} run(s)"
        print(f"{parts.student_arch} on {len(images):,} images of {runs}, {args.steps} steps")
        for step, student in train_offline(parts.student, images, logits, args.steps, args.lr, args.seed):
            print(f"step {step}: {accuracy(student, parts.evaluation.split):.2f} % of the test images")
    except DfkdError as err:
        print(f"memory_student: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
