"""The default recipe across the teachers people hold: the teacher-family table in runs/RESULTS.md.

Each teacher is trained by dfkd's teacher recipe (and cached), then distilled with the default
recipe (dfkd/config.py: nothing set but data, teacher and student) within a fixed wall-clock budget:
a 20-iteration calibration run measures the seconds one iteration takes here (its evaluations
counted apart, as a fixed cost of every run), and each seed runs the recipe's 1,000 iterations, or
as many as the budget allows where that is fewer (`--fill-budget`: always as many as it allows, as
runs/preset_table.py does), with the budget as its time limit (`train.time_limit`: a long run's
iteration can take longer than the calibration's). Longer is not better for every teacher: an MLP
teacher's student peaks near 900 iterations of a 3,252-iteration run and then falls to 0.59 of the
teacher (runs/RESULTS.md, "Teacher families"). Prints one markdown row per teacher (teacher, student
mean and spread, ratio, iterations, wall time, command). Finished runs in --out are read back, not
re-run.

    python runs/teacher_families.py --datasets mnist5k --seeds 0 1
    python runs/teacher_families.py --families resnet8 --budget 300 --seeds 0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from preset_table import CALIBRATION_ITERATIONS, iterations_within, row, run

from dfkd.config import load_config

RUNS = Path(__file__).parent
BASE = RUNS / "mnist5k_demo.yaml"  # the defaults on MNIST-5k, the recipe's settings left to it
USER_CNN = f"{os.path.relpath(RUNS / 'user_cnn.py')}:SmallCNN"  # valid from where the script runs
DATA = {"mnist5k": [], "fmnist": ["data.name=fashion_mnist"]}
BUDGET = {"mnist5k": 600.0, "fmnist": 1800.0}  # seconds of distilling per run, at most
RECIPE_ITERATIONS = load_config(BASE).train.iterations  # the default recipe's length
FAMILIES = {  # dataset -> [(row name, teacher arch, student arch)]
    "mnist5k": [
        ("lenet5", "lenet5", "lenet5_half"),
        ("lenet5_bn", "lenet5_bn", "lenet5_half"),
        ("resnet8", "resnet8", "lenet5_half"),
        ("wrn16_1", "wrn16_1", "lenet5_half"),
        ("mlp", "mlp", "lenet5_half"),
        ("torchvision.resnet18", "torchvision.resnet18", "lenet5_half"),
        ("user BN CNN", USER_CNN, "lenet5_half"),
    ],
    "fmnist": [
        ("lenet5_bn", "lenet5_bn", "lenet5_half"),
        ("resnet8", "resnet8", "lenet5_half"),
        ("wrn16_2", "wrn16_2", "wrn16_1"),
    ],
}


def stem(dataset: str, teacher: str) -> str:
    """The experiment's name and its run folders' prefix: mnist5k_resnet8, mnist5k_SmallCNN..."""
    return f"{dataset}_{teacher.rsplit(':', 1)[-1].replace('.', '_')}"


def family_overrides(dataset: str, teacher: str, student: str, extra: list[str]) -> list[str]:
    return [
        *DATA[dataset],
        f"name={stem(dataset, teacher)}",
        f"teacher.arch={teacher}",
        f"student.arch={student}",
        "tracking.mode=disabled",
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run")
    p.add_argument(
        "--budget", type=float, help="distilling seconds per run (default 600 MNIST-5k, 1800 FMNIST)"
    )
    p.add_argument(
        "--fill-budget",
        action="store_true",
        help=f"as many iterations as the budget allows, not at most the recipe's {RECIPE_ITERATIONS}",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S")
    p.add_argument("--datasets", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    p.add_argument("--families", nargs="+", metavar="NAME", help="only these rows (by row name)")
    p.add_argument("--out", type=Path, default=Path("outputs/teacher_families"), help="folder for the runs")
    args = p.parse_args(argv)
    for dataset in args.datasets:
        budget = args.budget or BUDGET[dataset]
        print(f"\n{dataset}, budget {budget:.0f} s per run, seeds {args.seeds}\n", flush=True)
        lines = [
            "| teacher → student | teacher | student mean (min–max) | ratio | iterations | wall | command |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, teacher, student in FAMILIES[dataset]:
            if args.families and name not in args.families:
                continue
            overrides = family_overrides(dataset, teacher, student, args.overrides)
            folder = args.out / stem(dataset, teacher)
            calibration = folder.with_name(f"{folder.name}_calibration")
            run(BASE, calibration, CALIBRATION_ITERATIONS, 0, overrides)
            fitting = iterations_within(budget, calibration)
            iterations = fitting if args.fill_budget else min(fitting, RECIPE_ITERATIONS)
            runs = [
                run(BASE, folder.with_name(f"{folder.name}_s{s}"), iterations, s, overrides, budget)
                for s in args.seeds
            ]
            label = f"{name} → {student}"
            lines.append(row(label, os.path.relpath(BASE), iterations, overrides, runs, budget))
            print(lines[-1], flush=True)
        print("\n" + "\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
