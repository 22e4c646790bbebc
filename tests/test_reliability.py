"""Faults a long run meets: signals, divergence, a longer resume, a full disk, a student that learns
nothing. Each test checks what the README's "When things go wrong" promises."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from dfkd.checkpoint import load_safe
from dfkd.config import with_settings
from dfkd.errors import DfkdError

TINY = [
    "teacher.epochs=1",
    "generator.width=8",
    "train.batch_size=64",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.sample_every=1000",
    "train.checkpoint_every=1000",
    "tracking.mode=disabled",
    "--no-progress",
]


def dfkd(out, *extra):
    return [sys.executable, "-m", "dfkd", "demo", "--iterations", "60", *TINY, "--out", str(out), *extra]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(path, step, timeout_s=120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if path.exists() and any(
            json.loads(line).get("step", 0) >= step
            for line in path.read_text().splitlines()
            if line.endswith("}")
        ):
            return
        time.sleep(0.01)
    raise AssertionError(f"no record of step {step} in {path}")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run the interrupted ones must end identical to."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert subprocess.run(dfkd(out), capture_output=True).returncode == 0
    return out


def assert_same_tensors(a: dict, b: dict, where: str) -> None:
    for part in ("state_dict", "student", "generator", "ema", "opt_s", "opt_g"):
        if part in a:
            flat_a, flat_b = _tensors(a[part]), _tensors(b[part])
            assert flat_a.keys() == flat_b.keys(), f"{where}: {part} keys"
            assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), f"{where}: {part} differs"


def _tensors(tree, prefix=""):
    if torch.is_tensor(tree):
        return {prefix: tree}
    items = (
        tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    )
    out = {}
    for k, v in items:
        out.update(_tensors(v, f"{prefix}/{k}"))
    return out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_then_resume_is_bitwise_identical(tmp_path, whole, signum):
    out = tmp_path / "run"
    proc = subprocess.Popen(dfkd(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(out / "metrics.jsonl", 15)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    step = load_safe(out / "checkpoints" / "last.pt")["step"]
    assert 15 <= step < 60, "interrupted mid-run"
    assert subprocess.run(dfkd(out, "--resume"), capture_output=True).returncode == 0
    for name in ("student.pt", "checkpoints/last.pt"):
        assert_same_tensors(load_safe(whole / name), load_safe(out / name), name)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]  # noqa: E731
    # the interval cut by the signal is averaged over fewer iterations; every other record is equal
    same = [r for r in strip(records(out)) if r["step"] <= step or r["step"] > step + 1]
    assert same == [r for r in strip(records(whole)) if r["step"] <= step or r["step"] > step + 1]


class NaNAt:
    """Makes iteration `at` put a NaN into a student weight, every time the run passes it."""

    def __init__(self, run, at):
        self.run, self.at, self.inner = run, at, run.game.iteration
        run.game.iteration = self

    def __call__(self, step):
        out = self.inner(step)
        if step + 1 == self.at:
            with torch.no_grad():
                next(self.run.game.student.parameters()).view(-1)[0] = float("nan")
        return out


def test_rollbacks_compound_and_each_retry_draws_new_latents(tiny, tmp_path, run_of):
    cfg = tiny(
        train={
            "iterations": 8,
            "log_every": 2,
            "checkpoint_every": 2,
            "eval_every": 8,
            "sample_every": 8,
            "max_rollbacks": 3,
        }
    )
    run = run_of(cfg, tmp_path)
    NaNAt(run, at=3)
    seen, roll_back = [], run.roll_back

    def spy(cause, tracker):
        roll_back(cause, tracker)
        seen.append(
            (run.game.student_player.lr, run.game.generator_player.lr, run.game.latent_rng.get_state())
        )

    run.roll_back = spy
    with pytest.raises(DfkdError, match="after 3 rollback"):
        run.fit()
    lr_s, lr_g = seen[0][0] / 0.5, seen[0][1] / 0.5
    assert [round(s / lr_s, 6) for s, _, _ in seen] == [0.5, 0.25, 0.125]
    assert [round(g / lr_g, 6) for _, g, _ in seen] == [0.5, 0.25, 0.125]
    states = [state for _, _, state in seen]
    assert not torch.equal(states[0], states[1]) and not torch.equal(states[1], states[2])


def test_a_longer_resume_continues_the_cosine_as_if_planned_for_its_length(tiny, tmp_path, run_of):
    short = tiny(train={"iterations": 4})
    run_of(short, tmp_path / "run").fit()
    longer = with_settings(short, {"train.iterations": 8})
    resumed = run_of(longer, tmp_path / "run")
    resumed.resume()
    base = longer.student_optim.lr
    # half way through an 8-iteration cosine, not its end (0) nor its start
    assert resumed.game.student_player.lr == pytest.approx(base * (1 + math.cos(math.pi * 4 / 8)) / 2)
    rates = []
    inner = resumed.step
    resumed.step = lambda: (rates.append(resumed.game.student_player.lr), inner())[1]
    resumed.fit()
    planned = [base * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(4, 8)]
    assert rates == pytest.approx(planned, rel=1e-5)
    assert any(r == {"step": 4, "resume/train.iterations": 8} for r in records(tmp_path / "run"))


def test_a_longer_resume_replans_each_generators_cosine_over_its_own_turns(tiny, tmp_path, run_of):
    short = tiny(
        train={"iterations": 4},
        method={"n_generators": 2, "replay_size": 64},
        generator_optim={"schedule": "cosine"},
    )
    run_of(short, tmp_path / "run").fit()  # two turns each: both at the end of their cosine
    resumed = run_of(with_settings(short, {"train.iterations": 8}), tmp_path / "run")
    resumed.resume()
    # two of each one's four turns played: half way through its cosine
    base = short.generator_optim.lr
    assert [p.lr for p in resumed.game.generator_players] == pytest.approx([base / 2, base / 2])


def test_a_resume_may_lower_the_learning_rate_and_records_it(tiny, tmp_path, run_of):
    cfg = tiny(train={"iterations": 6})
    assert run_of(cfg, tmp_path).fit(stop_at=2) is None
    lower = with_settings(cfg, {"student_optim.lr": cfg.student_optim.lr / 10})
    resumed = run_of(lower, tmp_path)
    before = load_safe(tmp_path / "checkpoints" / "last.pt")["opt_s"]["param_groups"][0]["lr"]
    resumed.resume()
    assert resumed.game.student_player.lr == pytest.approx(before / 10)
    resumed.fit()
    assert {"step": 2, "resume/student_optim.lr": cfg.student_optim.lr / 10} in records(tmp_path)
    with pytest.raises(DfkdError, match="config differs from the saved run in method.loss"):
        run_of(with_settings(cfg, {"method.loss": "l1"}), tmp_path).resume()


def test_stale_checkpoint_temp_files_are_removed(tiny, tmp_path, run_of):
    cfg = tiny(train={"iterations": 4})
    run_of(cfg, tmp_path).fit(stop_at=2)
    debris = [tmp_path / "checkpoints" / f".last.pt.{i}.tmp" for i in range(3)]
    for path in debris:
        path.write_bytes(b"half a checkpoint")
    resumed = run_of(cfg, tmp_path)
    resumed.resume()
    resumed.fit()
    assert not any(path.exists() for path in debris)


def test_a_full_disk_keeps_the_last_good_checkpoint(tiny, tmp_path, run_of):
    cfg = tiny(train={"iterations": 4, "checkpoint_every": 2})
    probe = run_of(cfg, tmp_path / "probe")
    size = probe.save_checkpoint().stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    # room for one checkpoint, not for a second one beside it (each is written next to the last)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5)}", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"THIS TEST COULD NOT RUN: a small tmpfs cannot be mounted here ({mounted.stderr.strip()})"
        )
    try:
        run = run_of(cfg, disk / "run")
        with pytest.raises(DfkdError) as err:
            run.fit()
        message = str(err.value)
        assert message.startswith("no space left on device while writing ") and "\n" not in message
        assert "the last good checkpoint (step 0) is kept" in message
        assert load_safe(disk / "run" / "checkpoints" / "last.pt")["step"] == 0
        assert not list((disk / "run" / "checkpoints").glob(".*.tmp"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_student_that_learns_nothing_is_reported(tiny, tmp_path, run_of, capsys):
    every = {"log_every": 20, "eval_every": 20, "sample_every": 60, "checkpoint_every": 60}
    cfg = tiny(train={"iterations": 60, **every}, student_optim={"lr": 1e6})
    summary = run_of(cfg, tmp_path).fit()
    assert summary["student_acc"] < 20
    flags = [r["health/student_near_chance"] for r in records(tmp_path) if "health/student_near_chance" in r]
    assert flags == [0.0, 0.0, 1.0]  # judged from JUDGE_LEARNING_AFTER (50) iterations on
    assert "near chance" in capsys.readouterr().err
    short = tiny(train={"iterations": 20, **every, "eval_every": 5}, student_optim={"lr": 1e6})
    run_of(short, tmp_path / "short").fit()
    assert "near chance" not in capsys.readouterr().err  # too early to judge
    healthy = run_of(tiny(train={"iterations": 60, **every}), tmp_path / "healthy")
    healthy.report.evaluate = lambda *a: {"eval/student_acc": 80.0}  # a student far above chance
    healthy.fit()
    assert all(r.get("health/student_near_chance", 0.0) == 0.0 for r in records(tmp_path / "healthy"))
