"""GPU throughput check: DFAD's CIFAR-10 setting (ResNet-34 -> ResNet-18, 32×32, generator width 64,
batch 256), student images/s of the plain reference loop and of dfkd with its fast paths off, each
alone, and all on (channels_last, fused optimizers, torch.compile, bf16 autocast). Re-run it on any
machine with a CUDA GPU and record the figures with the hardware's name:

    python runs/gpu_check.py                       # stand-in data, see below
    python runs/gpu_check.py --cifar-root ~/data   # the real CIFAR-10 binary files under ~/data

Without --cifar-root it writes random images in CIFAR-10's binary layout to a temporary folder and
trains a one-epoch stand-in teacher on them: throughput does not depend on what the teacher knows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from dfkd.cli import main as dfkd
from dfkd.data import write_cifar_binary

PRESET = Path(__file__).with_name("cifar10_dfad_resnet34_resnet18.yaml")


def stand_in_cifar10(root: Path, records: int) -> Path:
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    write_cifar_binary(root / "cifar-10-batches-bin", files, records, label_bytes=1)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cifar-root", type=Path, help="folder holding cifar-10-batches-bin (default: random stand-in)"
    )
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test of this script")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--iterations", type=int, default=20, help="iterations per timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--records", type=int, default=1000, help="stand-in images per CIFAR file (6 files)")
    p.add_argument(
        "--variants", action=argparse.BooleanOptionalAction, default=True, help="time each fast path alone"
    )
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; run it on a machine with a GPU (or --device cpu to smoke-test)",
            file=sys.stderr,
        )
        return 2
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
    # (a CPU smoke test leaves out bf16, which is CUDA-only, and compile, minutes on a CPU for ResNets)
    fast = [
        "perf.channels_last=true",
        "perf.fused_optimizers=true",
        *(["perf.compile=true", "perf.autocast=bf16"] if cuda else []),
    ]
    with tempfile.TemporaryDirectory(prefix="dfkd-gpu-check-") as tmp:
        root = args.cifar_root or stand_in_cifar10(Path(tmp), args.records)
        return dfkd(
            [
                "bench",
                str(PRESET),
                f"data.root={root}",
                "teacher.epochs=1",
                # stand-in images carry no classes: their teacher is at chance by construction
                *([] if args.cifar_root else ["eval.min_teacher_margin=0"]),
                f"train.device={args.device}",
                f"train.batch_size={args.batch_size}",
                "--iterations",
                str(args.iterations),
                "--repeats",
                str(args.repeats),
                "--variants" if args.variants else "--no-variants",
                *fast,
            ]
        )


if __name__ == "__main__":
    sys.exit(main())
