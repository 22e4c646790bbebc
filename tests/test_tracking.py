import json
import warnings

import pytest

from dfkd.config import TrackingConfig
from dfkd.tracking import Tracker, resolve_mode
from tests.conftest import flush_wandb


def test_real_offline_wandb_run_writes_its_files(tiny, tmp_path, run_of, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary = run_of(tiny(tracking={"mode": "offline"}), tmp_path).fit()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files), files
    # the run directory: config, metrics, summary, the student, the checkpoint and the sample grids
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "student.pt", "checkpoints/last.pt"]:
        assert (tmp_path / name).exists(), name
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert set(summary) >= {
        "teacher_acc",
        "student_acc",
        "best_student_acc",
        "iterations",
        "wall_s",
        "images_per_s",
    }
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r for r in records)
    keys = {k for r in records for k in r if k != "step"}
    sections = {"train", "eval", "perf", "teacher", "health", "pool"}
    assert keys and all(k.split("/")[0] in sections for k in keys)
    assert {"train/loss_S", "train/loss_G", "eval/student_acc", "teacher/acc"} <= keys


def test_online_without_credentials_goes_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert resolve_mode(TrackingConfig(mode="online")) == "offline"
    assert resolve_mode(TrackingConfig(mode="disabled")) == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode(TrackingConfig(mode="offline")) == "disabled"


def test_a_tracker_failure_never_stops_training(tiny, tmp_path, run_of, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(UserWarning, match="W&B disabled.*no route to host"):
        summary = run_of(tiny(), tmp_path).fit()
    assert summary["iterations"] == 4
    assert (tmp_path / "metrics.jsonl").exists()


def test_failure_during_logging_is_contained(tmp_path):
    class Exploding:
        def log(self, *a, **k):
            raise RuntimeError("socket closed")

    tracker = Tracker(tmp_path, TrackingConfig(mode="disabled"), {}, "abc")
    tracker.run = Exploding()
    with pytest.warns(UserWarning, match="socket closed"):
        tracker.log({"train/x": 1.0}, step=1)
    assert tracker.run is None
    tracker.log({"train/x": 2.0}, step=2)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_evaluation_need_not_fall_on_a_log_step(tiny, tmp_path, run_of):
    run = run_of(tiny(train={"log_every": 3, "eval_every": 2}), tmp_path, progress=True)
    per_step, step = [], run.step

    def spied():  # each iteration's own metrics, to check what the log steps average
        out = step()
        per_step.append({k: v.item() for k, v in out.items()})
        return out

    run.step = spied
    summary = run.fit()
    assert summary["iterations"] == 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss_S" in r] == [3, 4]  # every 3, and the last step
    evals = [r for r in records if "eval/student_acc" in r]
    assert [r["step"] for r in evals] == [2, 4]  # every 2, whether or not it is a log step
    assert not any("train/loss_S" in r for r in records if r["step"] == 2)
    assert summary["best_student_acc"] == max(r["eval/student_acc"] for r in evals)
    assert evals[-1]["eval/best_student_acc"] == summary["best_student_acc"]
    # a log step averages the iterations since the one before: 1-3, then 4 alone
    logged = {r["step"]: r for r in records if "train/loss_S" in r}
    for at, iterations in ((3, per_step[0:3]), (4, per_step[3:4])):
        for key in ("train/loss_S", "train/loss_G", "train/top_class_frac"):
            mean = sum(m[key] for m in iterations) / len(iterations)
            assert logged[at][key] == pytest.approx(mean, rel=1e-5), (at, key)


def test_online_without_network_falls_back_to_offline_in_bounded_time(tiny, tmp_path, run_of, monkeypatch):
    import socket
    import time

    # A server that accepts connections and never answers: the worst case, a silent network.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
    cfg = tiny(tracking={"mode": "online", "init_timeout": 5.0})
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = run_of(cfg, tmp_path).fit()
    silent.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert any("not reached within 5 s" in m and "logging offline" in m for m in messages), messages
    assert not any("W&B disabled" in m for m in messages), "the offline run itself must work"
    assert time.perf_counter() - start < 90
    assert summary["iterations"] == 4
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    flush_wandb()
    assert any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in offline.iterdir())
