import json
import pickle
from pathlib import Path

import pytest
import torch

from dfkd.checkpoint import load_safe, save_atomic
from dfkd.classifier_files import load_classifier
from dfkd.errors import DfkdError
from dfkd.models import build_classifier
from dfkd.teachers import save_classifier


def test_atomic_save_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):  # the writer's own error, unchanged
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
    with pytest.raises(DfkdError, match=r"holds code \(io\.open\) and was refused; it was not run"):
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
    assert meta2 == {**meta, "format": "dfkd"}  # the loader says which kind of file it read
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(loaded(x), model(x))


def records(run_dir):
    """metrics.jsonl without its timings (perf/), which no two runs share."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in lines]


CONTRAST = {"method": {"contrast": 0.8, "contrast_bank": 40}, "teacher": {"arch": "lenet5_bn", "epochs": 1}}


@pytest.mark.parametrize(
    "sections",
    [
        {"method": {"reuse_samples": True}},
        {"method": {"replay_size": 40}},
        # the twins draw from the run's RNG
        {"method": {"replay_size": 40, "replay_pen_width": 1.0, "replay_elastic": 34.0}},
        {"method": {"generator_ema": 0.9}},
        CONTRAST,
        {"method": {"meta_generator": "fomaml", "n_generator_steps": 2}},
        {"method": {"n_generators": 2, "replay_size": 40}},  # resumed at step 3: the second's turn
    ],
)
def test_resumed_run_ends_where_the_uninterrupted_one_does(tiny, tmp_path, run_of, sections):
    # Log steps fall on the checkpoint, so that both runs average their metrics over the same steps.
    train = {"student_ema": 0.9, "iterations": 6, "checkpoint_every": 3, "log_every": 3}
    cfg = tiny(train=train, **sections)
    full = run_of(cfg, tmp_path / "full")
    full.fit()

    assert run_of(cfg, tmp_path / "split").fit(stop_at=3) is None
    resumed = run_of(cfg, tmp_path / "split")
    resumed.resume(tmp_path / "split" / "checkpoints" / "last.pt")
    assert resumed.iterations_done == 3
    resumed.fit()
    a, b = full.game.networks, resumed.game.networks
    assert {"student", "generator", "ema"} <= a.keys() and a.keys() == b.keys()
    assert ("contrast" in a) == ("contrast" in sections["method"])  # the head and its bank resume too
    assert ("generator_meta" in a) == ("meta_generator" in sections["method"])  # and the meta start
    assert ("generator_1" in a) == ("n_generators" in sections["method"])  # and every generator
    for key in a:
        for (name, x), y in zip(a[key].state_dict().items(), b[key].state_dict().values()):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f"{key}.{name}"
    split, whole = records(tmp_path / "split"), records(tmp_path / "full")
    assert [r["step"] for r in whole if "train/loss_S" in r] == [3, 6]
    assert split == whole


def test_a_checkpoint_from_before_per_generator_collapse_state_still_resumes(tiny, tmp_path, run_of):
    cfg = tiny(method={"replay_size": 40}, train={"iterations": 4, "checkpoint_every": 2, "log_every": 2})
    assert run_of(cfg, tmp_path).fit(stop_at=2) is None
    path = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["collapse_streak"] = 1  # one number for the one monitor, and no owners in the memory
    del state["memory"]["owners"]
    torch.save(state, path)
    resumed = run_of(cfg, tmp_path)
    resumed.resume(path)
    assert [m.streak for m in resumed.collapse.monitors] == [1]
    assert resumed.game.batches.memory.owners[: resumed.game.batches.memory.size].eq(0).all()
    resumed.fit()
    assert resumed.iterations_done == 4


def test_resume_refuses_a_different_config(tiny, tmp_path, run_of):
    run_of(tiny(), tmp_path).fit()
    other = run_of(tiny(method={"loss": "l1"}), tmp_path)
    with pytest.raises(DfkdError, match="config differs from the saved run in method"):
        other.resume(tmp_path / "checkpoints" / "last.pt")


def test_a_refused_resume_names_the_saved_values_that_continue_it():
    # a run begun before the recipe's game changed: its student learned by Adam
    from dfkd.config import ExperimentConfig, config_to_dict, parse_override, with_settings
    from dfkd.state import check_resumable

    game = {"student_optim.name": "sgd", "student_optim.lr": 0.1, "student_optim.warmup": 50}
    saved, now = config_to_dict(ExperimentConfig()), with_settings(ExperimentConfig(), game)
    with pytest.raises(DfkdError, match="pass its values: student_optim.name=adam ") as refused:
        check_resumable(saved, now, Path("last.pt"))
    hint = str(refused.value).split("pass its values: ")[1].split()
    assert sorted(hint) == ["student_optim.lr=0.001", "student_optim.name=adam", "student_optim.warmup=0"]
    assert check_resumable(saved, with_settings(now, dict(map(parse_override, hint))), Path("last.pt")) == {}


@pytest.mark.parametrize("key", ["priors", "extra_priors"])
def test_resume_refuses_a_prior_dropped_or_added(key):
    from dfkd.config import ExperimentConfig, config_to_dict, with_settings
    from dfkd.state import check_resumable

    with_prior = with_settings(ExperimentConfig(), {f"method.{key}": {"onehot": 1.0}})
    saved, path = config_to_dict(with_prior), Path("last.pt")
    with pytest.raises(DfkdError, match=f"differs from the saved run in method.{key}"):
        check_resumable(saved, ExperimentConfig(), path)  # dropped
    with pytest.raises(DfkdError, match=f"differs from the saved run in method.{key}"):
        check_resumable(config_to_dict(ExperimentConfig()), with_prior, path)  # added
    assert check_resumable(saved, with_prior, path) == {}
