"""The presets at an equal wall-clock budget, several seeds each: the table in runs/RESULTS.md.

For each dataset and preset a short calibration run measures the seconds one iteration takes on this
machine, apart from its evaluations (every run evaluates four times); the preset then runs as many
iterations as the budget leaves room for (its schedules fit to that count, the budget its time
limit) once per seed, and the script prints a markdown table with the command that reproduces each
row. Finished runs in --out are read back, not re-run, so an interrupted table continues where it
stopped; a run of another length (another --budget) is run again.

    python runs/preset_table.py --budget 120 --seeds 0 1 perf.autocast=bf16 perf.channels_last=true
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dfkd.cli import main as dfkd

RUNS = Path(__file__).parent
PRESETS = {  # dataset -> (preset name, experiment file); "best" is the project's own recipe
    "mnist5k": [
        ("DFAD", "mnist5k_dfad"),
        ("ZSKT", "mnist5k_zskt"),
        ("DAFL", "mnist5k_dafl"),
        ("DFQ", "mnist5k_dfq"),
        ("dfkd demo", "mnist5k_demo"),
        ("best", "mnist5k_recipe"),
    ],
    "fmnist": [
        ("DFAD", "fmnist_dfad"),
        ("ZSKT", "fmnist_zskt"),
        ("DAFL", "fmnist_dafl"),
        ("DFQ", "fmnist_dfq"),
        ("best", "fmnist_lenet5"),
    ],
}
CALIBRATION_ITERATIONS = 20


def settings(overrides: list[str], iterations: int, time_limit: float = 0.0) -> list[str]:
    """Every run's overrides, its time limit (0: none), and four evaluations per run. The budget is
    each measured run's time limit: a long run's iteration has taken up to 16 % longer than the
    20 of its calibration (runs/RESULTS.md)."""
    limit = [f"train.time_limit={time_limit:g}"] if time_limit else []
    return [*overrides, *limit, f"train.eval_every={max(1, iterations // 4)}", f"--iterations={iterations}"]


def run(
    config: Path, out: Path, iterations: int, seed: int, overrides: list[str], time_limit: float = 0.0
) -> dict:
    """One run, or the summary of the finished one already in `out` if it was planned as long and,
    where a time limit cut it short, under this one."""
    summary = out / "summary.json"
    if summary.exists():
        finished = json.loads(summary.read_text())
        planned = finished.get("planned_iterations", finished.get("iterations"))
        cut_by_another = finished.get("time_limit_reached") and finished.get("time_limit") != time_limit
        if planned == iterations and not cut_by_another:
            return finished
    argv = [
        "run",
        str(config),
        *settings(overrides, iterations, time_limit),
        f"--seed={seed}",
        f"--out={out}",
        "--overwrite",
        "--no-progress",
    ]
    if dfkd(argv) != 0:
        raise SystemExit(f"preset_table: the run in {out} failed; see its output above")
    return json.loads(summary.read_text())


def iterations_within(budget: float, calibration: Path) -> int:
    """How many iterations fit in `budget` seconds, by the finished calibration run in `calibration`.
    The calibration and every run evaluate four times (settings), so the seconds its evaluations
    took (`perf/eval_s`) are a fixed cost of each run, not a cost per iteration: a large student's
    four passes over the test set took half of a 20-iteration calibration (WRN-16-1 on
    Fashion-MNIST: 84 of 178 s), which halved the iterations its runs were given."""
    summary = json.loads((calibration / "summary.json").read_text())
    metrics = calibration / "metrics.jsonl"  # absent in a calibration a test writes by hand
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    evaluating = sum(json.loads(line).get("perf/eval_s", 0.0) for line in lines if line.strip())
    per_iteration = max(summary["wall_s"] - evaluating, 1e-9) / summary["iterations"]
    return max(1, int((budget - evaluating) / per_iteration))


def row(
    name: str, config: str, iterations: int, overrides: list[str], runs: list[dict], time_limit: float = 0.0
) -> str:
    accs = [r["student_acc"] for r in runs]
    ratios = [r["student_acc"] / r["teacher_acc"] for r in runs]
    spread = f"{min(accs):.2f}–{max(accs):.2f}" if len(accs) > 1 else "one seed"
    wall = statistics.mean(r["wall_s"] for r in runs)
    done = [r["iterations"] for r in runs]
    length = (
        str(iterations)
        if set(done) == {iterations}
        else f"{iterations} ({' / '.join(map(str, done))} in the time limit)"
    )
    command = " ".join(["dfkd run", config, *settings(overrides, iterations, time_limit), "--seed=S"])
    return (
        f"| {name} | {runs[0]['teacher_acc']:.2f} | {statistics.mean(accs):.2f} ({spread}) | "
        f"{statistics.mean(ratios):.3f} | {length} | {wall:.0f} s | `{command}` |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotted overrides for every run, e.g. perf.autocast=bf16",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="distilling wall time per run (default 120)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S")
    p.add_argument("--datasets", nargs="+", choices=sorted(PRESETS), default=sorted(PRESETS))
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/preset_table"),
        help="folder for the runs (default outputs/preset_table)",
    )
    args = p.parse_args(argv)
    for dataset in args.datasets:
        print(f"\n{dataset}, budget {args.budget:.0f} s per run, seeds {args.seeds}\n", flush=True)
        lines = [
            "| preset | teacher | student mean (min–max) | ratio | iterations | wall | command |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, stem in PRESETS[dataset]:
            config = RUNS / f"{stem}.yaml"
            calibration = args.out / f"{stem}_calibration"
            run(config, calibration, CALIBRATION_ITERATIONS, 0, args.overrides)
            iterations = iterations_within(args.budget, calibration)
            runs = [
                run(config, args.out / f"{stem}_s{s}", iterations, s, args.overrides, args.budget)
                for s in args.seeds
            ]
            lines.append(row(name, f"runs/{stem}.yaml", iterations, args.overrides, runs, args.budget))
            print(lines[-1], flush=True)
        print("\n" + "\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
