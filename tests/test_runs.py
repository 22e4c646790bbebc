"""Every shipped experiment file loads, and the promises the README quotes (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dfkd.config import ExperimentConfig, load_config

RUNS_DIR = Path(__file__).parent.parent / "runs"
RUNS = sorted(RUNS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_experiment_files_load(path):
    load_config(path)


SMALL = [
    "teacher.epochs=1",
    "train.iterations=2",
    "train.batch_size=8",
    "train.eval_every=1",
    "train.sample_every=2",
    "train.checkpoint_every=2",
    "tracking.mode=disabled",
    "train.device=cpu",
]
HAS_FASHION = Path("/usr/share/datasets/fashion-mnist").is_dir()


PRESETS = [p for p in RUNS if not p.name.startswith(("cifar", "bench"))]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_every_preset_takes_two_iterations(tmp_path, run_of, path):
    if path.name.startswith("fmnist") and not HAS_FASHION:
        pytest.skip("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (Debian)")
    cfg = load_config(path, SMALL)
    if cfg.teachers:  # a pool trains several teachers; as many quick ones stand in for them here
        archs = ["lenet5", "mlp", "lenet5_half"][: len(cfg.teachers)]
        cfg.teachers = [load_config(None, ["teacher.epochs=1", f"teacher.arch={a}"]).teacher for a in archs]
    assert run_of(cfg, tmp_path).fit()["iterations"] == 2


@pytest.mark.parametrize("path", sorted(p for p in RUNS if p.name.startswith("cifar")), ids=lambda p: p.name)
def test_cifar_paper_presets_start_on_a_small_cifar_file(tmp_path, run_of, path):
    from dfkd.data import write_cifar_binary

    batches = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    write_cifar_binary(tmp_path / "cifar-10-batches-bin", batches, 4, 1)
    write_cifar_binary(tmp_path / "cifar-100-binary", ["train.bin", "test.bin"], 8, 2)
    # (a teacher trained on a few random records scores near chance: no sanity margin for it; the
    # paper settings take up to 400 student steps per iteration, two do here)
    small = ["generator.width=8", "eval.min_teacher_margin=0", "method.n_student_steps=2"]
    overrides = [*SMALL, f"data.root={tmp_path}", *small]
    cfg = load_config(path, overrides)
    summary = run_of(cfg, tmp_path / "run").fit()
    assert summary["iterations"] == 2 and len(summary["teacher_accs"]) == 1


def test_demo_file_spells_out_the_defaults():
    demo = load_config(Path(__file__).parent.parent / "runs" / "mnist5k_demo.yaml")
    demo.name = ExperimentConfig.name
    assert demo == load_config()


def run_cli(tmp_path, *args) -> dict:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dfkd", *args, "--out", str(out), "--no-progress", "tracking.mode=disabled"]
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_demo_student_reaches_95_percent_of_teacher(tmp_path):
    summary = run_cli(tmp_path, "demo")
    print(json.dumps(summary))
    assert summary["teacher_acc"] > 95
    assert summary["student_acc"] / summary["teacher_acc"] >= 0.95


# A ResNet-8 teacher with the default recipe (runs/RESULTS.md, "Teacher families"): the plain game
# read 0.17 of the teacher at 400 iterations, the bn_kl prior alone 0.23 at 300 and the BatchNorm game
# with five student steps and no jitter 0.766 at 300; the game with batches of 128 read 0.875 at 400
# (2026-12-04, 08ea9bb). With the turn and scale a run of 400 iterations read 0.794 and one of 600
# 0.908 (bf16, one thread, 249 s / 383 s of distilling beside another run, 2026-12-05, 906ff77); with
# the replay memory of 20,000 one of 600 read 0.907 (367 s beside another run, 2026-12-05); with
# two generators taking turns 0.927 (480 s beside two other runs, 2026-12-06); with the student on
# SGD (fa386ab) 0.948 (312 s beside another run, 2026-12-07, 8e5ebcf); with the replay memory's
# pen-width twins this guard read 0.965 (238 s alone on both cores of the AVX512-BF16 CPU,
# 2026-12-07, 4d7ac1e), with their elastic warp 0.968 (237 s, the same, 2026-12-08, 048012e). The
# guard fails when the adaptation is lost or falls back to that earlier
# game.
RESNET8_ITERATIONS, RESNET8_MIN_RATIO = 600, 0.8


@pytest.mark.slow
def test_a_resnet8_teacher_gets_the_batchnorm_recipe_and_distils_beyond_the_plain_game(tmp_path):
    iterations = str(RESNET8_ITERATIONS)
    summary = run_cli(tmp_path, "run", "mnist5k_demo", "teacher.arch=resnet8", "--iterations", iterations)
    print(json.dumps(summary))
    assert summary["adaptations"] and "BatchNorm game" in summary["adaptations"][0]
    assert summary["teacher_acc"] > 95
    assert summary["student_acc"] / summary["teacher_acc"] >= RESNET8_MIN_RATIO


# An MLP teacher (no BatchNorm) with the default recipe: the plain game with jitter and the input
# statistics (`input_kl`) read 0.939 / 0.956 of the teacher at 500 iterations (seeds 0 / 1), the
# plain game without them (method.adapt_to_teacher=false) 0.899 / 0.922 (bf16, one thread, ~100 s
# each beside another run, 2026-12-05, 516b20a); in float32 (perf.autocast=none, as on a CPU without
# bf16) seed 0 read 0.937 and 0.861 (164 s). The guard runs seed 0 and fails when the adaptation is
# lost.
MLP_ITERATIONS, MLP_MIN_RATIO = 500, 0.92


@pytest.mark.slow
def test_an_mlp_teacher_gets_the_plain_game_with_the_input_statistics(tmp_path):
    summary = run_cli(
        tmp_path, "run", "mnist5k_demo", "teacher.arch=mlp", "--iterations", str(MLP_ITERATIONS)
    )
    print(json.dumps(summary))
    assert summary["adaptations"] and "input statistics" in summary["adaptations"][0]
    assert summary["teacher_acc"] > 95
    assert summary["student_acc"] / summary["teacher_acc"] >= MLP_MIN_RATIO


# runs/fmnist_lenet5.yaml (a LeNet-5 student) measured 0.984 and 0.973 of the teacher over two
# seeds at its 1,000 iterations, and 0.979 with the teacher this test trains in CI (runs/RESULTS.md).
# The guard runs 300 of them, which keeps the slow checks within CI's 90 minutes on the slowest CPU
# without bf16 it has drawn: 300 iterations read 0.933 in float32 on one thread with CI's teacher
# (500 read 0.964; 2026-12-02). It catches a broken recipe (the demo's recipe reads 0.58 here),
# not a fall to the LeNet-5-half student's level (0.917), which runs/RESULTS.md tracks.
FMNIST_ITERATIONS, FMNIST_MIN_RATIO = 300, 0.92


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_FASHION, reason="Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (Debian)"
)
def test_fashion_mnist_recipe_keeps_its_measured_level(tmp_path):
    recipe = str(RUNS_DIR / "fmnist_lenet5.yaml")
    summary = run_cli(tmp_path, "run", recipe, "--iterations", str(FMNIST_ITERATIONS))
    print(json.dumps(summary))
    assert summary["teacher_acc"] > 85
    assert summary["student_acc"] / summary["teacher_acc"] >= FMNIST_MIN_RATIO


@pytest.mark.slow
def test_gankd_student_reaches_95_percent_of_teacher(tmp_path):
    summary = run_cli(tmp_path, "run", str(Path(__file__).parent.parent / "runs" / "mnist5k_gankd.yaml"))
    print(json.dumps(summary))
    assert summary["teacher_acc"] > 95
    assert summary["student_acc"] / summary["teacher_acc"] >= 0.95


def write_finished_preset_runs(out: Path, presets) -> None:
    """Calibrations (20 iterations in 4 s) and 300-iteration seed runs, as a 60 s table leaves them."""
    for i, (_, stem) in enumerate(presets):
        runs = {"calibration": 80.0, "s0": 90.0 + i, "s1": 92.0 + i}
        for suffix, acc in runs.items():
            run_dir = out / f"{stem}_{suffix}"
            run_dir.mkdir()
            wall, iterations = (4.0, 20) if suffix == "calibration" else (60.0, 300)
            summary = {"teacher_acc": 97.0, "student_acc": acc, "wall_s": wall, "iterations": iterations}
            (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def preset_table(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "runs"))
    import preset_table

    return preset_table


def test_preset_table_reads_finished_runs_back_and_prints_each_row(tmp_path, capsys, preset_table):
    """The driver behind runs/RESULTS.md's preset table, on finished runs it must not repeat."""
    write_finished_preset_runs(tmp_path, preset_table.PRESETS["mnist5k"])
    argv = ["--datasets", "mnist5k", "--budget", "60", "--out", str(tmp_path), "perf.autocast=bf16"]
    assert preset_table.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| DFAD")]
    expected = (
        "| DFAD | 97.00 | 91.00 (90.00–92.00) | 0.938 | 300 | 60 s | "
        "`dfkd run runs/mnist5k_dfad.yaml perf.autocast=bf16 train.time_limit=60 train.eval_every=75 "
        "--iterations=300 --seed=S` |"
    )
    assert rows[0] == expected and len(rows) == 2  # printed as it comes, then in the whole table


