"""A collapsed generator is noticed within a short run and, by default, started afresh."""

import json

import torch

from dfkd.health import CollapseMonitor


class OneClassTeacher(torch.nn.Module):
    """A teacher that files every image under class 3: whatever the generator makes, its batches
    are 100 % one class, a collapse by construction."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10, device=x.device)
        logits[:, 3] = 10.0
        return logits + 0.0 * x.mean()  # keeps the generator's graph connected


class EveryClassTeacher(torch.nn.Module):
    """A teacher that files image i of a batch under class i mod 10: every class equally often."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 10, device=x.device)
        logits[torch.arange(x.shape[0]), torch.arange(x.shape[0]) % 10] = 10.0
        return logits + 0.0 * x.mean()


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_window_scales_with_the_run_length():
    assert CollapseMonitor.for_run(0.9, 5, iterations=200, log_every=50).patience == 2
    assert CollapseMonitor.for_run(0.9, 5, iterations=1000, log_every=50).patience == 5
    assert CollapseMonitor.for_run(0.9, 5, iterations=20000, log_every=50).patience == 5


# a 200-iteration run logged every 50: the collapse window is 2 intervals
SHORT = {"iterations": 200, "log_every": 50, "eval_every": 200, "sample_every": 200, "checkpoint_every": 200}


def collapsed_run(tiny, run_of, tmp_path, action):
    cfg = tiny(train={**SHORT, "collapse_action": action})
    run = run_of(cfg, tmp_path)
    run.game.pool.models[0] = run.game.teacher = OneClassTeacher()
    return run


def test_a_collapse_in_a_200_iteration_run_reinitialises_the_generator(tiny, run_of, tmp_path, capsys):
    run = collapsed_run(tiny, run_of, tmp_path, "reinit")
    resets = []
    reset = run.game.reset_generator
    run.game.reset_generator = lambda k, seed: (resets.append(run.iterations_done), reset(k, seed))
    run.fit()
    flags = {r["step"]: r["health/collapse"] for r in records(tmp_path) if "health/collapse" in r}
    assert flags == {50: 0.0, 100: 1.0, 150: 0.0, 200: 1.0}, "fires after 2 intervals, again after a reset"
    assert resets == [100, 200]
    assert [r["health/generator_resets"] for r in records(tmp_path) if "health/generator_resets" in r] == [
        0,
        1,
        1,
        2,
    ]
    assert "the generator starts afresh" in capsys.readouterr().err


def test_of_two_generators_the_one_that_collapses_is_the_one_started_afresh(tiny, run_of, tmp_path, capsys):
    run = run_of(tiny(method={"n_generators": 2, "replay_size": 4096}, train=SHORT), tmp_path)
    # generator 0 plays the even iterations, against a teacher that reads all it makes as one class;
    # the mean over both generators (about 0.56) stays under the threshold, its own share does not.
    # Generator 1 plays the iteration before each log step, so a reset of the last player would miss.
    run.game.pool.choose = lambda step: ((OneClassTeacher(), EveryClassTeacher())[step % 2], None)
    memories, reset = [], run.game.reset_generator

    def watched(k, seed):
        reset(k, seed)
        memory, players = run.game.batches.memory, run.game.generator_players
        fresh = [not p.optimizer.state for p in players]  # which optimizers start afresh
        memories.append(
            (run.iterations_done, k, fresh, memory.size, set(memory.owners[: memory.size].tolist()))
        )

    run.game.reset_generator = watched
    run.fit()
    logged = [r for r in records(tmp_path) if "health/collapse" in r]
    assert [r["health/collapse"] for r in logged] == [0.0, 1.0, 0.0, 1.0]
    assert all(r["train/top_class_frac_g0"] == 1.0 and r["train/top_class_frac_g1"] < 0.2 for r in logged)
    assert all(r["train/top_class_frac"] < 0.9 for r in logged), "the mean alone would hide it"
    # generator 1 makes 50 batches of 16 by step 100 (800 images) and 100 by step 200 (1,600)
    assert memories == [(100, 0, [True, False], 800, {1}), (200, 0, [True, False], 1600, {1})], (
        "only generator 0 starts afresh, and only its images leave the memory"
    )
    err = capsys.readouterr().err
    assert "generator 0 starts afresh" in err
    # the student learns nothing from these teachers, and the hint does not speak of one generator
    assert "near chance" in err and "A generator collapsed (health/collapse)" in err


def test_reset_generator_draws_fresh_weights_and_clears_the_optimizer(tiny, run_of, tmp_path):
    run = run_of(tiny(), tmp_path)
    run.step()
    before = {k: v.clone() for k, v in run.game.generator.state_dict().items()}
    assert run.game.generator_player.optimizer.state
    rng = torch.get_rng_state()
    run.game.reset_generator(0, seed=123)
    after = run.game.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not run.game.generator_player.optimizer.state
    assert torch.equal(rng, torch.get_rng_state()), "the run's own random stream is untouched"
    again = run_of(tiny(), tmp_path / "again")
    again.game.reset_generator(0, seed=123)
    assert all(torch.equal(after[k], v) for k, v in again.game.generator.state_dict().items())


def test_collapse_action_warn_only_warns(tiny, run_of, tmp_path, capsys):
    run = collapsed_run(tiny, run_of, tmp_path, "warn")
    run.game.reset_generator = lambda k, seed: (_ for _ in ()).throw(AssertionError("no reset with warn"))
    run.fit()
    flags = [r["health/collapse"] for r in records(tmp_path) if "health/collapse" in r]
    assert flags == [0.0, 1.0, 1.0, 1.0]
    assert "consider method.priors" in capsys.readouterr().err


def test_a_reset_also_restarts_the_averaged_generator_and_empties_the_replay_memory(tiny, run_of, tmp_path):
    run = run_of(tiny(method={"generator_ema": 0.9, "replay_size": 64}), tmp_path)
    run.step()
    assert run.game.batches.memory.size > 0
    run.game.reset_generator(0, seed=5)
    fresh = run.game.generator.state_dict()
    average = run.game.batches.generator_average.model.state_dict()
    assert all(torch.equal(fresh[k], average[k]) for k in fresh)
    assert run.game.batches.memory.size == 0
    run.step()  # and the run goes on from there
