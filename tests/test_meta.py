"""Fast-DFKD's meta-learned generator start (dfkd.meta): where each iteration's generator steps
begin, how the start moves under each rule, and that it is checked, reset and kept with the run."""

import pytest
import torch

from dfkd.errors import DfkdError

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.0, "schedule": "constant"}


def meta_game(tiny, tmp_path, run_of, rule, optim=SGD, steps=3):
    method = {"meta_generator": rule, "n_generator_steps": steps}
    return run_of(tiny(method=method, generator_optim=optim), tmp_path).game


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def record_inner_gradients(game):
    """The generator's gradient at each inner step, as its optimizer applied it."""
    seen, step = [], game.generator_player.step

    def spied(loss):
        step(loss)
        seen.append([p.grad.clone() for p in game.generator.parameters()])

    game.generator_player.step = spied
    return seen


def test_fomaml_moves_the_start_by_the_sum_of_the_inner_gradients(tiny, tmp_path, run_of):
    game = meta_game(tiny, tmp_path, run_of, "fomaml")
    start, lr = params(game.meta.module), SGD["lr"]
    seen = record_inner_gradients(game)
    game.generator_steps(3)
    summed = [sum(g[i] for g in seen) for i in range(len(start))]
    assert len(seen) == 3 and any(s.abs().max() > 0 for s in summed)
    for s, g, meta, fast in zip(start, summed, game.meta.module.parameters(), game.generator.parameters()):
        torch.testing.assert_close(fast, s - lr * g)  # the inner steps began at the start (plain SGD)
        torch.testing.assert_close(meta, s - 3 * lr * g)  # the start's rate: inner rate x inner steps


def test_reptile_moves_the_start_towards_where_the_inner_steps_ended(tiny, tmp_path, run_of):
    game = meta_game(tiny, tmp_path, run_of, "reptile")
    start, lr = params(game.meta.module), SGD["lr"]
    game.generator_steps(3)
    moved = False
    for s, meta, fast in zip(start, game.meta.module.parameters(), game.generator.parameters()):
        torch.testing.assert_close(meta, s - 3 * lr * (s - fast))
        moved |= bool((meta != s).any())
    assert moved


def test_every_iteration_starts_at_the_start_with_a_fresh_optimizer(tiny, tmp_path, run_of):
    adam = {"name": "adam", "lr": 1e-3, "schedule": "constant"}
    game = meta_game(tiny, tmp_path, run_of, "fomaml", optim=adam, steps=2)
    starts, step = [], game.generator_step

    def spied():
        starts.append(params(game.generator))
        return step()

    game.generator_step = spied
    game.iteration(0)
    meta_after_first = params(game.meta.module)
    game.iteration(1)
    for a, b in zip(starts[2], meta_after_first):
        assert torch.equal(a, b)  # the second iteration began where the start had moved to
    assert any(not torch.equal(a, b) for a, b in zip(starts[1], starts[0]))  # inner steps move it
    steps = {int(s["step"]) for s in game.generator_player.optimizer.state.values()}
    assert steps == {2}  # its Adam counts this iteration's two steps only
    # only the parameters restart: the live generator's BatchNorm statistics carry on
    live, start = dict(game.generator.named_buffers()), dict(game.meta.module.named_buffers())
    assert any(not torch.equal(live[k], start[k]) for k in live if k.endswith("running_mean"))


def test_a_generator_reset_resets_the_start_and_its_optimizer(tiny, tmp_path, run_of):
    adam = {"name": "adam", "lr": 1e-3}
    game = meta_game(tiny, tmp_path, run_of, "reptile", optim=adam, steps=2)
    game.iteration(0)
    assert game.meta.player.optimizer.state
    game.reset_generator(0, seed=5)
    for a, b in zip(game.generator.parameters(), game.meta.module.parameters()):
        assert torch.equal(a, b)
    assert not game.meta.player.optimizer.state


def test_the_start_is_a_player_of_the_run(tiny, tmp_path, run_of):
    game = meta_game(tiny, tmp_path, run_of, "fomaml")
    assert game.players["m"] is game.meta.player and game.networks["generator_meta"] is game.meta.module
    assert game.meta.player.lr == pytest.approx(3 * SGD["lr"])
    plain = run_of(tiny(), tmp_path / "plain").game
    assert "m" not in plain.players and "generator_meta" not in plain.networks


@pytest.mark.parametrize(
    "method, message",
    [
        ({"meta_generator": "maml"}, "meta_generator must be one of null, fomaml, reptile; got 'maml'"),
        ({"meta_generator": "fomaml", "contrast": 0.5}, "set one of them off"),
    ],
)
def test_bad_meta_settings_are_refused(tiny, method, message):
    with pytest.raises(DfkdError, match=message.replace("(", r"\(")):
        tiny(method=method)
