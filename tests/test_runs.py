"""Every shipped experiment file loads, and the promises the README quotes (slow)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dfkd.config import ExperimentConfig, load_config

RUNS = sorted(Path(__file__).parent.parent.joinpath("runs").glob("*.yaml"))


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_experiment_files_load(path):
    load_config(path)


def test_demo_file_spells_out_the_defaults():
    demo = load_config(Path(__file__).parent.parent / "runs" / "mnist5k_demo.yaml")
    demo.name = ExperimentConfig.name
    assert demo == load_config()


def run_cli(tmp_path, *args) -> dict:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dfkd", *args, "--out", str(out), "--no-progress", "tracking.mode=disabled"]
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_demo_student_reaches_95_percent_of_teacher(tmp_path):
    summary = run_cli(tmp_path, "demo")
    print(json.dumps(summary))
    assert summary["teacher_acc"] > 95
    assert summary["student_acc"] / summary["teacher_acc"] >= 0.95


# runs/fmnist_lenet5.yaml measured 0.820 of the teacher (runs/RESULTS.md); the goal is 0.90,
# not reached yet. This guards the measured level against regressions.
FMNIST_MIN_RATIO = 0.78


@pytest.mark.slow
@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_recipe_keeps_its_measured_level(tmp_path):
    summary = run_cli(tmp_path, "run", str(Path(__file__).parent.parent / "runs" / "fmnist_lenet5.yaml"))
    print(json.dumps(summary))
    assert summary["teacher_acc"] > 85
    assert summary["student_acc"] / summary["teacher_acc"] >= FMNIST_MIN_RATIO
