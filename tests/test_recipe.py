"""The default recipe fits itself to the teacher (dfkd.recipe), says so, and can be told not to."""

import json

import torch.nn as nn
import yaml

from dfkd.config import ExperimentConfig, with_settings
from dfkd.models import build_classifier
from dfkd.recipe import BATCHNORM_PRIORS, adapt_to_teachers


def teacher(arch):
    return build_classifier(arch, in_channels=1, num_classes=10, image_size=32)


def test_a_batchnorm_teacher_gets_the_batchnorm_prior():
    cfg, notes = adapt_to_teachers(ExperimentConfig(), [teacher("resnet8")])
    assert cfg.method.priors == BATCHNORM_PRIORS == {"bn_kl": 1.0}
    assert cfg.generator == ExperimentConfig().generator
    (note,) = notes
    assert "teacher has 9 BatchNorm layers" in note and "adapt_to_teacher=false" in note
    cfg.validate()


def test_a_pool_with_one_batchnorm_teacher_is_adapted_and_counts_each_teachers_layers():
    cfg, notes = adapt_to_teachers(ExperimentConfig(), [teacher("lenet5"), teacher("lenet5_bn")])
    assert cfg.method.priors == BATCHNORM_PRIORS and "teachers have BatchNorm layers (0, 3)" in notes[0]


def test_teachers_without_batchnorm_keep_the_plain_game():
    for arch in ("lenet5", "mlp"):
        cfg, notes = adapt_to_teachers(ExperimentConfig(), [teacher(arch)])
        assert cfg == ExperimentConfig() and notes == []
    # BatchNorm layers that keep no running statistics describe no training data
    bare = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    assert adapt_to_teachers(ExperimentConfig(), [bare])[1] == []


def test_what_the_user_set_is_left_alone():
    for settings in (
        {"method.priors": {"bn": 0.3}},
        {"generator.conditional": True},
        {"method.adapt_to_teacher": False},
    ):
        given = with_settings(ExperimentConfig(), settings)
        assert adapt_to_teachers(given, [teacher("resnet8")]) == (given, [])


def test_a_run_prints_records_and_writes_its_adaptation(tiny, tmp_path, run_of, capsys):
    run = run_of(tiny(teacher={"arch": "resnet8"}, train={"iterations": 2}), tmp_path)
    summary = run.fit()
    err = capsys.readouterr().err
    assert "dfkd: recipe: the teacher has 9 BatchNorm layers" in err
    assert summary["adaptations"] == run.adaptations and len(run.adaptations) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["adaptations"] == run.adaptations
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["method"]["priors"] == BATCHNORM_PRIORS
    assert "train/prior_bn_kl" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])


def test_an_adapted_run_resumes_under_the_same_adaptation(tiny, tmp_path, run_of):
    cfg = tiny(teacher={"arch": "resnet8"})
    assert run_of(cfg, tmp_path).fit(stop_at=2) is None  # paused, with a checkpoint of the adapted config
    resumed = run_of(cfg, tmp_path)
    resumed.resume()
    assert resumed.iterations_done == 2 and resumed.fit()["adaptations"] == resumed.adaptations
