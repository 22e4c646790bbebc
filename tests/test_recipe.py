"""The default recipe fits itself to the teacher (dfkd.recipe), says so, and can be told not to."""

import json

import pytest
import torch
import torch.nn as nn
import yaml

from dfkd.config import ExperimentConfig, load_config, with_settings
from dfkd.configfile import shipped_experiments
from dfkd.errors import DfkdError
from dfkd.models import build_classifier
from dfkd.recipe import BATCHNORM_GAME, PLAIN_GAME, adapt_to_teachers, forward_flops, why_not_adapted
from dfkd.spec import InputSpec

SPEC = InputSpec(channels=1, size=32, num_classes=10, mean=(0.1307,), std=(0.3081,))


def teacher(arch):
    return build_classifier(arch, in_channels=1, num_classes=10, image_size=32)


STUDENT = teacher("lenet5_half")


def adapt(cfg, teachers, student=STUDENT):
    return adapt_to_teachers(cfg, teachers, student, SPEC)


def test_a_batchnorm_teacher_gets_the_batchnorm_game():
    cfg, notes = adapt(ExperimentConfig(), [teacher("resnet8")])
    assert cfg == with_settings(ExperimentConfig(), BATCHNORM_GAME)
    assert cfg.method.priors == {"bn": 10.0, "target": 0.5} and cfg.generator.conditional
    assert cfg.method.n_generator_steps == 2 and cfg.method.replay_size == 20000
    assert cfg.method.replay_pen_width == 1.0, "each stored batch gets a twin drawn with another pen"
    assert cfg.method.replay_elastic == 34.0, "and by another hand"
    # half the default batch (twice the iterations), and the default output in the pixel range
    assert cfg.train.batch_size == 128 and cfg.generator.output == "pixels"
    # the student on SGD with momentum, as Fast-DFKD's and CMI's
    student = cfg.student_optim
    assert (student.name, student.lr, student.momentum, student.warmup) == ("sgd", 0.1, 0.9, 50)
    (note,) = notes
    assert "teacher has 9 BatchNorm layers" in note and "adapt_to_teacher=false" in note
    # the note spells each change as the command line takes it
    assert 'method.priors={"bn":10.0,"target":0.5}' in note and "generator.conditional=true" in note


def test_the_note_is_a_list_of_overrides_that_reproduce_the_adapted_config():
    cfg, (note,) = adapt(ExperimentConfig(), [teacher("resnet8")])
    overrides = note.split(": ", 2)[2].split(";")[0].split(" ")
    assert load_config(None, overrides) == cfg


def test_settings_the_user_gave_are_kept_and_the_rest_adapted():
    given = with_settings(ExperimentConfig(), {"method.n_generator_steps": 3, "generator_optim.lr": 1e-4})
    cfg, (note,) = adapt(given, [teacher("resnet8")])
    assert cfg.method.n_generator_steps == 3 and cfg.generator_optim.lr == 1e-4
    assert cfg.generator.conditional and cfg.method.priors == BATCHNORM_GAME["method.priors"]
    assert "kept as configured: method.n_generator_steps=3 generator_optim.lr=0.0001" in note


def test_an_optimizer_the_user_configured_is_not_swapped_for_the_games():
    # an Adam learning rate given alone must not become SGD's: the student's optimizer stays whole
    given = with_settings(ExperimentConfig(), {"student_optim.lr": 3e-3})
    cfg, (note,) = adapt(given, [teacher("resnet8")])
    student = cfg.student_optim
    assert (student.name, student.lr, student.weight_decay, student.warmup) == ("adam", 3e-3, 0.0, 0)
    assert "kept as configured: student_optim.name=adam student_optim.lr=0.003" in note
    assert cfg.generator.conditional and cfg.generator_optim.lr == BATCHNORM_GAME["generator_optim.lr"]
    # so does Adam's momentum, and another optimizer by name
    for setting in ({"student_optim.betas": [0.5, 0.9]}, {"student_optim.name": "adam"}):
        cfg, _ = adapt(with_settings(ExperimentConfig(), setting), [teacher("resnet8")])
        assert (cfg.student_optim.name, cfg.student_optim.lr, cfg.student_optim.warmup) == ("adam", 1e-3, 0)


