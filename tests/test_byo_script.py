"""runs/byo_teacher.py, the README's bring-your-own-teacher story, runs end to end (briefly)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_byo_teacher_script_runs_its_whole_story(tmp_path):
    out = tmp_path / "byo"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "runs" / "byo_teacher.py"),
            "--out",
            str(out),
            "--iterations",
            "2",
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        env={
            "WANDB_MODE": "disabled",
            "PATH": "",
            "HOME": str(tmp_path),
            "DFKD_CACHE": str(tmp_path / "cache"),
        },
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if line.strip())
    assert lines.keys() >= {"teacher", "student", "ratio", "wall"}
    assert (out / "teacher_state_dict.pt").is_file() and (out / "run" / "student.ts").is_file()
    assert sorted(p.name for p in (out / "holdout").iterdir()) == [str(c) for c in range(10)]
    assert sum(1 for _ in (out / "holdout").rglob("*.png")) == 1000