def test_preset_table_keeps_a_run_its_time_limit_cut_short_and_says_so(
    tmp_path, capsys, preset_table, monkeypatch
):
    write_finished_preset_runs(tmp_path, preset_table.PRESETS["mnist5k"])
    cut = {"teacher_acc": 97.0, "student_acc": 90.0, "wall_s": 60.0, "iterations": 280}
    cut.update(planned_iterations=300, time_limit=60.0, time_limit_reached=True)
    (tmp_path / "mnist5k_dfad_s0" / "summary.json").write_text(json.dumps(cut))
    ran = []

    def dfkd(argv):  # stands in for `dfkd run`: records the run and leaves its summary
        out = Path(next(a for a in argv if a.startswith("--out="))[len("--out=") :])
        ran.append((out.name, next(a for a in argv if a.startswith("train.time_limit="))))
        (out / "summary.json").write_text(json.dumps({**cut, "time_limit": 65.0}))
        return 0

    monkeypatch.setattr(preset_table, "dfkd", dfkd)
    assert preset_table.main(["--datasets", "mnist5k", "--budget", "60", "--out", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| DFAD"))
    assert "| 300 (280 / 300 in the time limit) | 60 s |" in row and not ran
    # the same length planned under another limit: the cut run is not the run asked for
    monkeypatch.setattr(preset_table, "iterations_within", lambda budget, calibration: 300)
    assert preset_table.main(["--datasets", "mnist5k", "--budget", "65", "--out", str(tmp_path)]) == 0
    assert ran == [("mnist5k_dfad_s0", "train.time_limit=65")]


def test_preset_table_runs_again_what_ran_for_another_budget(tmp_path, preset_table, monkeypatch):
    write_finished_preset_runs(tmp_path, preset_table.PRESETS["mnist5k"])
    ran = []

    def dfkd(argv):  # stands in for `dfkd run`: records the run and leaves its summary
        out = Path(next(a for a in argv if a.startswith("--out="))[len("--out=") :])
        ran.append((out.name, next(a for a in argv if a.startswith("--iterations="))))
        summary = {"teacher_acc": 97.0, "student_acc": 50.0, "wall_s": 30.0, "iterations": 150}
        (out / "summary.json").write_text(json.dumps(summary))
        return 0

    monkeypatch.setattr(preset_table, "dfkd", dfkd)
    assert preset_table.main(["--datasets", "mnist5k", "--budget", "30", "--out", str(tmp_path)]) == 0
    stems = [stem for _, stem in preset_table.PRESETS["mnist5k"]]
    # the calibrations are kept
    assert ran == [(f"{stem}_s{s}", "--iterations=150") for stem in stems for s in (0, 1)]


# runs/mnist5k_multiteacher.yaml measured 0.952-0.968 of the best single teacher over five runs,
# 0.959 on average (runs/RESULTS.md); the target is 0.95. The CI trains its own three teachers,
# and with them the figure may move by a point or two, so the guard sits two points under the
# target: it catches the failures the strategy comparison showed (at 300 iterations `mean` read
# 0.882, `random` 0.277) and a student that no longer learns from the pool.
POOL_MIN_RATIO = 0.93


@pytest.mark.slow
def test_teacher_pool_keeps_its_measured_level(tmp_path):
    summary = run_cli(tmp_path, "run", str(RUNS_DIR / "mnist5k_multiteacher.yaml"))
    print(json.dumps(summary))
    assert len(summary["teacher_accs"]) == 3 and summary["teacher_acc"] == max(summary["teacher_accs"])
    assert summary["student_acc"] / summary["teacher_acc"] >= POOL_MIN_RATIO


@pytest.fixture
def teacher_families(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "runs"))
    import teacher_families

    return teacher_families


def test_calibration_counts_evaluations_as_a_fixed_cost_of_every_run(tmp_path, preset_table):
    """20 iterations in 196 s, 100 s of them four evaluations of the test set, which a run of any
    length also makes: 4.8 s per iteration, not 9.8."""
    (tmp_path / "summary.json").write_text(json.dumps({"wall_s": 196.0, "iterations": 20}))
    evals = [{"step": s, "eval/student_acc": 20.0, "perf/eval_s": 25.0} for s in (5, 10, 15, 20)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, [{"step": 20}, *evals])) + "\n")
    assert preset_table.iterations_within(1800.0, tmp_path) == int((1800 - 100) / 4.8)
    (tmp_path / "metrics.jsonl").unlink()  # a calibration from before perf/eval_s: all per iteration
    assert preset_table.iterations_within(1800.0, tmp_path) == int(1800 / 9.8)