def test_settings_that_mean_the_same_under_any_optimizer_keep_the_games():
    # the game's SGD with the warm-up or weight decay given, or its name given alone
    cfg, _ = adapt(with_settings(ExperimentConfig(), {"student_optim.warmup": 100}), [teacher("resnet8")])
    assert (cfg.student_optim.name, cfg.student_optim.lr, cfg.student_optim.warmup) == ("sgd", 0.1, 100)
    cfg, _ = adapt(with_settings(ExperimentConfig(), {"student_optim.name": "sgd"}), [teacher("resnet8")])
    student = cfg.student_optim
    assert (student.lr, student.weight_decay, student.warmup) == (
        0.1,
        BATCHNORM_GAME["student_optim.weight_decay"],
        50,
    )


def test_a_setting_given_at_its_default_value_is_kept(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("method:\n  n_generators: 1\n")
    given = load_config(path, ["train.batch_size=256"])
    assert given == ExperimentConfig()  # both at their defaults, but given
    cfg, (note,) = adapt(given, [teacher("resnet8")])
    assert cfg.method.n_generators == 1 and cfg.train.batch_size == 256
    assert cfg.generator.conditional and cfg.method.priors == BATCHNORM_GAME["method.priors"]
    assert "kept as configured: method.n_generators=1 train.batch_size=256" in note
    # a config built in Python has given nothing: its defaults are left to the recipe
    assert adapt(ExperimentConfig(), [teacher("resnet8")])[0].method.n_generators == 2


def test_the_shipped_experiments_that_adapt_leave_the_games_settings_to_the_recipe():
    games = set(BATCHNORM_GAME) | set(PLAIN_GAME)
    adapting = {}
    for name, path in shipped_experiments().items():
        cfg = load_config(path)
        if cfg.method.adapt_to_teacher and not cfg.method.priors and not cfg.generator.conditional:
            adapting[name] = games.intersection(cfg.given)
    assert "mnist5k_demo" in adapting and not any(adapting.values()), adapting


def test_an_option_that_follows_one_generator_keeps_one():
    given = with_settings(ExperimentConfig(), {"method.generator_ema": 0.9})
    cfg, (note,) = adapt(given, [teacher("resnet8")])  # validated: several would be refused
    assert cfg.method.n_generators == 1 and cfg.method.priors == BATCHNORM_GAME["method.priors"]
    assert "method.n_generators stays 1: method.generator_ema follows one generator" in note
    assert "method.n_generators" not in note.split(";")[0]
    assert adapt(ExperimentConfig(), [teacher("resnet8")])[0].method.n_generators > 1


def test_a_memory_the_user_turned_off_takes_no_twins():
    given = with_settings(ExperimentConfig(), {"method.replay_size": 0})
    cfg, (note,) = adapt(given, [teacher("resnet8")])  # validated: a twin without a memory is refused
    assert cfg.method.replay_size == 0 and cfg.method.replay_pen_width == cfg.method.replay_elastic == 0
    for key in ("method.replay_pen_width", "method.replay_elastic"):
        assert f"{key} stays 0: method.replay_size=0 keeps no memory" in note
    kept = adapt(ExperimentConfig(), [teacher("resnet8")])[0].method
    assert kept.replay_pen_width == 1.0 and kept.replay_elastic == 34.0


def test_twins_asked_of_a_game_without_a_memory_are_one_line_naming_both_settings(tiny, tmp_path, run_of):
    # checked once the recipe has adapted the game: the BatchNorm game brings a memory, the plain none
    run = run_of(tiny(teacher={"arch": "resnet8"}, method={"replay_pen_width": 0.5}), tmp_path / "bn")
    assert run.cfg.method.replay_size == 20000 and run.cfg.method.replay_pen_width == 0.5
    with pytest.raises(
        DfkdError, match=r"^method.replay_pen_width=0.5 draws twins .* method.replay_size is 0; set"
    ):
        run_of(tiny(method={"replay_pen_width": 0.5}), tmp_path / "plain")
    with pytest.raises(DfkdError, match=r"^method.replay_elastic=34 draws twins .* method.replay_elastic=0$"):
        run_of(tiny(method={"replay_elastic": 34}), tmp_path / "warped")


def test_a_student_as_costly_as_its_teacher_gets_fewer_steps_and_a_small_one_keeps_all():
    # a generator step runs generator (14.9 MFLOPs an image), teacher and student; a student step,
    # the student alone: half of 2 x (14.9 + 202 + 52.7) / 52.7 = 5.1 steps for WRN-16-2 -> WRN-16-1
    cfg, (note,) = adapt(ExperimentConfig(), [teacher("wrn16_2")], teacher("wrn16_1"))
    assert cfg.method.n_student_steps == 5
    assert (
        "method.n_student_steps=5 keeps the student's forward FLOPs within 0.5 of the generator steps'"
        in note
    )
    assert "generator 14.9 teacher 202 student 52.7" in note
    assert adapt(ExperimentConfig(), [teacher("resnet8")])[0].method.n_student_steps == 20
    # a student far larger than its teacher still learns every iteration
    cfg, _ = adapt(ExperimentConfig(), [teacher("lenet5_bn")], teacher("wrn16_2"))
    assert cfg.method.n_student_steps == 1


def test_a_torchscript_teacher_costs_what_its_network_does():
    net = teacher("resnet8").eval()
    scripted = torch.jit.trace(net, torch.zeros(1, 1, 32, 32))
    image = torch.zeros(1, 1, 32, 32)
    assert forward_flops(scripted, image) == forward_flops(net, image) == 24_413_440


def test_steps_the_user_gave_are_kept_and_counting_the_cost_moves_no_state():
    given = with_settings(ExperimentConfig(), {"method.n_student_steps": 7})
    cfg, (note,) = adapt(given, [teacher("wrn16_2")], teacher("wrn16_1"))
    assert cfg.method.n_student_steps == 7 and "kept as configured: method.n_student_steps=7" in note
    assert "keeps the student's forward FLOPs" not in note
    student = build_classifier("resnet8", in_channels=1, num_classes=10, image_size=32).train()
    frozen = student.stem[1]  # a BatchNorm the user keeps in eval mode stays so
    frozen.eval()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teachers = [teacher("wrn16_1")]
    rng = torch.random.get_rng_state()
    adapt(ExperimentConfig(), teachers, student)
    assert torch.equal(rng, torch.random.get_rng_state()), "the run's draws are those of an unadapted run"
    assert student.training and not frozen.training
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_a_pool_with_one_batchnorm_teacher_is_adapted_and_counts_each_teachers_layers():
    cfg, notes = adapt(ExperimentConfig(), [teacher("lenet5"), teacher("lenet5_bn")])
    assert cfg.generator.conditional and "teachers have BatchNorm layers (0, 3)" in notes[0]


def test_teachers_without_batchnorm_get_the_jitter_and_the_input_prior():
    for arch in ("lenet5", "mlp"):
        cfg, (note,) = adapt(ExperimentConfig(), [teacher(arch)])
        assert cfg == with_settings(ExperimentConfig(), PLAIN_GAME)
        assert cfg.method.priors == {"input_kl": 1.0} and cfg.method.generator_shift == 2
        assert not cfg.generator.conditional and cfg.method.replay_size == 0, "no part of the BatchNorm game"
        assert cfg.method.replay_pen_width == cfg.method.replay_elastic == 0
        assert note.startswith("the teacher has no BatchNorm layers: the plain game with jitter")
        overrides = note.split(": ", 2)[2].split(";")[0].split(" ")
        assert load_config(None, overrides) == cfg
    # BatchNorm layers that keep no running statistics describe no training data
    bare = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten())
    assert adapt(ExperimentConfig(), [bare])[0] == with_settings(ExperimentConfig(), PLAIN_GAME)
    _, (note,) = adapt(ExperimentConfig(), [teacher("lenet5"), teacher("mlp")])
    assert note.startswith("no teacher has BatchNorm layers")


