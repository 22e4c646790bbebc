"""Teacher pools: strategies, reproducibility, input spaces, refusals, and a pool in a real run."""

import json
import random

import pytest
import torch

from dfkd.config import PoolConfig
from dfkd.errors import DfkdError
from dfkd.models import build_classifier
from dfkd.pool import STRATEGIES, TeacherPool
from dfkd.spec import InputSpec

META = {"num_classes": 10, "in_channels": 1, "image_size": 32, "mean": [0.1307], "std": [0.3081]}
SPEC = InputSpec(1, 32, 10, (0.1307,), (0.3081,))  # MNIST's input space


def pool_of(archs, strategy="mean", metas=None, **cfg):
    torch.manual_seed(0)
    models = [build_classifier(a, 1, 10, 32).eval().requires_grad_(False) for a in archs]
    metas = metas or [dict(META, arch=a) for a in archs]
    return TeacherPool(models, metas, SPEC, PoolConfig(strategy=strategy, **cfg), seed=7)


def draws(strategy, n, count, seed=0):
    s = STRATEGIES.get(strategy)(n, PoolConfig())
    rng = random.Random(seed)
    return [next(iter(s.choose(step, rng).response)) for step in range(count)]


def test_random_is_reproducible_and_uniform():
    first, second = draws("random", 3, 3000), draws("random", 3, 3000)
    assert first == second
    assert draws("random", 3, 3000, seed=1) != first
    counts = [first.count(i) for i in range(3)]
    # Pearson's chi-square against uniform, 2 degrees of freedom: 13.82 is its 0.999 quantile.
    chi2 = sum((c - 1000) ** 2 / 1000 for c in counts)
    assert chi2 < 13.82, counts


def test_round_robin_cycles():
    assert draws("round_robin", 3, 7) == [0, 1, 2, 0, 1, 2, 0]


def test_mean_and_weighted_are_the_hand_computed_averages():
    x = torch.randn(5, 1, 32, 32)
    pool = pool_of(["lenet5", "mlp", "lenet5_half"])
    outs = [m(x) for m in pool.models]
    teacher, feature = pool.choose(0)
    assert feature is None
    assert torch.allclose(teacher(x), (outs[0] + outs[1] + outs[2]) / 3, atol=1e-6)
    assert pool.uses == [1, 1, 1]
    weighted = pool_of(["lenet5", "mlp", "lenet5_half"], "weighted", weights=[1.0, 3.0, 0.0])
    teacher, _ = weighted.choose(0)
    assert torch.allclose(teacher(x), 0.25 * outs[0] + 0.75 * outs[1], atol=1e-6)
    assert weighted.uses == [1, 1, 0]


@pytest.mark.parametrize(
    "strategy, cfg, message",
    [
        ("weighted", {"weights": [1.0]}, "pool.weights must hold 2 non-negative weights"),
        ("weighted", {"weights": [0.0, 0.0]}, "not all 0"),
        ("split", {"feature_teacher": 2}, "pool.feature_teacher must index one of the 2 teachers"),
        ("best", {}, "unknown teacher strategy 'best'; known: mean, random"),
    ],
)
def test_bad_pool_settings_are_refused(strategy, cfg, message):
    with pytest.raises(DfkdError, match=message):
        pool_of(["lenet5", "mlp"], strategy, **cfg)


def test_split_plays_one_teacher_and_reads_features_from_another():
    pool = pool_of(["lenet5", "mlp"], "split", response_teacher=1, feature_teacher=0)
    teacher, feature = pool.choose(0)
    assert teacher is pool.models[1] and feature == 0


def test_a_teacher_with_other_input_statistics_gets_its_own_space():

    metas = [dict(META, arch="lenet5"), dict(META, arch="lenet5", mean=[0.5], std=[0.25])]
    torch.manual_seed(0)
    plain = build_classifier("lenet5", 1, 10, 32).eval()
    pool = pool_of(["lenet5", "lenet5"], metas=metas)
    pool.models[1].load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 32, 32)
    raw = x * 0.3081 + 0.1307
    assert torch.allclose(pool.models[1](x), plain((raw - 0.5) / 0.25), atol=1e-5)
    assert not pool.models[0]._forward_pre_hooks, "same statistics: inputs untouched"


