"""GPU check: DFAD's CIFAR-10 setting (ResNet-34 -> ResNet-18, 32×32, generator width 64, batch 256)
in one table: student images/s, milliseconds per iteration, peak GPU memory and achieved FLOP/s
against a matmul peak measured in the same run, for the plain reference loop, dfkd with no fast
path, each fast path alone, dfkd's default for this device, all fast paths on, and all of them
with CUDA graphs (torch.compile mode "reduce-overhead"). Every contender runs the same algorithm
(a fresh generator batch per student step, as `dfkd bench`). One command, one screen:

    python runs/gpu_check.py                       # stand-in data, see below
    python runs/gpu_check.py --cifar-root ~/data   # the real CIFAR-10 binary files under ~/data
    python runs/gpu_check.py --no-compile          # skip the compiled rows (their warm-up is the slow part)

Without --cifar-root it writes random images in CIFAR-10's binary layout to a temporary folder and
trains a one-epoch stand-in teacher on them: throughput does not depend on what the teacher knows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dfkd.bench import FAST_PATHS, NO_FAST_PATHS, PlainLoop, fresh_run, images_per_s, plain_config
from dfkd.config import load_config, with_settings
from dfkd.data import write_cifar_binary
from dfkd.errors import DfkdError
from dfkd.perf import matmul_peak

PRESET = Path(__file__).with_name("cifar10_dfad_resnet34_resnet18.yaml")
ALL_ON = {
    "perf.channels_last": True,
    "perf.fused_optimizers": True,
    "perf.compile": True,
    "perf.autocast": "bf16",
}


def stand_in_cifar10(root: Path, records: int) -> Path:
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    write_cifar_binary(root / "cifar-10-batches-bin", files, records, label_bytes=1)
    return root


def contender_settings(cuda: bool, compile_rows: bool) -> dict[str, dict | None]:
    """Name -> perf settings over the plain algorithm (None: the plain loop; {}: dfkd's default).
    A CPU smoke test leaves out bf16, which is slow without native bf16, and compiling ResNets."""
    rows: dict[str, dict | None] = {"plain loop (reference)": None, "dfkd, no fast paths": NO_FAST_PATHS}
    for name, settings in FAST_PATHS.items():
        if (name != "compile" or compile_rows) and (name != "bf16 autocast" or cuda):
            rows[f"dfkd + {name} only"] = {**NO_FAST_PATHS, **settings}
    rows["dfkd default (chosen for this device)"] = {}
    if cuda:
        rows["dfkd, all fast paths" + ("" if compile_rows else " but compile")] = {
            **ALL_ON,
            "perf.compile": compile_rows,
        }
        if compile_rows:
            rows["dfkd, all + CUDA graphs (reduce-overhead)"] = {
                **ALL_ON,
                "perf.compile": False,
                "graphs": True,
            }
    return rows


def flops_of(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_memory(step, device: torch.device) -> float | None:
    """Peak bytes allocated by one more step (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device)


def check(cfg, iterations: int, repeats: int, compile_rows: bool, out=print) -> None:
    cfg = plain_config(cfg)
    device_name = torch.cuda.get_device_name() if cfg.train.device == "cuda" else "cpu"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dfkd-gpu-check-") as root:
        steps, dtypes, counted = {}, {}, {}
        base = fresh_run(with_settings(cfg, NO_FAST_PATHS), root)
        device = base.device
        for name, settings in contender_settings(device.type == "cuda", compile_rows).items():
            if settings is None:
                plain = PlainLoop(cfg, base.game.teacher, base.parts.spec, device)
                steps[name], dtypes[name] = plain.iteration, torch.float32
                counted[name] = flops_of(plain.iteration)
                continue
            settings = dict(settings)
            graphs = settings.pop("graphs", False)
            run = fresh_run(with_settings(cfg, settings), root)
            if graphs:  # CUDA graphs through torch.compile, on the networks the game already holds
                for net in (run.game.generator, run.game.student, run.game.teacher):
                    net.compile(mode="reduce-overhead")
            steps[name] = run.step
            dtypes[name] = torch.bfloat16 if run.cfg.perf.autocast == "bf16" else torch.float32
            counted[name] = None  # the same algorithm as dfkd's without fast paths: its FLOPs
        dfkd_flops = flops_of(base.step)
        images = base.game.images_per_iteration
        rates = images_per_s(steps, iterations, repeats, images, device)
        memory = {name: peak_memory(step, device) for name, step in steps.items()}
        peaks = {
            dtype: matmul_peak(device, dtype, n=8192 if device.type == "cuda" else 1024)
            for dtype in set(dtypes.values())
        }
    t = cfg.train
    out(
        f"gpu_check: {device_name}, torch {torch.__version__}; {cfg.teacher_recipes[0].arch} -> "
        f"{cfg.student.arch}, batch {t.batch_size}, {cfg.method.n_student_steps} student step(s) per "
        f"generator step; {iterations} iterations x {repeats} repeats in turns (median); matmul peak "
        + ", ".join(f"{str(d).removeprefix('torch.')} {p / 1e12:.1f} TFLOP/s" for d, p in peaks.items())
    )
    width = max(map(len, rates)) + 2
    heads = zip(("images/s", "vs plain", "ms/it", "peak MiB", "TFLOP/s", "of peak"), (10, 9, 9, 10, 9, 9))
    out(f"{'contender':<{width}}" + "".join(f"{h:>{w}}" for h, w in heads))
    reference = rates["plain loop (reference)"]
    for name, rate in rates.items():
        seconds = images / rate
        achieved = (counted[name] or dfkd_flops) / seconds
        mib = "-" if memory[name] is None else f"{memory[name] / 2**20:.0f}"
        out(
            f"{name:<{width}}{rate:>10.0f}{rate / reference:>9.2f}{1000 * seconds:>9.1f}{mib:>10}"
            f"{achieved / 1e12:>9.2f}{100 * achieved / peaks[dtypes[name]]:>8.1f}%"
        )
    out(f"gpu_check: {time.perf_counter() - start:.0f} s in all")


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
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="include the compiled rows"
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; run it on a machine with a GPU (or --device cpu to smoke-test)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="dfkd-gpu-check-data-") as tmp:
        root = args.cifar_root or stand_in_cifar10(Path(tmp), args.records)
        overrides = [
            f"data.root={root}",
            "teacher.epochs=1",
            # stand-in images carry no classes: their teacher is at chance by construction
            *([] if args.cifar_root else ["eval.min_teacher_margin=0"]),
            f"train.device={args.device}",
            f"train.batch_size={args.batch_size}",
            "tracking.mode=disabled",
        ]
        try:
            check(load_config(PRESET, overrides), args.iterations, args.repeats, args.compile)
        except DfkdError as err:
            print(f"gpu_check: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
