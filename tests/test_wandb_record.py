"""The W&B record of a run equals its metrics.jsonl after a hard kill and after a rollback: read
back from the offline `.wandb` files, with a real wandb and no mocks."""

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dfkd.config import TrackingConfig
from dfkd.tracking import Tracker
from tests.conftest import flush_wandb

BLOCK = 32768  # a .wandb file is a log of 32 KiB blocks of checksummed chunks
HEADER = 7  # the file's ":W&B" magic and version; likewise each chunk's checksum, length and type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf records of a .wandb file, up to the first chunk a kill cut short."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, body = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        if len(chunk) < length:
            return
        pos += HEADER + length
        body = chunk if kind in (FULL, FIRST) else body + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(body)
            yield record


def wandb_runs(run_dir: Path) -> dict[str, dict]:
    """Every W&B run a run directory holds: {id: {group, tags, summary, history: {step: {key: value}}}}."""
    runs = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/*.wandb")):
        run = {
            "id": path.stem.removeprefix("run-"),
            "group": None,
            "tags": set(),
            "summary": {},
            "history": {},
        }
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["group"] = record.run.run_group
                run["tags"] |= set(record.run.tags)
            elif kind == "summary":
                items = record.summary.update
                run["summary"].update({item.key: json.loads(item.value_json) for item in items})
            elif kind == "history":
                items = record.history.item
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                step = row.pop("_step")
                run["history"].setdefault(step, {}).update(row)
        runs[run["id"]] = run
    return runs


def the_record(run_dir: Path) -> dict:
    """The W&B run no other one replaces: the record of the run."""
    runs = wandb_runs(run_dir)
    replaced = {run["summary"].get("dfkd/replaces") for run in runs.values()}
    (final,) = [run for name, run in runs.items() if name not in replaced]
    return final


def metrics_by_step(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.setdefault(record.pop("step"), {}).update(record)
    return out


def media(row: dict) -> set[str]:
    """The keys of a history row that hold media (an image is a dict of `<key>/_type`, `<key>/path` ...)."""
    return {k.removesuffix("/_type") for k in row if k.endswith("/_type")}


def numbers(history: dict[int, dict]) -> dict[int, dict]:
    """A W&B history without wandb's own keys (_runtime, _timestamp) and media."""
    rows = {}
    for step, row in history.items():
        files = media(row)
        rows[step] = {
            k: v for k, v in row.items() if not k.startswith("_") and k.rsplit("/", 1)[0] not in files
        }
    return {step: row for step, row in rows.items() if row}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_the_record_after_a_sigkill_and_resume_equals_metrics_jsonl(tmp_path, offline):
    from dfkd.checkpoint import load_safe

    (tmp_path / "exp.yaml").write_text("name: tiny\n")
    out = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "dfkd",
        "run",
        str(tmp_path / "exp.yaml"),
        "--out",
        str(out),
        "teacher.epochs=1",
        "generator.width=4",
        "train.batch_size=16",
        "train.log_every=1",
        "train.checkpoint_every=4",
        "train.eval_every=1000",
        "train.sample_every=1000",
        "tracking.mode=offline",
        "--no-progress",
    ]
    proc = subprocess.Popen(
        [*args, "--iterations", "100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # past the checkpoint at 8, mid-interval
        lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        if any(json.loads(line)["step"] >= 10 for line in lines[:-1]):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    killed = the_record(out)
    step = load_safe(out / "checkpoints" / "last.pt")["step"]
    assert step >= 8
    done = subprocess.run([*args, "--resume", "--iterations", str(step + 5)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    record, expected = the_record(out), metrics_by_step(out)
    assert numbers(record["history"]) == expected
    assert sorted(expected) == list(range(step + 6)), "every step 0 ... end, each once"
    assert expected[step]["resume/train.iterations"] == step + 5  # logged at the step replayed last
    assert record["summary"]["dfkd/replaces"] == killed["id"]
    assert record["summary"]["dfkd/replayed_to"] == step
    assert record["group"] == killed["id"] and record["id"].startswith(killed["id"] + "-")


def test_the_record_after_a_rollback_equals_metrics_jsonl(tiny, run_of, tmp_path, offline):
    train = {"iterations": 8, "log_every": 2, "checkpoint_every": 4, "eval_every": 8, "sample_every": 4}
    cfg = tiny(train=train, tracking={"mode": "offline"})
    run = run_of(cfg, tmp_path)
    inner, poisoned = run.step, []

    def step():  # a NaN in one student weight at step 5, once: caught at 6, rolled back to 4
        out = inner()
        if run.iterations_done == 5 and not poisoned:
            poisoned.append(5)
            with torch.no_grad():
                next(run.game.student.parameters()).view(-1)[0] = float("nan")
        return out

    run.step = step
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "W&B disabled" along the way
        run.fit()
    assert run.rollbacks == 1
    flush_wandb()

    record, expected = the_record(tmp_path), metrics_by_step(tmp_path)
    assert expected[4]["health/rollbacks"] == 1 and expected[4]["health/diverged_at"] == 6
    assert numbers(record["history"]) == expected
    images = sorted(s for s, row in record["history"].items() if "train/samples" in media(row))
    assert images == [4, 8], "the image logged before the rollback is replayed"
    first = wandb_runs(tmp_path)[run.run_id]
    assert "superseded" in first["tags"] and first["summary"]["dfkd/superseded_by"] == record["id"]
    assert record["summary"]["dfkd/replaces"] == run.run_id and record["group"] == run.run_id


def test_the_fallback_warning_says_how_long_it_waited(tmp_path):
    tracker = Tracker(tmp_path, TrackingConfig(mode="disabled", init_timeout=60), {}, "abc")
    assert tracker._unreached(TimeoutError("deadline exceeded"), 60.4) == (
        "W&B server not reached within 60 s (tracking.init_timeout; TimeoutError)"
    )
    message = tracker._unreached(ConnectionRefusedError("connection refused\nmore"), 0.31)
    assert message == "W&B server not reached: ConnectionRefusedError after 0.3 s: connection refused"
