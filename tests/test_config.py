import dataclasses
import re

import pytest
import yaml

from dfkd.config import (
    ExperimentConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    with_settings,
)
from dfkd.errors import DfkdError


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


ADAM = {
    "name": "adam",
    "lr": 1e-3,
    "momentum": 0.9,
    "betas": [0.9, 0.999],
    "weight_decay": 0.0,
    "schedule": "cosine",
    "warmup": 0,
    "grad_clip": None,
}
# The defaults, written out: the MNIST-5k demo (DFAD with a KL discrepancy, LeNet-5 into LeNet-5-half).
DEFAULTS = {
    "name": "experiment",
    "data": {"name": "mnist5k", "root": None, "image_size": 32},
    "input": {"channels": None, "size": None, "num_classes": None, "mean": None, "std": None},
    "eval": {
        "folder": None,
        "file": None,
        "classes": [],
        "synthetic_holdout": 1000,
        "min_teacher_margin": 0.25,
    },
    "teacher": {
        "arch": "lenet5",
        "kwargs": {},
        "checkpoint": None,
        "trust_pickle": False,
        "epochs": 8,
        "batch_size": 64,
        "lr": 0.002,
        "seed": 0,
    },
    "teachers": [],
    "pool": {"strategy": "random", "weights": [], "response_teacher": 0, "feature_teacher": 1},
    "student": {"arch": "lenet5_half", "kwargs": {}},
    "generator": {"name": "dfad", "latent_dim": 100, "width": 16, "output": "pixels", "conditional": False},
    "method": {
        "name": "adversarial",
        "loss": "kl",
        "adversarial_weight": 1.0,
        "temperature": 1.0,
        "adversarial_agreed_only": False,
        "n_student_steps": 5,
        "n_generator_steps": 1,
        "n_generators": 1,
        "reuse_samples": True,
        "priors": {},
        "extra_priors": {},
        "adapt_to_teacher": True,
        "activation_layer": None,
        "contrast": 0.0,
        "contrast_temperature": 0.1,
        "contrast_bank": 4096,
        "contrast_crop": 0.25,
        "meta_generator": None,
        "replay_size": 0,
        "replay_pen_width": 0.0,
        "replay_elastic": 0.0,
        "generator_shift": 0,
        "generator_rotate": 0.0,
        "generator_scale": 0.0,
        "student_shift": 0,
        "generator_ema": 0.0,
        "generator_ema_mix": 0.5,
        "student_flip": False,
        "student_mixup": 0.0,
        "features": [],
        "feature_loss": "at",
        "feature_weight": 250.0,
        "alpha": 1.0,
        "beta": 0.1,
        "gan_loss": "bce",
    },
    "discriminator": {"name": "mlp", "width": 128, "spectral_norm": False, "layers": [], "steps": 1},
    "student_optim": ADAM,
    "generator_optim": ADAM,
    "discriminator_optim": {**ADAM, "lr": 2e-4, "betas": [0.5, 0.999]},
    "train": {
        "iterations": 1000,
        "time_limit": 0.0,
        "batch_size": 256,
        "seed": 0,
        "device": "cpu",
        "log_every": 50,
        "eval_every": 200,
        "sample_every": 500,
        "checkpoint_every": 500,
        "student_ema": 0.99,
        "max_rollbacks": 3,
        "rollback_lr_factor": 0.5,
        "collapse_threshold": 0.9,
        "collapse_patience": 5,
        "collapse_action": "reinit",
    },
    # unset: chosen for the device when the run starts (tests/test_perf.py)
    "perf": {"channels_last": None, "compile": None, "autocast": None, "fused_optimizers": None},
    "tracking": {
        "mode": "offline",
        "project": "dfkd",
        "entity": None,
        "run_name": None,
        "init_timeout": 60.0,
    },
    "given": [],
}


def test_defaults_are_the_demo_and_valid():
    cfg = load_config()
    assert config_to_dict(cfg) == DEFAULTS
    assert config_to_dict(ExperimentConfig().validate()) == DEFAULTS


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "name: x\nmethod:\n  loss: kl\n  n_student_steps: 3\nstudent_optim:\n  lr: 0.5\n")
    overrides = ["method.n_student_steps=10", "generator_optim.lr=1e-4", "teacher.checkpoint=null"]
    cfg = load_config(path, overrides)
    assert cfg.name == "x"
    assert cfg.method.loss == "kl"
    assert cfg.method.n_student_steps == 10
    assert cfg.generator_optim.lr == pytest.approx(1e-4)
    assert cfg.teacher.checkpoint is None
    # a section given in YAML starts from that section's own defaults, not another's
    assert cfg.student_optim.name == ExperimentConfig().student_optim.name
    assert cfg.student_optim.lr == 0.5


