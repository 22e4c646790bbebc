"""Teachers users bring: every file format load_classifier reads, user code as an arch, and the
one-line errors for each way these go wrong. Every file here is written by the test itself."""

import io
import os
import pickle
import subprocess
import warnings
import zipfile

import pytest
import torch
import torch.nn as nn

from dfkd.checkpoint import load_safe
from dfkd.classifier_files import check_runs, load_classifier
from dfkd.errors import DfkdError
from dfkd.models import FORMS, build_classifier, classifier_names
from dfkd.registry import Registry
from dfkd.teachers import save_classifier

SHAPE = (1, 32, 10)  # channels, size, num_classes
ARCH = "torchvision.resnet18"


@pytest.fixture(scope="module")
def resnet():
    """A torchvision ResNet-18 for 1×32×32 images, in eval mode, with its logits on a fixed batch."""
    torch.manual_seed(0)
    model = build_classifier(ARCH, 1, 10, 32).eval()
    for m in model.modules():  # non-trivial BN statistics, so a load that drops them shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        return model, x, model(x)


def logits_match(loaded: nn.Module, resnet) -> bool:
    _, x, ref = resnet
    with torch.no_grad():
        return torch.allclose(loaded.eval()(x), ref, atol=1e-5)


def one_line_error(call, *words) -> str:
    with pytest.raises(DfkdError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# plain state_dicts


WRAPS = ["plain", "nested_model", "ddp_prefix", "nested_state_dict_ddp", "with_epoch"]


@pytest.mark.parametrize("wrap", WRAPS)
def test_plain_state_dict_loads_however_it_is_wrapped(resnet, tmp_path, wrap):
    state = resnet[0].state_dict()
    ddp = {f"module.{k}": v for k, v in state.items()}
    obj = {
        "plain": state,
        "nested_model": {"model": state},
        "ddp_prefix": ddp,
        "nested_state_dict_ddp": {"state_dict": ddp},
        "with_epoch": {"model_state_dict": state, "epoch": 3},
    }[wrap]
    path = tmp_path / "weights.bin"  # recognised by content, not by name
    torch.save(obj, path)
    model, meta = load_classifier(path, ARCH, shape=SHAPE)
    assert logits_match(model, resnet)
    assert meta == {
        "arch": ARCH,
        "format": "state_dict",
        "path": str(path),
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 32,
    }


def test_plain_state_dict_needs_arch_shape_and_the_right_arch(resnet, tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(resnet[0].state_dict(), path)
    one_line_error(lambda: load_classifier(path, shape=SHAPE), "plain state_dict", "set teacher.arch")
    one_line_error(lambda: load_classifier(path, ARCH, shape=(1, 32, None)), "set input.num_classes")
    message = one_line_error(
        lambda: load_classifier(path, "resnet18", shape=SHAPE),
        "does not fit its architecture resnet18",
        "120 missing (stem.0.weight",
        "120 unexpected (conv1.weight",
        "set teacher.arch to the network",
    )
    assert "..." in message
    one_line_error(
        lambda: load_classifier(path, ARCH, shape=(1, 32, 7)),
        "of other shapes (fc.weight (10, 512) vs (7, 512)",
        "set teacher.arch",
    )


# dfkd's own checkpoints


def test_dfkd_checkpoint_round_trip_and_a_meta_without_keys(tmp_path):
    model = build_classifier("lenet5", 1, 10, 32)
    meta = {
        "arch": "lenet5",
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 32,
        "mean": [0.5],
        "std": [0.5],
    }
    save_classifier(tmp_path / "t.pt", model, meta)
    loaded, meta2 = load_classifier(tmp_path / "t.pt", arch="mlp", shape=(3, 16, 4))  # the meta wins
    assert meta2 == {**meta, "format": "dfkd"}
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(loaded(x), model(x))
    save_classifier(tmp_path / "bad.pt", model, {"arch": "lenet5", "num_classes": 10})
    one_line_error(
        lambda: load_classifier(tmp_path / "bad.pt"),
        "meta without in_channels, image_size",
        "needs arch, num_classes, in_channels, image_size",
        "add them",
    )


# TorchScript and torch.export


@pytest.mark.parametrize("how", ["trace", "script"])
def test_torchscript_is_used_as_it_is_and_checked(resnet, tmp_path, how):
    model, x, _ = resnet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated; users still bring such files
        scripted = torch.jit.trace(model, x) if how == "trace" else torch.jit.script(model)
    path = tmp_path / "teacher.pth"
    scripted.save(str(path))
    loaded, meta = load_classifier(path, shape=SHAPE)
    assert isinstance(loaded, torch.jit.ScriptModule) and logits_match(loaded, resnet)
    assert meta == {
        "arch": "torchscript",
        "format": "torchscript",
        "path": str(path),
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 32,
    }
    one_line_error(
        lambda: load_classifier(path, shape=(3, 32, 10)),
        "does not take 3×32×32 inputs",
        "to have 1 channels",
        "set input.channels / input.size",
    )
    one_line_error(
        lambda: load_classifier(path, shape=(1, 32, 5)),
        "gives 10 classes, input.num_classes says 5",
        "set input.num_classes=10",
    )
    assert load_classifier(path, shape=(1, 32, None))[1]["num_classes"] == 10  # classes it tells itself


def test_exported_program_loads_and_takes_any_batch(resnet, tmp_path):
    model, x, _ = resnet
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = tmp_path / "teacher.pt2"
    torch.export.save(program, path)
    loaded, meta = load_classifier(path, shape=SHAPE)
    assert logits_match(loaded, resnet)
    assert meta == {
        "arch": "exported",
        "format": "exported",
        "path": str(path),
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 32,
    }
    loaded.train()  # the exported module itself refuses train() and eval()
    assert logits_match(loaded, resnet)
    one_line_error(lambda: load_classifier(path, shape=(3, 32, 10)), "does not take 3×32×32 inputs")


def captured_batchnorm_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from dfkd.features import batchnorm_layers, capture

    with torch.no_grad(), capture(model, list(batchnorm_layers(model)), inputs=True) as found:
        model(x)
    return found


@pytest.mark.parametrize("how", ["trace", "script", "export"])
def test_a_graph_teacher_shows_its_batchnorm_layers_as_the_model_did(resnet, tmp_path, how):
    # TorchScript and exported graphs run BatchNorm where no forward hook reaches: as modules again,
    # at the model's own paths, the `bn` priors read the same inputs and statistics
    from dfkd.features import batchnorm_layers
    from dfkd.graph_files import GraphBatchNorm, torchscript_as_graph

    model, x, _ = resnet
    path = tmp_path / "teacher.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "export":
            batch = ({0: torch.export.Dim("batch")},)
            torch.export.save(torch.export.export(model, (x,), dynamic_shapes=batch), path)
        else:
            (torch.jit.trace(model, x) if how == "trace" else torch.jit.script(model)).save(str(path))
    loaded, _ = load_classifier(path, shape=SHAPE)
    graph = torchscript_as_graph(loaded, 1, 32)
    assert logits_match(graph, resnet)
    layers, own = batchnorm_layers(graph), batchnorm_layers(model)
    assert [p.split("program.", 1)[-1] for p in layers] == list(own) and len(own) == 20
    assert all(isinstance(m, GraphBatchNorm) for m in layers.values())
    for m, ref in zip(layers.values(), own.values()):
        assert torch.equal(m.running_mean, ref.running_mean)
        assert torch.equal(m.running_var, ref.running_var)
    seen, expected = captured_batchnorm_inputs(graph, x), captured_batchnorm_inputs(model, x)
    assert all(torch.allclose(seen[p], expected[p.split("program.", 1)[-1]], atol=1e-5) for p in layers)
    leaf = x.clone().requires_grad_(True)  # the images' gradient, which the generator learns from
    graph(leaf).square().sum().backward()
    assert leaf.grad.abs().sum() > 0


def test_a_torchscript_graph_the_converter_refuses_is_used_as_it_is_with_a_warning(resnet, monkeypatch):
    from torch._export.converter import TS2EPConverter

    from dfkd.graph_files import torchscript_as_graph

    model, x, _ = resnet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; users still bring such files
        traced = torch.jit.trace(model, x)
        plain = torch.jit.trace(small_net(), torch.zeros(2, 1, 32, 32))  # no BatchNorm: nothing to convert

    def refuse(self):
        raise RuntimeError("unsupported op prim::Foo")

    monkeypatch.setattr(TS2EPConverter, "convert", refuse)
    with pytest.warns(UserWarning, match=r"BatchNorm layers cannot be read \(RuntimeError: unsupported op"):
        assert torchscript_as_graph(traced, 1, 32) is traced
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torchscript_as_graph(plain, 1, 32) is plain


def small_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).eval()


def test_exported_for_one_batch_size_is_refused(tmp_path):
    path = tmp_path / "static.pt2"
    torch.export.save(torch.export.export(small_net(), (torch.zeros(2, 1, 32, 32),)), path)
    one_line_error(
        lambda: load_classifier(path, shape=SHAPE),
        "takes a batch of 2 images but not of 3",
        "dynamic_shapes=({0: torch.export.Dim('batch')},)",
    )


class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_exported_program_with_a_pickled_payload_is_refused_unrun(tmp_path):
    good = tmp_path / "good.pt2"
    net = small_net()
    batch = ({0: torch.export.Dim("batch")},)
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 32, 32),), dynamic_shapes=batch), good)
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"x": RunsCommand(f"touch {marker}")}, payload)
    bad = tmp_path / "bad.pt2"  # torch.export.load unpickles sample inputs with weights_only=False
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            swap = info.filename.endswith("data/sample_inputs/model.pt")
            dst.writestr(info, payload.getvalue() if swap else src.read(info.filename))
    one_line_error(
        lambda: load_classifier(bad, shape=SHAPE),
        "run code when loaded",
        "data/sample_inputs/model.pt",
        "it was not loaded",
        "teacher.trust_pickle=true",
    )
    assert not marker.exists()
    x = torch.randn(3, 1, 32, 32)
    assert torch.allclose(load_classifier(good, shape=SHAPE)[0](x), net(x))


