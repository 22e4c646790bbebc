"""Divergence is caught and rolled back; a collapsing generator is flagged."""

import json

import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.health import CollapseMonitor, CollapseWatch, first_non_finite


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_first_non_finite_names_the_culprit():
    model = torch.nn.Linear(2, 2)
    losses = {"train/loss_S": torch.tensor(1.0), "train/loss_G": torch.tensor(2.0)}
    assert first_non_finite(losses, {"student": model}) is None
    infinite = {**losses, "train/loss_G": torch.tensor(float("inf"))}
    assert first_non_finite(infinite, {"student": model}) == "train/loss_G"
    with torch.no_grad():
        model.bias[1] = float("nan")
    assert first_non_finite(losses, {"student": model}) == "student parameters"


class Poison:
    """Wraps Run.step: at step `at`, put a NaN into one student weight, once or every time the run
    passes that step (after each rollback)."""

    def __init__(self, run, at, every_time=False):
        self.run, self.at, self.every_time, self.inner = run, at, every_time, run.step
        run.step = self

    def __call__(self):
        out = self.inner()
        if self.run.iterations_done == self.at:  # the step this iteration completed
            with torch.no_grad():
                next(self.run.game.student.parameters()).view(-1)[0] = float("nan")
            self.at = self.at if self.every_time else None
        return out


def test_a_nan_in_the_student_is_caught_and_rolled_back(tiny, tmp_path, run_of):
    cfg = tiny(
        train={"iterations": 8, "log_every": 2, "checkpoint_every": 4, "eval_every": 8, "sample_every": 8}
    )
    run = run_of(cfg, tmp_path)
    lr_before = run.cfg.student_optim.lr
    Poison(run, at=5)
    summary = run.fit()
    assert summary["iterations"] == 8 and run.rollbacks == 1
    assert run.non_finite({}) is None
    # caught at the first log step after the NaN (6), rolled back to the checkpoint at 4
    rollback = [r for r in records(tmp_path) if "health/rollbacks" in r]
    assert rollback == [{"step": 4, "health/rollbacks": 1, "health/diverged_at": 6}]
    # learning rates halved: the schedule's base rate and the optimizer's current one
    players = run.game.players
    assert players["s"].schedule.base_lrs == [lr_before * 0.5]
    assert players["g"].schedule.base_lrs == [run.cfg.generator_optim.lr * 0.5]
    steps = [r["step"] for r in records(tmp_path) if "train/loss_S" in r]
    assert steps == [2, 4, 6, 8], "records past the checkpoint were dropped and logged again"
    deployed = run.game.deployed_student.state_dict().values()
    assert all(torch.isfinite(v).all() for v in deployed if v.is_floating_point())


def test_persistent_divergence_stops_with_a_clear_error_and_keeps_the_good_checkpoint(tiny, tmp_path, run_of):
    cfg = tiny(train={"iterations": 8, "max_rollbacks": 2, "checkpoint_every": 2})
    run = run_of(cfg, tmp_path)
    Poison(run, at=3, every_time=True)
    with pytest.raises(DfkdError, match=r"diverged: non-finite .* at step 4, after 2 rollback\(s\); lower"):
        run.fit()
    from dfkd.checkpoint import load_safe

    good = load_safe(run.checkpoint_path)
    assert good["step"] == 2
    assert all(torch.isfinite(v).all() for v in good["student"].values() if v.is_floating_point())


def test_collapse_monitor_needs_a_sustained_streak():
    monitor = CollapseMonitor(threshold=0.9, patience=3)
    assert [monitor.update(f) for f in [0.95, 0.95, 0.5, 0.95, 0.95, 0.99, 1.0]] == [
        False,
        False,
        False,
        False,
        False,
        True,
        True,
    ]


def test_each_generator_is_watched_on_its_own_batches():
    watch = CollapseWatch([CollapseMonitor(threshold=0.9, patience=2) for _ in range(2)])
    for turn in range(4):  # generator 0 makes one-class batches, generator 1 varied ones
        watch.record(turn % 2, torch.tensor(1.0 if turn % 2 == 0 else 0.2))
    means = watch.interval_means()
    assert means == {0: 1.0, 1: pytest.approx(0.2)} and watch.interval_means() == {}, "a new interval"
    assert watch.update(means) == ([], False)
    assert watch.update(means) == ([0], True), "generator 0 after two intervals"
    assert watch.update({1: 0.2}) == ([], True), "still collapsed while it did not play"
    assert watch.update({0: 1.0}) == ([], True), "collapsed, but not just now"


def test_a_collapsed_generator_is_flagged(tiny, tmp_path, run_of, capsys):
    class OneClassTeacher(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 10)
            logits[:, 3] = 5.0
            return logits + 0 * x.sum()  # keeps the generator's graph connected

    # collapse_action warn: flagged and warned about, the generator left as it is
    cfg = tiny(train={"iterations": 6, "log_every": 1, "collapse_patience": 2, "collapse_action": "warn"})
    run = run_of(cfg, tmp_path)
    run.game.pool.models = [OneClassTeacher()]  # the pool picks each iteration's teacher from these
    run.fit()
    flags = [r["health/collapse"] for r in records(tmp_path) if "health/collapse" in r]
    assert flags == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    err = capsys.readouterr().err
    assert err.count("generator collapse?") == 1, "warned once, not every interval"
