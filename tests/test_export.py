"""Exported students load without dfkd and give the student's logits; a bad export leaves no file."""

import json
import subprocess
import sys

import pytest
import torch

from dfkd.classifier_files import load_classifier
from dfkd.cli import main
from dfkd.export import ATOL, RTOL, export_student, load_student, verification_batch
from dfkd.models import build_classifier
from dfkd.teachers import save_classifier

META = {
    "arch": "lenet5_half",
    "dataset": "mnist5k",
    "num_classes": 10,
    "in_channels": 1,
    "image_size": 32,
    "mean": [0.1307],
    "std": [0.3081],
    "test_acc": 12.5,
    "distilled": True,
}
FORMATS = ["torchscript", "exported", "onnx", "state_dict"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run as far as export cares: a folder holding a student.pt with its full meta."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    save_classifier(root / "student.pt", build_classifier("lenet5_half", 1, 10, 32), META)
    return root


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """Every format written by `dfkd export` into its own folder; {format: (path, stdout)}."""
    files = {}
    for fmt in FORMATS:
        out = tmp_path_factory.mktemp(fmt) / f"student-{fmt}.bin"
        capture = subprocess.run(
            [sys.executable, "-m", "dfkd", "export", str(run_dir), "--format", fmt, "--out", str(out)],
            capture_output=True,
            text=True,
        )
        assert capture.returncode == 0, capture.stderr
        files[fmt] = (out, capture.stdout)
    return files


def student_logits(run_dir, x):
    model, _ = load_student(run_dir)
    with torch.no_grad():
        return model(x)


def assert_close(got, want):
    assert got.shape == want.shape
    assert ((got - want).abs() <= ATOL + RTOL * want.abs()).all(), float((got - want).abs().max())


# Reloads each file as a user without dfkd would: dfkd cannot even be imported here.
WITHOUT_DFKD = r"""
import json, sys
sys.modules["dfkd"] = None
import numpy as np, onnxruntime, torch
files, x_path, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
x = torch.load(x_path)
logits, specs = {}, {}
extra = {"dfkd_spec.json": ""}
ts = torch.jit.load(files["torchscript"], _extra_files=extra)
logits["torchscript"], specs["torchscript"] = ts(x), json.loads(extra["dfkd_spec.json"])
extra = {"dfkd_spec.json": ""}
program = torch.export.load(files["exported"], extra_files=extra)
logits["exported"], specs["exported"] = program.module()(x), json.loads(extra["dfkd_spec.json"])
onnx_model = onnxruntime.InferenceSession(files["onnx"], providers=["CPUExecutionProvider"])
logits["onnx"] = torch.from_numpy(onnx_model.run(None, {"input": x.numpy()})[0])
specs["onnx"] = json.loads(onnx_model.get_modelmeta().custom_metadata_map["dfkd_spec.json"])
torch.save({k: v.detach() for k, v in logits.items()}, out_path)
print(json.dumps(specs))
"""


def test_every_format_reloads_without_dfkd_and_matches_the_student(run_dir, exported, tmp_path):
    x = verification_batch(load_student(run_dir)[1])[:5]  # another batch size than the export's example
    torch.save(x, tmp_path / "x.pt")
    paths = {fmt: str(path) for fmt, (path, _) in exported.items() if fmt != "state_dict"}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_DFKD,
            json.dumps(paths),
            str(tmp_path / "x.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    want = student_logits(run_dir, x)
    for got in torch.load(tmp_path / "logits.pt").values():
        assert_close(got, want)
    for fmt, spec in json.loads(run.stdout.splitlines()[-1]).items():
        assert (spec["channels"], spec["size"], spec["num_classes"]) == (1, 32, 10), fmt
        assert spec["mean"] == [0.1307] and spec["std"] == [0.3081] and spec["arch"] == "lenet5_half", fmt


def test_state_dict_loads_into_the_rebuilt_architecture(run_dir, exported):
    path, _ = exported["state_dict"]
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["arch"] == "lenet5_half" and sidecar["mean"] == [0.1307] and sidecar["size"] == 32
    model = build_classifier(sidecar["arch"], sidecar["channels"], sidecar["num_classes"], sidecar["size"])
    model.load_state_dict(torch.load(path))
    x = verification_batch(load_student(run_dir)[1])
    with torch.no_grad():
        assert_close(model.eval()(x), student_logits(run_dir, x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_prints_the_spec_and_the_difference(exported, fmt):
    _, printed = exported[fmt]
    for line in [
        "input     1 x 32 x 32",
        "classes   10",
        "mean      0.1307",
        "std       0.3081",
        "max |Δlogit| = ",
        "on 16 seeded inputs",
    ]:
        assert line in printed, printed


def test_default_out_is_beside_the_student(tmp_path, run_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "student.pt").write_bytes((run_dir / "student.pt").read_bytes())
    assert export_student(run, "torchscript") == run / "student.ts"
    assert main(["export", str(run), "--format", "state_dict"]) == 0
    assert (run / "student.weights.pt").is_file() and (run / "student.weights.pt.json").is_file()
    # an existing export is replaced only with --overwrite
    before = (run / "student.ts").read_bytes()
    capsys.readouterr()
    assert main(["export", str(run), "--format", "torchscript"]) == 2
    assert "student.ts' exists; pass --overwrite" in capsys.readouterr().err
    assert (run / "student.ts").read_bytes() == before
    assert main(["export", str(run), "--format", "torchscript", "--overwrite"]) == 0
    assert sorted(p.name for p in run.iterdir()) == [
        "student.pt",
        "student.ts",
        "student.weights.pt",
        "student.weights.pt.json",
    ]


def perturbed(monkeypatch):
    import dfkd.export

    reload = dfkd.export.reload

    def off_by_a_hundredth(fmt, path, doc):
        run = reload(fmt, path, doc)
        return lambda x: run(x) + 0.01

    monkeypatch.setattr(dfkd.export, "reload", off_by_a_hundredth)


@pytest.mark.parametrize("fmt", FORMATS)
def test_failed_verification_removes_the_file_and_exits_2(run_dir, tmp_path, monkeypatch, capsys, fmt):
    perturbed(monkeypatch)
    out = tmp_path / "out" / "student.bin"
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "export verification failed: max |Δlogit| = 0.01 > 0.0001 + 0.0001·|logit|" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # no file, no temporary, no folder it made


def test_failed_verification_keeps_the_file_it_would_have_overwritten(run_dir, tmp_path, monkeypatch):
    perturbed(monkeypatch)
    out = tmp_path / "mine.onnx"
    out.write_bytes(b"the user's own file")
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out), "--overwrite"]) == 2
    assert out.read_bytes() == b"the user's own file"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.onnx"]


def test_load_student_from_a_run_dir_or_its_file(run_dir):
    for source in (run_dir, run_dir / "student.pt"):
        model, spec = load_student(source)
        assert not model.training
        assert (spec.channels, spec.size, spec.num_classes) == (1, 32, 10)
        assert (spec.mean, spec.std) == ((0.1307,), (0.3081,))


def test_a_checkpoint_without_normalization_is_converted_then_exported(tmp_path, capsys):
    old = {k: v for k, v in META.items() if k not in ("mean", "std")}
    save_classifier(tmp_path / "old.pt", build_classifier("lenet5_half", 1, 10, 32), old)
    assert main(["export", str(tmp_path / "old.pt"), "--format", "onnx"]) == 2
    assert "its meta lacks mean, std; rewrite it with `dfkd convert" in capsys.readouterr().err
    args = ["convert", str(tmp_path / "old.pt"), "--out", str(tmp_path / "new.pt"), "--arch", "lenet5_half"]
    assert main([*args, "--mean", "0.5", "--std", "0.25"]) == 0
    assert "max |Δlogit| = 0 after reloading" in capsys.readouterr().out
    _, meta = load_classifier(tmp_path / "new.pt")
    assert meta["mean"] == [0.5] and meta["std"] == [0.25] and meta["test_acc"] == 12.5
    assert main(["export", str(tmp_path / "new.pt"), "--format", "onnx"]) == 0
    assert (tmp_path / "new.onnx").is_file()


def test_convert_a_plain_state_dict_into_a_dfkd_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    model = build_classifier("lenet5", 3, 5, 32).eval()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    args = [
        "convert",
        str(tmp_path / "plain.pt"),
        "--out",
        str(tmp_path / "teacher.pt"),
        "--arch",
        "lenet5",
        "--channels",
        "3",
        "--size",
        "32",
        "--classes",
        "5",
        "--mean",
        "0.5",
        "--std",
        "0.2",
        "0.3",
        "0.4",
    ]
    assert main(args) == 0, capsys.readouterr().err
    loaded, meta = load_classifier(tmp_path / "teacher.pt")
    assert meta["arch"] == "lenet5" and meta["in_channels"] == 3 and meta["num_classes"] == 5
    assert meta["mean"] == [0.5, 0.5, 0.5] and meta["std"] == [0.2, 0.3, 0.4]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))
