"""runs/memory_student.py: a fresh student trained offline on finished runs' replay memories."""

from pathlib import Path

import pytest
import torch

from dfkd.losses import kl


@pytest.fixture
def memory_student(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "runs"))
    import memory_student

    return memory_student


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """Two finished tiny runs with a replay memory of 64 images each, and one without a memory."""
    from conftest import make_run, tiny_config

    root = tmp_path_factory.mktemp("runs")
    for name, replay in (("a", 64), ("b", 64), ("none", 0)):
        cfg = tiny_config(method={"replay_size": replay}, train={"seed": len(name)})
        make_run(cfg, root / name).fit()
    return root


def test_it_trains_on_the_memories_of_every_run_given_and_reads_the_test_images(
    finished_runs, memory_student, capsys
):
    runs = [str(finished_runs / "a"), str(finished_runs / "b")]
    assert memory_student.main([*runs, "--steps", "8", "--arch", "lenet5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "lenet5 on 128 images of 2 run(s), 8 steps"
    assert [line.split(":")[0] for line in lines[1:]] == ["step 2", "step 4", "step 6", "step 8"]
    assert all(0.0 <= float(line.split(": ")[1].split(" %")[0]) <= 100.0 for line in lines[1:])


def test_the_offline_student_comes_to_match_the_stored_logits(finished_runs, memory_student):
    images, logits = memory_student.memory_of(finished_runs / "a")
    assert images.shape == (64, 1, 32, 32) and logits.shape == (64, 10)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 10))
    before = kl(student(images), logits).item()
    *_, (step, trained) = memory_student.train_offline(student, images, logits, steps=200, lr=1e-2, seed=0)
    assert step == 200 and kl(trained(images), logits).item() < 0.5 * before


def test_a_run_without_a_memory_is_refused_in_one_line(finished_runs, memory_student, capsys):
    assert memory_student.main([str(finished_runs / "none"), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method.replay_size was 0" in err
    assert memory_student.main([str(finished_runs / "missing"), "--steps", "4"]) == 2
    assert "no checkpoints/last.pt" in capsys.readouterr().err
