"""Two CPU processes under torchrun with the gloo backend: DDP keeps the ranks' students identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.dist
@pytest.mark.parametrize("method", [{}, {"name": "gankd", "beta": 0.1}])
def test_two_gloo_processes_keep_the_students_identical(tmp_path, method):
    config = {
        "teacher": {"epochs": 1},
        "generator": {"width": 4},
        "method": method,
        "train": {
            "iterations": 6,
            "batch_size": 16,
            "log_every": 2,
            "eval_every": 3,
            "sample_every": 3,
            "checkpoint_every": 3,
        },
        "tracking": {"mode": "disabled"},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(config))
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        "run",
        str(tmp_path / "cfg.yaml"),
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "DFKD_TEST_DUMP": str(dump), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    # DDP averaged the gradients: after six iterations the ranks hold the same student, bit for bit...
    s0, s1 = (torch.load(dump / f"student_rank{r}.pt") for r in (0, 1))
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    # ...although each trained on its own synthetic batches: as many, of the same shape, none shared.
    b0, b1 = (torch.load(dump / f"batches_rank{r}.pt") for r in (0, 1))
    steps = 6 * 5  # train.iterations x method.n_student_steps (the default, 5)
    assert b0.shape == b1.shape == (steps, 16, 1, 32, 32)
    assert not any(torch.equal(b0[i], b1[j]) for i in range(steps) for j in range(steps))
    # Rank 0 alone wrote the run: one record per logged step, one summary, one table on stdout.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss_S" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "eval/student_acc" in r] == [3, 6]
    assert json.loads((out / "summary.json").read_text())["iterations"] == 6
    assert done.stdout.count("student acc") == 1
    assert (out / "checkpoints" / "last.pt").is_file() and sorted(p.name for p in (out / "samples").iterdir())