POOL = [
    {"arch": "lenet5", "epochs": 1},
    {"arch": "mlp", "epochs": 1, "seed": 1},
    {"arch": "lenet5_half", "epochs": 1, "seed": 2},
]


def test_a_pool_run_logs_each_teacher_and_resumes_the_same_sequence(tiny, tmp_path, run_of):
    cfg = tiny(teachers=POOL, train={"iterations": 6, "checkpoint_every": 3, "log_every": 3, "eval_every": 3})

    def record(run):
        """Spy on the pool: the index of the teacher each iteration plays against."""
        pool = run.game.pool
        picks, choose = [], pool.choose

        def spy(step):
            teacher, feature = choose(step)
            picks.append(pool.models.index(teacher))
            return teacher, feature

        pool.choose = spy
        return picks

    full = run_of(cfg, tmp_path / "full")
    full_seq = record(full)
    summary = full.fit()
    first = run_of(cfg, tmp_path / "split")
    first_seq = record(first)
    first.fit(stop_at=3)
    resumed = run_of(cfg, tmp_path / "split")
    resumed.resume(resumed.checkpoint_path)
    resumed_seq = record(resumed)
    resumed.fit()
    assert first_seq + resumed_seq == full_seq and len(set(full_seq)) > 1
    assert resumed.game.pool.uses == full.game.pool.uses and sum(full.game.pool.uses) == 6
    for a, b in zip(full.game.student.state_dict().values(), resumed.game.student.state_dict().values()):
        assert torch.equal(a, b)

    assert len(summary["teacher_accs"]) == 3 and summary["teacher_acc"] == max(summary["teacher_accs"])
    assert summary["teacher_archs"] == ["lenet5", "mlp", "lenet5_half"]
    assert summary["ratio"] == pytest.approx(summary["student_acc"] / max(summary["teacher_accs"]))
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r}
    assert {
        "teacher/acc_t0",
        "teacher/acc_t2",
        "teacher/ensemble_acc",
        "eval/agree_t1",
        "pool/uses_t0",
    } <= keys
    last_uses = [r for r in records if "pool/uses_t0" in r][-1]
    assert sum(last_uses[f"pool/uses_t{i}"] for i in range(3)) == 6


def test_split_run_trains_the_student_on_another_teachers_features(tiny, tmp_path, run_of):
    cfg = tiny(
        teachers=POOL[:2] + [POOL[0] | {"seed": 3}],
        pool={"strategy": "split", "response_teacher": 1, "feature_teacher": 2},
        method={"features": [["features.2", "features.2"], ["features.5", "features.5"]]},
    )
    run = run_of(cfg, tmp_path)
    game = run.game
    x, t = game.synthesize()
    game.teacher, game.feature_teacher = game.pool.choose(0)
    assert game.teacher is game.pool.models[1] and game.feature_teacher == 2
    losses, _ = game.student_step(x, t)
    assert set(losses) == {"loss", "response", "feature"} and losses["feature"] > 0
    assert torch.allclose(losses["loss"], losses["response"] + 250.0 * losses["feature"])
    no_hooks = all(not m._forward_hooks for t in game.pool.models for m in t.modules())
    assert no_hooks, "no hook outlives its step"
    assert all(not m._forward_hooks for m in game.student.modules())
    assert run.fit()["iterations"] == 4


def test_feature_terms_need_one_teacher_and_real_layers(tiny, tmp_path, run_of):
    features = {"features": [["features.2", "features.2"]]}
    with pytest.raises(DfkdError, match="pool.strategy=mean mixes several"):
        run_of(tiny(teachers=POOL, pool={"strategy": "mean"}, method=features), tmp_path)
    message = "teacher mlp has no layer 'features.2'; list its layers with: dfkd layers"
    with pytest.raises(DfkdError, match=message):
        run_of(tiny(teachers=POOL, method=features), tmp_path)