def test_what_the_user_set_is_left_alone():
    for settings in (
        {"method.priors": {"bn": 0.3}},
        {"generator.conditional": True},
        {"method.adapt_to_teacher": False},
    ):
        given = with_settings(ExperimentConfig(), settings)
        assert adapt(given, [teacher("resnet8")]) == (given, [])
    # a prior or a class-coded generator set by hand says that it replaces the recipe's game
    hand = with_settings(ExperimentConfig(), {"method.priors": {"blur": 1.0}, "generator.conditional": True})
    assert why_not_adapted(hand).startswith("method.priors and generator.conditional set: the game runs as")
    assert why_not_adapted(with_settings(hand, {"method.adapt_to_teacher": False})) is None
    assert why_not_adapted(ExperimentConfig()) is None  # adapted: its note says what changed


def test_a_run_with_a_prior_of_its_own_says_the_recipe_left_it_alone(tiny, tmp_path, run_of, capsys):
    run = run_of(
        tiny(teacher={"arch": "resnet8"}, method={"priors": {"tv": 1.0}}, train={"iterations": 1}), tmp_path
    )
    assert run.fit()["adaptations"] == []
    assert "dfkd: recipe: method.priors set: the game runs as configured" in capsys.readouterr().err


def test_extra_priors_join_the_recipes_game_and_are_checked_against_it(tiny, tmp_path, run_of):
    extra = {"memory_balance": 20.0, "bn": 3.0}
    cfg, (note,) = adapt(
        with_settings(ExperimentConfig(), {"method.extra_priors": extra}), [teacher("resnet8")]
    )
    assert cfg.method.priors == BATCHNORM_GAME["method.priors"] and "the BatchNorm game" in note
    assert 'with method.extra_priors={"memory_balance":20.0,"bn":3.0}' in note
    # the game's priors and the extra ones, an extra weight over the game's for the same name
    assert cfg.method.generator_priors == {"bn": 3.0, "target": 0.5, "memory_balance": 20.0}
    run = run_of(tiny(teacher={"arch": "resnet8"}, method={"extra_priors": extra}), tmp_path / "bn")
    losses, _ = run.game.generator_step()
    assert {"prior_bn", "prior_target", "prior_memory_balance"} <= set(losses)
    # the plain game keeps no memory for memory_balance to read: one line naming the extra prior
    with pytest.raises(DfkdError, match=r"method.extra_priors.memory_balance .* method.replay_size is 0"):
        run_of(tiny(method={"extra_priors": {"memory_balance": 1.0}}), tmp_path / "plain")
    # an extra prior the teacher cannot serve is refused under its own key
    with pytest.raises(DfkdError, match=r"^method.extra_priors.bn matches the teacher's BatchNorm"):
        run_of(tiny(method={"extra_priors": {"bn": 1.0}}), tmp_path / "lenet5")
    # with priors of one's own, the extra ones are added to those
    mine = with_settings(
        ExperimentConfig(), {"method.priors": {"tv": 1.0}, "method.extra_priors": {"onehot": 2}}
    )
    assert adapt(mine, [teacher("resnet8")])[0].method.generator_priors == {"tv": 1.0, "onehot": 2}


def test_a_run_prints_records_and_writes_its_adaptation(tiny, tmp_path, run_of, capsys):
    run = run_of(tiny(teacher={"arch": "resnet8"}, train={"iterations": 2}), tmp_path)
    summary = run.fit()
    err = capsys.readouterr().err
    assert "dfkd: recipe: the teacher has 9 BatchNorm layers" in err
    assert summary["adaptations"] == run.adaptations and len(run.adaptations) == 1
    assert json.loads((tmp_path / "summary.json").read_text())["adaptations"] == run.adaptations
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["method"]["priors"] == BATCHNORM_GAME["method.priors"]
    assert written["generator"]["conditional"] is True
    assert "train/prior_bn" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])


def test_an_adapted_run_resumes_under_the_same_adaptation(tiny, tmp_path, run_of):
    cfg = tiny(teacher={"arch": "resnet8"})
    assert run_of(cfg, tmp_path).fit(stop_at=2) is None  # paused, with a checkpoint of the adapted config
    resumed = run_of(cfg, tmp_path)
    resumed.resume()
    assert resumed.iterations_done == 2 and resumed.fit()["adaptations"] == resumed.adaptations