def test_the_config_records_which_settings_were_given(tmp_path):
    path = write(tmp_path, "name: x\nmethod:\n  n_generators: 1\n  priors: {bn: 1}\nteachers: []\n")
    cfg = load_config(path, ["train.batch_size=256", "method.priors.tv=0.5"])
    assert cfg.given == ["method.n_generators", "method.priors", "name", "teachers", "train.batch_size"]
    assert load_config().given == [] and ExperimentConfig().given == []
    # settings made later join it, and copies keep it
    later = with_settings(cfg, {"perf.compile": True})
    assert later.given == sorted([*cfg.given, "perf.compile"])
    assert dataclasses.replace(later, name="y").given == later.given
    # the written config.yaml says everything, so everything in it counts as given
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(later)))
    again = load_config(tmp_path / "config.yaml")
    assert "train.iterations" in again.given and set(later.given) <= set(again.given)
    # where a value came from is not part of what the config says
    assert again == later and config_from_dict(config_to_dict(ExperimentConfig())) == ExperimentConfig()


def test_given_lists_only_settings_of_the_config(tmp_path):
    path = tmp_path / "saved.yaml"
    for bad in ("method.nope", "method", "train.iterations.x"):
        path.write_text(f"given: [{bad}]\n")
        with pytest.raises(DfkdError, match=rf"given lists '{re.escape(bad)}', which is no setting"):
            load_config(path)
    path.write_text("given: [method.priors, teachers, train.iterations]\n")
    assert load_config(path).given == ["method.priors", "teachers", "train.iterations"]


def test_int_widens_to_float_but_not_the_reverse(tmp_path):
    cfg = load_config(None, ["student_optim.lr=1"])
    assert isinstance(cfg.student_optim.lr, float)
    with pytest.raises(DfkdError, match=r"train\.iterations: expected int, got 1\.5"):
        load_config(None, ["train.iterations=1.5"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("methd:\n  loss: kl\n", r"unknown config key 'methd'"),
        ("method:\n  los: kl\n", r"unknown config key 'method\.los'"),
        ("train:\n  batch_size: many\n", r"train\.batch_size: expected int, got 'many'"),
        ("train:\n  reuse: [1\n", r"not valid YAML at line"),
        ("method: 3\n", r"method: expected a mapping"),
        ("train:\n  batch_size: 0\n", r"train\.batch_size must be positive, got 0"),
        ("student_optim:\n  lr: -0.1\n", r"student_optim\.lr must be positive"),
        ("method:\n  n_student_steps: -2\n", r"method\.n_student_steps must be positive"),
        ("tracking:\n  mode: loud\n", r"tracking\.mode must be one of online, offline, disabled"),
        ("generator:\n  output: rgb\n", r"generator\.output must be one of standardized, pixels; got .rgb."),
        ("method:\n  student_mixup: 1.5\n", r"method\.student_mixup must be in \[0, 1\]"),
        ("method:\n  generator_rotate: -5\n", r"method\.generator_rotate must be in \[0, 180\], got -5"),
        ("train:\n  time_limit: -1\n", r"train\.time_limit must be 0 \(off\) or positive, got -1"),
        ("method:\n  generator_scale: 1.0\n", r"method\.generator_scale must be in \[0, 1\), got 1\.0"),
        ("method:\n  reuse_samples: 1\n", r"method\.reuse_samples: expected bool"),
        ("method:\n  replay_pen_width: 2\n", r"method\.replay_pen_width must be in \[0, 1\], got 2"),
        ("method:\n  replay_elastic: -3\n", r"method\.replay_elastic must be 0 \(off\) or positive, got -3"),
        ("- a\n- b\n", r"must hold a mapping"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(DfkdError, match=message):
        load_config(write(tmp_path, text))


def test_yaml_cannot_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(DfkdError, match="not valid YAML"):
        load_config(write(tmp_path, text))
    assert not marker.exists()


def test_missing_file_and_bad_override():
    with pytest.raises(DfkdError, match="not found"):
        load_config("no/such/file.yaml")
    with pytest.raises(DfkdError, match="section.key=value"):
        parse_override("train.iterations")
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a.b=true") == ("a.b", True)
