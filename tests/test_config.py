import pytest

from dfkd.config import ExperimentConfig, load_config, parse_override
from dfkd.errors import DfkdError


def write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_defaults_are_valid():
    cfg = load_config()
    assert cfg == ExperimentConfig().validate()


def test_yaml_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "name: x\nmethod:\n  loss: kl\n  n_student_steps: 3\nstudent_optim:\n  lr: 0.5\n")
    cfg = load_config(path, ["method.n_student_steps=10", "generator_optim.lr=1e-4", "teacher.checkpoint=null"])
    assert cfg.name == "x"
    assert cfg.method.loss == "kl"
    assert cfg.method.n_student_steps == 10
    assert cfg.generator_optim.lr == pytest.approx(1e-4)
    assert cfg.teacher.checkpoint is None
    # a section given in YAML starts from that section's own defaults, not another's
    assert cfg.student_optim.name == ExperimentConfig().student_optim.name
    assert cfg.student_optim.lr == 0.5


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
        ("method:\n  reuse_samples: 1\n", r"method\.reuse_samples: expected bool"),
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