# pickles


def test_whole_pickled_module_needs_the_opt_in_and_warns(resnet, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(resnet[0], path)
    one_line_error(
        lambda: load_classifier(path, shape=SHAPE),
        "holds a whole pickled module (torchvision.models.resnet.ResNet)",
        "runs code from the file",
        "set teacher.trust_pickle=true if you trust its source",
        "save model.state_dict() instead",
    )
    with pytest.warns(UserWarning, match="trust_pickle: unpickling it ran code from the file"):
        model, meta = load_classifier(path, shape=SHAPE, trust_pickle=True)
    assert logits_match(model, resnet)
    assert meta == {
        "arch": "torchvision.models.resnet.ResNet",
        "format": "pickle",
        "path": str(path),
        "num_classes": 10,
        "in_channels": 1,
        "image_size": 32,
    }


def test_pickled_objects_beside_weights_load_only_when_trusted(resnet, tmp_path):
    import argparse

    path = tmp_path / "with_args.pt"
    torch.save({"model": resnet[0].state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    one_line_error(lambda: load_safe(path), "beyond plain weights (it would call argparse.Namespace)")
    one_line_error(
        lambda: load_classifier(path, ARCH, shape=SHAPE),
        "argparse.Namespace",
        "set teacher.trust_pickle=true",
    )
    with pytest.warns(UserWarning, match="ran code from the file"):
        model, meta = load_classifier(path, ARCH, shape=SHAPE, trust_pickle=True)
    assert logits_match(model, resnet) and meta["format"] == "state_dict"


class Calls:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("how", ["torch.save", "pickle2", "pickle5"])
@pytest.mark.parametrize("call", ["posix.system", "builtins.eval", "subprocess.check_call"])
def test_pickled_code_is_refused_unrun_even_when_trusted(tmp_path, how, call):
    marker = tmp_path / "pwned"
    evil = {
        "posix.system": Calls(os.system, f"touch {marker}"),
        "builtins.eval": Calls(eval, f"open({str(marker)!r}, 'w')"),
        "subprocess.check_call": Calls(subprocess.check_call, ["touch", str(marker)]),
    }[call]
    path = tmp_path / "teacher.pt"
    if how == "torch.save":
        torch.save({"state_dict": evil}, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=int(how[-1])))
    for trust in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # torch warns of protocol 5 before refusing: it stays quiet
            message = one_line_error(
                lambda trust=trust: load_classifier(path, ARCH, shape=SHAPE, trust_pickle=trust),
                f"holds code ({call}) and was refused; it was not run",
                "ask its source for the weights as a plain state_dict",
            )
        assert "corrupt" not in message and not caught, [str(w.message) for w in caught]
        assert ("trust_pickle does not load it" in message) == trust
    assert not marker.exists()


def test_junk_and_truncated_files_are_unreadable(resnet, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    one_line_error(lambda: load_classifier(junk, ARCH, shape=SHAPE), "unreadable or corrupt")
    whole = tmp_path / "sd.pt"
    torch.save(resnet[0].state_dict(), whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    one_line_error(lambda: load_classifier(cut, ARCH, shape=SHAPE), "unreadable or corrupt")
    one_line_error(lambda: load_classifier(tmp_path / "none.pt"), "not found")
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listed)
    one_line_error(
        lambda: load_classifier(listed, ARCH, shape=SHAPE), "holds a list", "save model.state_dict()"
    )


# user code, timm and the registry


NET_FILE = """
import torch.nn as nn
from blocks import head  # a file beside this one


class Net(nn.Module):
    def __init__(self, in_channels, num_classes, width=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1))
        self.head = head(width, num_classes)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def five_classes():
    return Net(1, 5)


def not_a_module():
    return 3
"""


@pytest.fixture
def user_file(tmp_path, monkeypatch):
    (tmp_path / "nets").mkdir()
    blocks = "import torch.nn as nn\n\n\ndef head(w, k):\n    return nn.Linear(w, k)\n"
    (tmp_path / "nets" / "blocks.py").write_text(blocks)
    (tmp_path / "nets" / "mynet.py").write_text(NET_FILE)
    monkeypatch.chdir(tmp_path)  # user paths are relative to the working directory
    return "nets/mynet.py"


def test_user_class_from_a_file_with_kwargs(user_file, tmp_path):
    arch = f"{user_file}:Net"
    model = build_classifier(arch, 1, 10, 32, {"in_channels": 1, "num_classes": 10, "width": 6})
    assert model.training and model.body[0].out_channels == 6
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    kwargs = {"in_channels": 1, "num_classes": 10, "width": 6}
    loaded, meta = load_classifier(tmp_path / "sd.pt", arch, kwargs, SHAPE)
    x = torch.randn(3, 1, 32, 32)
    assert torch.allclose(loaded(x), model(x)) and meta["arch"] == arch


def test_package_module_factory(tmp_path, monkeypatch):
    pkg = tmp_path / "dfkd_test_userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "zoo.py").write_text(
        "import torch.nn as nn\n\n\ndef tiny(num_classes, in_channels=1):\n"
        "    flat = nn.Linear(in_channels * 32 * 32, num_classes)\n"
        "    return nn.Sequential(nn.Flatten(), flat)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_classifier("dfkd_test_userpkg.zoo:tiny", 1, 10, 32, {"num_classes": 10})
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


USER_ERRORS = [
    ("missing/net.py:Net", {}, ["does not exist", "relative paths start at"]),
    ("broken.py:Net", {}, ["importing 'broken.py' failed: SyntaxError"]),
    ("needs_pkg.py:Net", {}, ["importing 'needs_pkg.py' failed: ModuleNotFoundError", "no_such_pkg_xyz"]),
    ("nets/mynet.py:Nett", {}, ["has no 'Nett'", "it defines: Net, five_classes, not_a_module"]),
    (
        "nets/mynet.py:Net",
        {"in_channels": 1, "num_classes": 10, "depth": 3},
        ["calling it with kwargs", "TypeError", "'depth'", "set teacher.kwargs / student.kwargs"],
    ),
    ("nets/mynet.py:five_classes", {}, ["gives (2, 5) for inputs of shape (2, 1, 32, 32); expected (2, 10)"]),
    (
        "nets/mynet.py:Net",
        {"in_channels": 3, "num_classes": 10},
        ["fails on inputs of shape (2, 1, 32, 32)", "RuntimeError", "it must take 1×32×32 images"],
    ),
    ("nets/mynet.py:not_a_module", {}, ["returned a int, not a torch.nn.Module"]),
    ("no_such_pkg_xyz.models:make", {}, ["cannot import 'no_such_pkg_xyz.models'", "PYTHONPATH"]),
]


@pytest.mark.parametrize("arch, kwargs, words", USER_ERRORS, ids=[f"{a}-{len(k)}" for a, k, _ in USER_ERRORS])
def test_user_code_errors_are_one_line(user_file, tmp_path, arch, kwargs, words):
    (tmp_path / "broken.py").write_text("class Net(:\n")
    (tmp_path / "needs_pkg.py").write_text("import no_such_pkg_xyz\n")
    one_line_error(lambda: build_classifier(arch, 1, 10, 32, kwargs), repr(arch), *words)


def test_timm_model(tmp_path):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_classifier("timm.test_resnet", 1, 10, 32).eval()
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 10)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded, _ = load_classifier(tmp_path / "sd.pt", "timm.test_resnet", shape=SHAPE)
    assert torch.allclose(loaded.eval()(x), model(x), atol=1e-6)
    one_line_error(
        lambda: build_classifier("timm.resnet10", 1, 10, 32),
        "unknown timm model 'resnet10'",
        "did you mean timm.resnet10t?",
    )


def test_unknown_names_suggest_the_closest_and_list_every_form():
    message = one_line_error(
        lambda: build_classifier("lenet_5", 1, 10, 32),
        "unknown classifier 'lenet_5'; did you mean 'lenet5'? known: lenet5, ",
    )
    for form in FORMS:
        assert form in message and form in classifier_names()
    assert "pip install 'dfkd[timm]'" in message
    one_line_error(
        lambda: build_classifier("torchvison.resnet18", 1, 10, 32), "did you mean 'torchvision.resnet18'?"
    )
    one_line_error(lambda: build_classifier("torchvision.resnet81", 1, 10, 32), "did you mean 'resnet18'?")
    plain = Registry("widget")
    plain.register("gear")(object)
    assert str(pytest.raises(DfkdError, plain.get, "zzz").value) == "unknown widget 'zzz'; known: gear"
    forms = Registry("widget", forms="any sprocket")
    forms.register("gear")(object)
    assert str(pytest.raises(DfkdError, forms.get, "geer").value) == (
        "unknown widget 'geer'; did you mean 'gear'? known: gear; or any sprocket"
    )


def test_lenet_size_error_and_kwargs_for_registered_archs():
    one_line_error(
        lambda: build_classifier("lenet5", 1, 10, 28),
        "LeNet-5 takes 32×32 inputs, not 28×28",
    )
    one_line_error(
        lambda: build_classifier("lenet5", 1, 10, 32, {"width": 2}), "takes no kwargs", "remove them"
    )


# get_teacher and check_runs


def test_a_run_loads_its_teacher_file_with_arch_kwargs_shape_and_trust(resnet, tmp_path):
    from dfkd.assemble import load_teacher
    from dfkd.config import config_from_dict

    path = tmp_path / "whole.pt"
    torch.save(resnet[0], path)
    spec = {"data": {"name": "none"}, "input": {"channels": 1, "size": 32, "num_classes": 10}}
    cfg = config_from_dict({**spec, "teacher": {"arch": ARCH, "checkpoint": str(path), "trust_pickle": True}})
    with pytest.warns(UserWarning, match="ran code"):
        model, meta = load_teacher(cfg, cfg.teacher, None, torch.device("cpu"), progress=False)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert logits_match(model, resnet) and meta["path"] == str(path) and meta["num_classes"] == 10
    export = tmp_path / "t.pt2"
    batch = ({0: torch.export.Dim("batch")},)
    torch.export.save(torch.export.export(resnet[0], (resnet[1],), dynamic_shapes=batch), export)
    cfg = config_from_dict({**spec, "teacher": {"checkpoint": str(export)}})
    model, meta = load_teacher(cfg, cfg.teacher, None, torch.device("cpu"), progress=False)
    assert not model.training and logits_match(model, resnet) and meta["format"] == "exported"
    five = config_from_dict(
        {**spec, "input": {**spec["input"], "num_classes": 5}, "teacher": {"checkpoint": str(export)}}
    )
    one_line_error(
        lambda: load_teacher(five, five.teacher, None, torch.device("cpu"), progress=False),
        "gives 10 classes, input.num_classes says 5",
    )


def test_check_runs_names_the_shape_it_gives():
    class Flat(nn.Module):
        def forward(self, x):
            return x.flatten()

    one_line_error(
        lambda: check_runs(Flat(), SHAPE, "'flat.pt'"),
        "teacher 'flat.pt' gives (2048,)",
        "must give logits of shape (2, 10)",
    )
    net = small_net().train()
    assert check_runs(net, SHAPE, "x") == 10 and net.training  # the mode is restored


def test_a_user_arch_is_cached_in_one_flat_file_name():
    from dfkd.config import DataConfig, TeacherConfig
    from dfkd.teachers import recipe_key

    key = recipe_key(DataConfig(), TeacherConfig(arch="../../elsewhere/net.py:Net"))
    assert "/" not in key and ":" not in key and key.startswith(f"{DataConfig().name}-")
    # arches that flatten alike stay apart by the recipe's digest
    assert recipe_key(DataConfig(), TeacherConfig(arch="a/b.py:N")) != recipe_key(
        DataConfig(), TeacherConfig(arch="a_b.py_N")
    )
