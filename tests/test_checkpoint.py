import pickle

import pytest
import torch

from dfkd.checkpoint import load_safe, save_atomic
from dfkd.errors import DfkdError
from dfkd.models import build_classifier
from dfkd.classifier_files import load_classifier
from dfkd.teachers import save_classifier
from dfkd.trainer import Trainer


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        save_atomic({"a": Boom()}, path)
    assert torch.equal(load_safe(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"], "no temporary file is left behind"


class CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "teacher.pt"
    torch.save({"state_dict": {}, "meta": CreatesFile(str(marker))}, bad)
    assert not marker.exists()
    with pytest.raises(DfkdError, match="refusing to load.*convert it once"):
        load_classifier(bad)
    assert not marker.exists()
    # plain pickle too (not a zip archive)
    with open(bad, "wb") as f:
        pickle.dump(CreatesFile(str(marker)), f)
    with pytest.raises(DfkdError):
        load_safe(bad)
    assert not marker.exists()


def test_corrupt_missing_and_misfit_checkpoints(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DfkdError, match="unreadable or corrupt"):
        load_safe(junk)
    with pytest.raises(DfkdError, match="not found"):
        load_safe(tmp_path / "missing.pt")
    model = build_classifier("lenet5_half", 1, 10, 32)
    path = tmp_path / "s.pt"
    save_classifier(path, model, {"arch": "lenet5", "num_classes": 10, "in_channels": 1, "image_size": 32})
    with pytest.raises(DfkdError, match="does not fit its architecture"):
        load_classifier(path)


def test_classifier_round_trip(tmp_path):
    model = build_classifier("lenet5", 1, 10, 32)
    meta = {"arch": "lenet5", "num_classes": 10, "in_channels": 1, "image_size": 32, "test_acc": 12.5}
    save_classifier(tmp_path / "t.pt", model, meta)
    loaded, meta2 = load_classifier(tmp_path / "t.pt")
    assert meta2 == meta
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("method", [{"reuse_samples": True}, {"replay_size": 40}, {"generator_ema": 0.9}])
def test_resumed_run_ends_where_the_uninterrupted_one_does(tiny, tmp_path, method):
    cfg = tiny(method=method, train={"student_ema": 0.9, "iterations": 6, "checkpoint_every": 3})
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.fit()

    assert Trainer(cfg, tmp_path / "split", progress=False).fit(stop_at=3) is None
    resumed = Trainer(cfg, tmp_path / "split", progress=False)
    resumed.load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert resumed.step == 3
    resumed.fit()
    for a, b in [(full.student, resumed.student), (full.generator, resumed.generator), (full.ema, resumed.ema)]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), name
    steps = [line for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len((tmp_path / "full" / "metrics.jsonl").read_text().splitlines())


def test_resume_refuses_a_different_config(tiny, tmp_path):
    Trainer(tiny(), tmp_path, progress=False).fit()
    other = Trainer(tiny(method={"loss": "l1"}), tmp_path, progress=False)
    with pytest.raises(DfkdError, match="config differs from the saved run in method"):
        other.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
