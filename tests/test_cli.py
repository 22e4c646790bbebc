"""The command line as a user meets it: exit codes, one-line errors, run directories, resume."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from dfkd.cli import main

TINY = [
    "teacher.epochs=1",
    "generator.width=4",
    "train.batch_size=16",
    "train.log_every=2",
    "train.eval_every=2",
    "train.sample_every=2",
    "train.checkpoint_every=2",
    "tracking.mode=disabled",
    "--no-progress",
]


def test_the_weakest_class_is_the_largest_gap_to_the_teacher_the_first_of_equal_ones():
    from dfkd.commands import weakest_class

    line = weakest_class({"student": [90.0, None, 80.0, 85.0], "teacher": [95.0, None, 90.0, 95.0]})
    assert line.startswith("  80.00 %  (class 2; teacher 90.00;")


def test_a_run_the_time_limit_cuts_short_says_so_in_its_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--iterations", "4", *TINY, "train.time_limit=1e-9"]) == 0
    assert "(1 of 4 iterations: train.time_limit=1e-09 s," in capsys.readouterr().out


def test_demo_end_to_end_prints_the_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--iterations", "4", *TINY]) == 0
    printed = capsys.readouterr().out
    for label in ["teacher acc", "student acc", "ratio", "weakest class", "wall time", "run dir", "W&B"]:
        assert label in printed
    summary = json.loads((out / "summary.json").read_text())
    student, teacher = summary["class_acc"]["student"], summary["class_acc"]["teacher"]
    c = max(range(10), key=lambda k: teacher[k] - student[k])
    assert f"{student[c]:7.2f} %  (class {c};" in printed
    assert summary["iterations"] == 4
    # the printed table is the summary's figures, and the summary is the saved student's accuracy
    assert f"{summary['student_acc']:7.2f} %" in printed and f"{summary['ratio']:7.3f}" in printed
    from dfkd.config import load_config
    from dfkd.data import load_dataset
    from dfkd.evaluate import accuracy
    from dfkd.export import load_student

    student, _ = load_student(out)
    assert accuracy(student, load_dataset(load_config(None).data).test) == summary["student_acc"]
    assert summary["ratio"] == summary["student_acc"] / summary["teacher_acc"]
    assert (out / "config.yaml").exists()


def test_a_teacher_trained_without_a_progress_bar_says_where_it_is_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DFKD_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "first"), "--iterations", "2", *TINY]) == 0
    said = capsys.readouterr().err
    assert "dfkd: training the teacher lenet5 by dfkd's teacher recipe (teacher.epochs=1)" in said
    assert str(tmp_path / "cache" / "teachers") in said
    assert main(["demo", "--out", str(tmp_path / "second"), "--iterations", "2", *TINY]) == 0
    assert "training the teacher" not in capsys.readouterr().err, "a cached teacher is not trained again"


def test_run_resume_and_refuse_to_clobber(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("name: tiny\ntrain:\n  iterations: 2\n")
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), *TINY]) == 0
    before = (out / "summary.json").read_bytes()
    # an existing run is never overwritten by accident
    assert main(["run", str(cfg), "--out", str(out), *TINY]) == 2
    assert "exists; pass --resume" in capsys.readouterr().err
    assert (out / "summary.json").read_bytes() == before
    # --resume continues it to a longer budget
    assert main(["run", str(cfg), "--out", str(out), "--resume", "--iterations", "4", *TINY]) == 0
    assert json.loads((out / "summary.json").read_text())["iterations"] == 4
    (out / "notes.txt").write_text("a file of the old run")
    assert main(["run", str(cfg), "--out", str(out), "--overwrite", *TINY]) == 0
    assert not (out / "notes.txt").exists(), "--overwrite replaces the old run, it does not merge into it"
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2


class CallsCode:
    """Pickles as a call of os.system (posix.system on Linux)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Good files a bad command must leave alone: a finished run, its experiment file, teachers."""
    from dfkd.models import build_classifier
    from dfkd.teachers import save_classifier

    root = tmp_path_factory.mktemp("workspace")
    (root / "exp.yaml").write_text("name: good\n")
    assert main(["run", str(root / "exp.yaml"), "--out", str(root / "run"), "--iterations", "2", *TINY]) == 0
    (root / "broken.yaml").write_text("train: [1, 2\n")
    (root / "junk.pt").write_bytes(b"not a checkpoint")
    meta = {
        "arch": "lenet5",
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 32,
        "mean": [0.1307],
        "std": [0.3081],
    }
    save_classifier(root / "misfit.pt", build_classifier("lenet5_half", 1, 10, 32), meta)
    rgb = {**meta, "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_classifier(root / "rgb.pt", build_classifier("lenet5", 3, 10, 32), rgb)
    save_classifier(root / "good.pt", build_classifier("lenet5", 1, 10, 32), meta)
    save_classifier(root / "five.pt", build_classifier("lenet5", 1, 5, 32), {**meta, "num_classes": 5})
    torch.save(build_classifier("lenet5", 1, 10, 32).state_dict(), root / "plain.pt")
    with warnings.catch_warnings():  # torch calls TorchScript deprecated; users still bring such files
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(build_classifier("lenet5", 1, 10, 32).eval(), torch.zeros(2, 1, 32, 32))
        torch.jit.save(traced, str(root / "teacher.ts"))
    (root / "file").write_text("")
    (root / "empty.yaml").write_text("# only a comment\n")
    (root / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (root / "listrun" / "checkpoints").mkdir(parents=True)
    torch.save([1, 2, 3], root / "listrun" / "checkpoints" / "last.pt")
    torch.save(build_classifier("lenet5", 1, 10, 32), root / "whole.pt")  # a pickled module
    save_classifier(root / "nometa.pt", build_classifier("lenet5", 1, 10, 32), {"arch": "lenet5"})
    (root / "system.pt").write_bytes(pickle.dumps(CallsCode(f"touch {root}/ran")))  # the snapshot sees "ran"
    (root / "broken_net.py").write_text("raise ImportError('no module named torchfancy')\n")
    (root / "other_net.py").write_text("import torch.nn as nn\nOther = nn.Linear\n")
    save_classifier(root / "size28.pt", build_classifier("lenet5", 1, 10, 32), {**meta, "image_size": 28})
    (root / "mnist_bad" / "MNIST" / "processed").mkdir(parents=True)
    for split in ("training.pt", "test.pt"):  # torchvision's legacy layout, holding code instead of tensors
        (root / "mnist_bad" / "MNIST" / "processed" / split).write_bytes(pickle.dumps(CallsCode("true")))
    for name, classes, mode in (("five_classes", 5, "L"), ("rgb_images", 10, "RGB")):
        for c in range(classes):
            (root / name / str(c)).mkdir(parents=True)
            Image.new(mode, (28, 28)).save(root / name / str(c) / "0.png")
    return root


def snapshot(root):
    """Every file's bytes and every folder: a bad command may neither change a file nor leave a folder."""
    return {p.relative_to(root): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


# One row per kind of bad input. `{w}` is the workspace; rows of only options and overrides aim at
# the finished run with --resume, the place where a careless error path would do the most damage.
CONVERT = ["--arch", "lenet5", "--mean", "0.5", "--std", "0.5"]
BAD_INPUT = {
    "missing config": (["run", "{w}/missing.yaml"], "config file '{w}/missing.yaml' not found"),
    "corrupt config": (["run", "{w}/broken.yaml"], "config file '{w}/broken.yaml' is not valid YAML at line"),
    "unknown key": (["train.batch_sise=8"], "unknown config key 'train.batch_sise'; known: batch_size"),
    "wrong type": (["train.batch_size=abc"], "train.batch_size: expected int, got 'abc'"),
    "zero batch size": (["train.batch_size=0"], "train.batch_size must be positive, got 0"),
    "negative steps": (["method.n_student_steps=-1"], "method.n_student_steps must be positive, got -1"),
    "zero learning rate": (["student_optim.lr=0"], "student_optim.lr must be positive, got 0.0"),
    "unknown registry name": (
        ["student.arch=lenet9"],
        "unknown classifier 'lenet9'; did you mean 'lenet5'? known:",
    ),
    "missing checkpoint": (["teacher.checkpoint={w}/no_such.pt"], "checkpoint '{w}/no_such.pt' not found"),
    "corrupt checkpoint": (
        ["teacher.checkpoint={w}/junk.pt"],
        "checkpoint '{w}/junk.pt' is unreadable or corrupt",
    ),
    "weights misfit": (
        ["teacher.checkpoint={w}/misfit.pt"],
        "checkpoint '{w}/misfit.pt' does not fit its architecture",
    ),
    "teacher input shape": (
        ["teacher.checkpoint={w}/rgb.pt"],
        "rgb.pt' has in_channels=3 but the input has channels=1",
    ),
    "teachers disagree": (
        ["teachers=[{checkpoint: {w}/good.pt}, {checkpoint: {w}/five.pt}]"],
        "teachers #0 ({w}/good.pt) and #1 ({w}/five.pt) disagree on num_classes: 10 vs 5",
    ),
    "missing dataset path": (
        ["data.name=fashion_mnist", "data.root={w}/no/dir"],
        "data.root '{w}/no/dir' does not exist",
    ),
    "unwritable output": (["--out", "{w}/file/run"], "cannot write to run directory '{w}/file/run'"),
    "existing run without --resume": (
        ["--out", "{w}/run"],
        "exists; pass --resume to continue it or --overwrite",
    ),
    "resume with another config": (
        ["--resume", "method.loss=l1"],
        "config differs from the saved run in method",
    ),
    "missing argument": (
        ["run"],
        "dfkd: error: the following arguments are required: config (see dfkd run --help)",
    ),
    "unknown option": (
        ["--iterationz", "3"],
        "dfkd: error: unrecognized arguments: --iterationz (see dfkd --help)",
    ),
    "bad option value": (["layers", "lenet5", "--size", "x"], "argument --size: invalid int value: 'x'"),
    "unknown command": (["distil"], "argument COMMAND: invalid choice: 'distil'"),
    "unknown shipped experiment": (
        ["run", "no_such_experiment"],
        "config file 'no_such_experiment' not found; give a YAML path or a",
    ),
    "empty config": (["run", "{w}/empty.yaml"], "config file '{w}/empty.yaml' is empty; write settings"),
    "non-UTF-8 config": (
        ["run", "{w}/latin1.yaml"],
        "config file '{w}/latin1.yaml' is not UTF-8 text (byte 0xe9 at offset 9)",
    ),
    "run --out is a file": (["--out", "{w}/file"], "--out '{w}/file' is a file, not a run directory"),
    "fresh --out, bad teacher": (
        ["--out", "{w}/fresh/run", "teacher.checkpoint={w}/junk.pt"],
        "checkpoint '{w}/junk.pt' is unreadable or corrupt",
    ),
    "resume a foreign checkpoint": (
        ["--out", "{w}/listrun", "--resume"],
        "'{w}/listrun/checkpoints/last.pt' is not a dfkd run checkpoint",
    ),
    "teacher --out exists": (
        ["train-teacher", "--out", "{w}/good.pt"],
        "'{w}/good.pt' exists; pass --overwrite",
    ),
    "teacher --out is a directory": (["train-teacher", "--out", "{w}/run"], "--out '{w}/run' is a directory"),
    "teacher --out under a file": (
        ["train-teacher", "--out", "{w}/file/t.pt"],
        "'{w}/file' is a file, not a directory",
    ),
    "teacher --out under /proc": (
        ["train-teacher", "--out", "/proc/dfkd/t.pt"],
        "cannot write to '/proc/dfkd'",
    ),
    "teacher override holding a path": (
        ["train-teacher", "data.root={w}/no/dir", "data.name=fashion_mnist", "--out", "{w}/t.pt"],
        "data.root '{w}/no/dir' does not exist",
    ),
    "bench override holding a path": (
        ["bench", "teacher.checkpoint={w}/junk.pt"],
        "checkpoint '{w}/junk.pt' is unreadable or corrupt",
    ),
    "layers zero channels": (["layers", "lenet5", "--channels", "0"], "--channels must be positive, got 0"),
    "layers negative size": (["layers", "lenet5", "--size", "-1"], "--size must be positive, got -1"),
    "layers zero classes": (["layers", "lenet5", "--classes", "0"], "--classes must be positive, got 0"),
    "export unknown format": (
        ["export", "{w}/run", "--format", "zip"],
        "argument --format: invalid choice: 'zip'",
    ),
    "export without a student": (["export", "{w}/listrun", "--format", "onnx"], "holds no student.pt"),
    "export --out exists": (
        ["export", "{w}/run", "--format", "onnx", "--out", "{w}/file"],
        "'{w}/file' exists; pass --overwrite (overwrite=True) to replace it",
    ),
    "export --out is a directory": (
        ["export", "{w}/run", "--format", "torchscript", "--out", "{w}/run"],
        "--out '{w}/run' is a directory",
    ),
    "export --out under a file": (
        ["export", "{w}/run", "--format", "exported", "--out", "{w}/file/s.pt2"],
        "'{w}/file' is a file, not a directory",
    ),
    "convert a TorchScript file": (
        ["convert", "{w}/teacher.ts", "--out", "{w}/new.pt", *CONVERT],
        "is a TorchScript archive (a graph, not weights of a dfkd architecture) "
        "and cannot be stored as a dfkd state_dict checkpoint; use it directly: "
        "teacher.checkpoint={w}/teacher.ts",
    ),
    "convert --out exists": (
        ["convert", "{w}/good.pt", "--out", "{w}/five.pt", *CONVERT],
        "'{w}/five.pt' exists; pass --overwrite",
    ),
    "convert without --mean": (
        ["convert", "{w}/good.pt", "--out", "{w}/new.pt", "--arch", "lenet5"],
        "dfkd convert needs --mean and --std",
    ),
    "convert without a shape": (
        ["convert", "{w}/plain.pt", "--out", "{w}/new.pt", *CONVERT],
        "a plain state_dict records no input shape; give --channels",
    ),
    "state_dict fits no given arch": (
        ["teacher.checkpoint={w}/plain.pt", "teacher.arch=mlp"],
        "does not fit",
    ),
    "user file does not exist": (["student.arch={w}/no_net.py:Net"], "no_net.py"),
    "user file fails on import": (["student.arch={w}/broken_net.py:Net"], "no module named torchfancy"),
    "user file lacks the name": (["student.arch={w}/other_net.py:Net"], "has no 'Net'"),
    "input spec disagrees with the meta": (
        ["teacher.checkpoint={w}/good.pt", "input.num_classes=5"],
        "input.num_classes=5 disagrees with teacher",
    ),
    "TorchScript teacher's real input": (
        [
            "data.name=none",
            "teacher.checkpoint={w}/teacher.ts",
            "input.channels=3",
            "input.mean=[0.5,0.5,0.5]",
            "input.std=[0.5,0.5,0.5]",
            "input.num_classes=10",
        ],
        "does not take 3×32×32 inputs",
    ),
    "eval folder of other classes": (["eval.folder={w}/five_classes"], "5 class folders"),
    "eval images of other channels": (
        ["eval.folder={w}/rgb_images"],
        "has 3 channel(s) but the teacher takes 1",
    ),
    "missing normalization": (
        ["teacher.checkpoint={w}/plain.pt", "teacher.arch=lenet5"],
        "does not record the input normalization it was trained with: set input.mean",
    ),
    "pickled module without opt-in": (["teacher.checkpoint={w}/whole.pt"], "holds a whole pickled module"),
    "pickle that calls code": (
        ["teacher.checkpoint={w}/system.pt"],
        "holds code (posix.system) and was refused",
    ),
    "meta lacks keys": (["teacher.checkpoint={w}/nometa.pt"], "in_channels"),
    "NaN learning rate": (["student_optim.lr=.nan"], "student_optim.lr must be a finite number, got nan"),
    "NaN temperature": (["method.temperature=.nan"], "method.temperature must be a finite number"),
    "NaN grad clip": (["student_optim.grad_clip=.nan"], "student_optim.grad_clip must be a finite number"),
    "infinite learning rate": (
        ["generator_optim.lr=1e400"],
        "generator_optim.lr must be a finite number, got inf",
    ),
    "negative weight decay": (
        ["student_optim.weight_decay=-1"],
        "student_optim.weight_decay must be 0 (off) or positive, got -1",
    ),
    "beta outside [0, 1)": (
        ["student_optim.betas=[2.0, 0.999]"],
        "student_optim.betas[0] must be in [0, 1), got 2.0",
    ),
    "meta of another image size": (
        ["teacher.checkpoint={w}/size28.pt"],
        "its meta (arch lenet5, image_size 28) fits no network: LeNet-5 takes 32×32",
    ),
    "MNIST processed file not tensors": (
        ["data.name=mnist", "data.root={w}/mnist_bad"],
        "holds a processed .pt file that is not plain tensors",
    ),
    "unknown collapse action": (
        ["train.collapse_action=panic"],
        "train.collapse_action must be one of reinit, warn",
    ),
    "convert another arch": (
        ["convert", "{w}/good.pt", "--out", "{w}/new.pt", "--arch", "mlp", *CONVERT[2:]],
        "--arch mlp disagrees with the checkpoint's arch lenet5",
    ),
}
if not torch.cuda.is_available():  # on a machine with a GPU, train.device=cuda is good input
    BAD_INPUT["no CUDA"] = (["train.device=cuda"], "no CUDA device is available; use train.device=cpu")


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_nonzero_and_changes_no_good_file(workspace, capsys, case):
    args, message = BAD_INPUT[case]
    args = [a.replace("{w}", str(workspace)) for a in args]
    if args[0].startswith("-") or "=" in args[0]:  # aimed at the finished run unless it names its own --out
        resume = [] if "--resume" in args else ["--resume"]
        aim = [] if "--out" in args else ["--out", str(workspace / "run"), *resume]
        args = ["run", str(workspace / "exp.yaml"), *TINY, *args, *aim]
    before = snapshot(workspace)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.replace("{w}", str(workspace)) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert snapshot(workspace) == before


def test_console_entry_point_help_and_list():
    run = subprocess.run([sys.executable, "-m", "dfkd", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "demo" in run.stdout and "train-teacher" in run.stdout
    listed = subprocess.run([sys.executable, "-m", "dfkd", "list"], capture_output=True, text=True)
    assert "lenet5_half" in listed.stdout and "dfad" in listed.stdout
    assert "mnist5k_demo" in listed.stdout and "What `dfkd demo` runs" in listed.stdout


COMMANDS = ["bench", "convert", "demo", "export", "layers", "list", "run", "train-teacher"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_a_described_help(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: dfkd {command}")
    description = text.split("\n\n")[1]  # the paragraph after the usage
    assert not description.startswith(("positional arguments", "options")) and len(description) > 40


def test_a_shipped_experiment_runs_by_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ folder here: the name must find the shipped file
    out = tmp_path / "run"
    assert main(["run", "mnist5k_demo", "--out", str(out), "--iterations", "2", *TINY]) == 0
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2
    assert "name: mnist5k_demo" in (out / "config.yaml").read_text()


def test_train_teacher_replaces_a_file_only_with_overwrite(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"mine")
    args = ["train-teacher", "teacher.epochs=1", "teacher.arch=mlp", "--out", str(path), "--no-progress"]
    assert main(args) == 2 and path.read_bytes() == b"mine"
    assert main([*args, "--overwrite"]) == 0
    assert path.read_bytes() != b"mine"


REPO = Path(__file__).resolve().parent.parent


def test_a_non_editable_install_ships_every_package_and_the_experiment_files(tmp_path):
    """pip install (not -e) of a copy of the checkout, then dfkd from the installed files alone."""
    src, site = tmp_path / "src", tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", ".*")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "dfkd", "generators", "discriminators", "runs"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"ignore": ignore} if (REPO / name).is_dir() else {}))
    packages = {p.parent.relative_to(src) for p in src.rglob("__init__.py")}
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "-q",
        "--target",
        str(site),
        str(src),
    ]
    built = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    assert {p for p in packages if not (site / p / "__init__.py").is_file()} == set(), "not installed"
    shipped = sorted(p.name for p in (site / "dfkd" / "experiments").glob("*.yaml"))
    assert shipped == sorted(p.name for p in (REPO / "runs").glob("*.yaml"))
    code = (
        "import dfkd, dfkd.configfile as cf; from pathlib import Path; "
        "print(dfkd.__file__); print(cf.resolve_config(Path('mnist5k_demo'))); "
        "print(cf.resolve_config(Path('runs/fmnist_dfad.yaml')))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert found.returncode == 0, found.stderr
    module, demo, dfad = found.stdout.split()
    assert module.startswith(str(site)) and demo == str(site / "dfkd" / "experiments" / "mnist5k_demo.yaml")
    assert dfad == str(site / "dfkd" / "experiments" / "fmnist_dfad.yaml")
    listed = subprocess.run(
        [sys.executable, "-m", "dfkd", "list"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert "mnist5k_demo" in listed.stdout and str(site / "dfkd" / "experiments") in listed.stdout
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dfkd",
            "run",
            "mnist5k_demo",
            "--out",
            str(tmp_path / "run"),
            "--iterations",
            "2",
            *TINY,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["iterations"] == 2


def test_train_teacher_writes_a_checkpoint_with_metadata(tmp_path, capsys):
    from dfkd.classifier_files import load_classifier

    path = tmp_path / "teacher.pt"
    args = ["train-teacher", "teacher.epochs=1", "teacher.arch=mlp", "--out", str(path), "--no-progress"]
    assert main(args) == 0
    model, meta = load_classifier(path)
    assert meta["arch"] == "mlp" and meta["num_classes"] == 10 and meta["in_channels"] == 1
    assert meta["image_size"] == 32 and meta["mean"] == [0.1307] and meta["test_acc"] > 50
    assert "test accuracy" in capsys.readouterr().out


def wait_for_records(metrics, count, poll_s=0.2, timeout_s=120):
    """Until a running subprocess has logged `count` lines to its metrics.jsonl."""
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= count):
        time.sleep(poll_s)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    import signal

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "dfkd",
        "demo",
        "--out",
        str(out),
        "--iterations",
        "100000",
        *TINY,
        "train.checkpoint_every=100000",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_records(out / "metrics.jsonl", 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "continue with --resume" in err
    from dfkd.checkpoint import load_safe

    step = load_safe(out / "checkpoints" / "last.pt")["step"]
    assert 2 <= step < 100000
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--resume",
                "--iterations",
                str(step + 2),
                *TINY,
                "train.checkpoint_every=100000",
            ]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["iterations"] == step + 2


def test_debug_shows_the_traceback_before_or_after_the_command():
    for args in (["--debug", "run", "missing.yaml"], ["run", "missing.yaml", "--debug"]):
        with pytest.raises(Exception, match="missing.yaml"):
            main(args)


def test_sigkill_at_an_arbitrary_step_then_resume_is_bitwise_identical(tmp_path):
    import signal

    from dfkd.checkpoint import load_safe

    args = [
        "demo",
        "--iterations",
        "60",
        *TINY,
        "train.batch_size=64",
        "generator.width=8",
        "train.log_every=1",
        "train.checkpoint_every=7",
        "train.eval_every=1000",
        "train.sample_every=1000",
    ]

    def dfkd(out, *extra):
        return [sys.executable, "-m", "dfkd", *args, "--out", str(out), *extra]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(dfkd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_records(killed / "metrics.jsonl", 20, poll_s=0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err
    step = load_safe(killed / "checkpoints" / "last.pt")["step"]
    assert 0 < step < 60, "killed mid-training"
    assert subprocess.run(dfkd(killed, "--resume"), capture_output=True).returncode == 0

    whole = tmp_path / "whole"
    assert subprocess.run(dfkd(whole), capture_output=True).returncode == 0
    for name in ("student.pt", "checkpoints/last.pt"):
        a, b = load_safe(whole / name), load_safe(killed / name)
        parts = ("state_dict",) if name == "student.pt" else ("student", "generator", "ema")
        for part in parts:  # a renamed key fails here rather than dropping the comparison
            assert a[part].keys() == b[part].keys()
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), f"{name}: {part} differs"
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (whole / "metrics.jsonl").read_text().splitlines()]


def test_layers_prints_paths_and_shapes(capsys):
    assert main(["layers", "lenet5_half"]) == 0
    out = capsys.readouterr().out
    assert "features.5" in out and "MaxPool2d" in out and "8 x 5 x 5" in out
    assert main(["layers", "lenet9"]) == 2
    assert "unknown classifier 'lenet9'" in capsys.readouterr().err
