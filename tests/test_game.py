"""The game's seams: a Player steps its own parameters alone; a Game holds its players and networks."""

import warnings

import pytest
import torch
import torch.nn as nn

from dfkd.config import OptimizerConfig
from dfkd.optim import WeightAverage
from dfkd.player import Player

CPU = torch.device("cpu")
SGD = OptimizerConfig(name="sgd", lr=1.0, momentum=0.0, schedule="constant")


def test_a_player_backpropagates_into_its_own_parameters_alone():
    mine, other = nn.Linear(3, 1), nn.Linear(3, 1)
    player = Player(mine, SGD, 10, CPU)
    assert player.params == list(mine.parameters()) and player.forward is mine  # no DDP without torchrun
    before = [p.clone() for p in mine.parameters()]
    x = torch.randn(4, 3)
    loss = (player.forward(x) * other(x)).sum()  # reaches both modules
    player.step(loss)
    assert all(p.grad is not None for p in mine.parameters())
    assert all(p.grad is None for p in other.parameters())
    # plain SGD at rate 1: each parameter moved by minus its gradient
    assert all(torch.allclose(p, b - p.grad) for p, b in zip(mine.parameters(), before))


def test_each_step_starts_from_fresh_gradients():
    module = nn.Linear(2, 1)
    player = Player(module, SGD, 10, CPU)
    x = torch.ones(1, 2)
    player.step(module(x).sum())
    player.step(3 * module(x).sum())
    assert torch.equal(module.weight.grad, torch.full((1, 2), 3.0)), "not accumulated over steps"


def test_grad_clip_bounds_the_step():
    module = nn.Linear(4, 1, bias=False)
    player = Player(module, OptimizerConfig(name="sgd", lr=1.0, momentum=0.0, grad_clip=0.5), 10, CPU)
    before = module.weight.clone()
    player.step(1000 * module(torch.ones(1, 4)).sum())
    assert torch.linalg.vector_norm(module.weight - before).item() == torch.tensor(0.5).item()


def test_the_weight_average_follows_every_step_and_the_rate_is_the_schedules():
    module = nn.Linear(2, 1)
    player = Player(module, OptimizerConfig(lr=0.1), 4, CPU)
    player.average = WeightAverage(module, 0.5)
    start = [p.clone() for p in module.parameters()]
    player.step(module(torch.ones(1, 2)).sum())
    for avg, old, new in zip(player.average.model.parameters(), start, module.parameters()):
        assert torch.allclose(avg, 0.5 * old + 0.5 * new)
    assert player.lr == 0.1
    player.schedule.step()
    assert player.lr < 0.1


def test_a_game_holds_a_player_per_trained_network(tiny, tmp_path, run_of):
    game = run_of(tiny(method={"name": "gankd", "beta": 0.5}, train={"student_ema": 0.9}), tmp_path).game
    assert set(game.players) == {"s", "g", "d"}
    assert game.players["g"].params == list(game.generator.parameters())
    assert game.players["d"].params == list(game.method.discriminator.parameters())
    assert {id(p) for p in game.student.parameters()} <= {id(p) for p in game.players["s"].params}
    assert set(game.networks) == {"student", "generator", "ema", "discriminator"}
    # the deployed student is the weight average, which follows the student's steps
    assert game.deployed_student is game.networks["ema"] and game.players["s"].average is game.student_average
    assert game.images_per_iteration == 5 * 16  # student steps x batch, on one process
    metrics = game.iteration(0)
    expected = {"train/loss_G", "train/loss_S", "train/loss_D", "train/acc_D", "train/top_class_frac"}
    assert expected <= set(metrics)
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    top = metrics["train/top_class_frac"].item()
    assert 1 / 10 <= top <= 1


def test_generators_take_turns_and_each_steps_only_on_its_own(tiny, tmp_path, run_of):
    game = run_of(tiny(method={"n_generators": 2, "replay_size": 64}), tmp_path).game
    first, second = game.generators
    assert set(game.players) == {"s", "g", "g1"} and {"generator", "generator_1"} <= set(game.networks)
    assert game.players["g1"].params == list(second.parameters())

    def weights(g):
        return [p.detach().clone() for p in g.parameters()]

    def moved(before, g):
        return any(not torch.equal(a, b) for a, b in zip(before, g.parameters()))

    assert moved(weights(first), second), "each generator starts from weights of its own"

    a, b = weights(first), weights(second)
    game.iteration(0)
    assert moved(a, first) and not moved(b, second) and game.generator is first
    a = weights(first)
    game.iteration(1)
    assert moved(b, second) and not moved(a, first) and game.generator is second
    assert game.batches.memory.size == 32  # both generators' batches in the one memory
    game.iteration(2)
    assert game.generator is first


def test_each_generators_schedule_runs_over_its_own_turns(tiny, tmp_path, run_of):
    cfg = tiny(
        method={"n_generators": 2, "replay_size": 64},
        generator_optim={"schedule": "cosine"},
        train={"iterations": 3},  # the first generator plays iterations 0 and 2, the second 1
    )
    game = run_of(cfg, tmp_path).game
    base = cfg.generator_optim.lr
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns of a schedule stepped before its optimizer
        game.iteration(0)
    lrs = [p.optimizer.param_groups[0]["lr"] for p in game.generator_players]
    assert lrs == pytest.approx([base / 2, base])  # half the first's cosine; the second not yet played


def test_one_generator_is_the_default_and_several_refuse_what_follows_one(tiny):
    from dfkd.errors import DfkdError

    assert tiny().method.n_generators == 1
    with pytest.raises(DfkdError, match=r"n_generators=2 plays generators in turn, but method.generator_ema"):
        tiny(method={"n_generators": 2, "generator_ema": 0.9})
    with pytest.raises(DfkdError, match="method.n_generators must be"):
        tiny(method={"n_generators": 0})