def test_teacher_families_reads_finished_runs_back_and_prints_each_row(
    tmp_path, capsys, teacher_families, monkeypatch
):
    monkeypatch.chdir(Path(__file__).parent.parent)
    names = [teacher_families.stem("mnist5k", t) for _, t, _ in teacher_families.FAMILIES["mnist5k"]]
    assert "mnist5k_SmallCNN" in names and "mnist5k_torchvision_resnet18" in names
    write_finished_preset_runs(tmp_path, [(None, name) for name in names])
    argv = ["--datasets", "mnist5k", "--budget", "60", "--out", str(tmp_path)]
    assert teacher_families.main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| resnet8 →")]
    expected = (
        "| resnet8 → lenet5_half | 97.00 | 93.00 (92.00–94.00) | 0.959 | 300 | 60 s | "
        "`dfkd run runs/mnist5k_demo.yaml name=mnist5k_resnet8 teacher.arch=resnet8 "
        "student.arch=lenet5_half tracking.mode=disabled train.time_limit=60 train.eval_every=75 "
        "--iterations=300 --seed=S` |"
    )
    assert rows[0] == expected and len(rows) == 2


def test_teacher_families_runs_the_recipes_length_where_the_budget_allows_more(
    tmp_path, capsys, teacher_families, monkeypatch
):
    # a 600 s budget at 0.2 s per iteration would allow 3,000; the recipe runs 1,000
    monkeypatch.chdir(Path(__file__).parent.parent)
    stem = teacher_families.stem("mnist5k", "mlp")
    for suffix, (wall, iterations) in {"calibration": (4.0, 20), "s0": (200.0, 1000)}.items():
        (tmp_path / f"{stem}_{suffix}").mkdir()
        summary = {"teacher_acc": 96.0, "student_acc": 91.2, "wall_s": wall, "iterations": iterations}
        (tmp_path / f"{stem}_{suffix}" / "summary.json").write_text(json.dumps(summary))
    argv = ["--datasets", "mnist5k", "--families", "mlp", "--seeds", "0", "--budget", "600"]
    assert teacher_families.main([*argv, "--out", str(tmp_path)]) == 0
    (line,) = {x for x in capsys.readouterr().out.splitlines() if x.startswith("| mlp →")}
    assert "| 0.950 | 1000 | 200 s |" in line and "--iterations=1000 " in line


def test_teacher_families_distils_the_users_own_cnn_file(tmp_path, teacher_families, capsys):
    """The home-made teacher row end to end: imported by path, trained, distilled, tabled."""
    small = ["teacher.epochs=1", "train.batch_size=16", "train.log_every=5", "train.sample_every=50"]
    argv = ["--datasets", "mnist5k", "--families", "user BN CNN", "--budget", "3", "--seeds", "0"]
    assert teacher_families.main([*argv, "--out", str(tmp_path), *small]) == 0
    (line,) = {x for x in capsys.readouterr().out.splitlines() if x.startswith("| user BN CNN")}
    assert "user_cnn.py:SmallCNN" in line
    summary = json.loads((tmp_path / "mnist5k_SmallCNN_s0" / "summary.json").read_text())
    assert summary["teacher_acc"] > 50 and summary["iterations"] >= 1
    calibration = (tmp_path / "mnist5k_SmallCNN_calibration" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(line).get("perf/eval_s", 0.0) for line in calibration) > 0
