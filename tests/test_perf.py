"""Fast paths (config `perf`), the inner loop's freedom from host syncs, and `dfkd bench`."""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dfkd
import discriminators
import generators
from dfkd.bench import NO_FAST_PATHS, PlainLoop, plain_config
from dfkd.checkpoint import load_safe
from dfkd.cli import main
from dfkd.config import PerfConfig, with_settings
from dfkd.errors import DfkdError
from dfkd.perf import Capabilities, choose_perf, probe

# Tensor methods that copy a value to the host: on a GPU each one waits for the queued kernels.
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


OWN_CODE = tuple(
    str(Path(package.__file__).parent) + os.sep for package in (dfkd, generators, discriminators)
)
FEATURES = {"features": [["features.5", "features.5"]], "feature_weight": 1.0}
PRIORS = {"onehot": 1.0, "balance": 1.0, "tv": 1.0, "bn": 0.1, "bn_kl": 1.0, "input_kl": 1.0, "blur": 1.0}


TWO_TEACHERS = [{"arch": "lenet5", "epochs": 1}, {"arch": "mlp", "epochs": 1, "seed": 1}]
# What the README says runs without a host sync: each kind of term, pool, augmentation and fast path.
INNER_LOOPS = {
    "defaults (perf chosen for this machine)": {},
    "gankd": {"method": {"name": "gankd"}},
    "replay, averaged generator, shifts": {
        "method": {"replay_size": 64, "generator_ema": 0.9, "student_shift": 2}
    },
    "mixup, flips, shifts": {"method": {"student_mixup": 0.5, "student_flip": True, "student_shift": 1}},
    "random pool": {"teachers": TWO_TEACHERS},
    "mean pool": {"teachers": TWO_TEACHERS, "pool": {"strategy": "mean"}},
    "every prior": {"teacher": {"arch": "lenet5_bn", "epochs": 1}, "method": {"priors": PRIORS}},
    "conditional generator, target prior": {
        "generator": {"conditional": True},
        "method": {"priors": {"target": 1.0}},
    },
    "contrastive term": {
        "teacher": {"arch": "lenet5_bn", "epochs": 1},
        "method": {"contrast": 0.5, "contrast_bank": 32},
    },
    "meta-learned generator start": {"method": {"meta_generator": "fomaml", "n_generator_steps": 2}},
    "features": {"method": FEATURES},
    "gankd with features": {"method": {"name": "gankd", **FEATURES}},
    "bf16, channels_last, fused": {
        "perf": {"autocast": "bf16", "channels_last": True, "fused_optimizers": True}
    },
    "no fast path": {"perf": {"autocast": "none", "channels_last": False, "fused_optimizers": False}},
}


def host_reads(monkeypatch) -> list[tuple]:
    """From now on, every SYNCS call made by dfkd's own code, as (method, file, line)."""
    calls = []

    def spy(name, original):
        def converted(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(OWN_CODE):
                calls.append((name, caller.co_filename, sys._getframe(1).f_lineno))
            return original(self, *args, **kwargs)

        return converted

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    return calls


def three_steps(run) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            run.step()
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("sections", INNER_LOOPS.values(), ids=INNER_LOOPS.keys())
def test_the_inner_loop_never_reads_a_tensor_back_to_the_host(tiny, tmp_path, run_of, monkeypatch, sections):
    """No .item()/.tolist()/.cpu()/bool(tensor)/... in dfkd's own inner-loop code (torch's optimizers
    read their CPU step counters, which is no device sync); on CUDA, torch's sync debug mode checks
    the rest."""
    run = run_of(tiny(**sections), tmp_path)
    run.step()  # warm-up
    calls = host_reads(monkeypatch)
    three_steps(run)
    assert calls == []


def test_the_host_read_spy_catches_a_teacher_draw_read_back(tiny, tmp_path, run_of, monkeypatch):
    from dfkd.pool import Choice, RandomTeacher

    def drawn_on_the_device(self, step, rng):  # what a pool once did: a tensor draw, read back
        i = int(torch.randint(self.n, ()))
        return Choice({i: 1.0}, i)

    run = run_of(tiny(teachers=TWO_TEACHERS), tmp_path)
    run.step()
    calls = host_reads(monkeypatch)
    drawn_on_the_device.__code__ = drawn_on_the_device.__code__.replace(co_filename=dfkd.pool.__file__)
    monkeypatch.setattr(RandomTeacher, "choose", drawn_on_the_device)
    three_steps(run)
    assert [name for name, *_ in calls] == ["__int__"] * 3, calls


def test_bf16_autocast_runs_the_forward_passes_in_bf16_and_the_losses_in_float32(tiny, tmp_path, run_of):
    run = run_of(tiny(perf={"autocast": "bf16"}), tmp_path)
    seen = []
    run.game.student.classifier[-1].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    metrics = run.step()
    assert set(seen) == {torch.bfloat16}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in metrics.values())
    x, logits = run.game.synthesize()
    assert x.dtype == logits.dtype == torch.float32  # what replay memory and sample grids keep


def test_bf16_autocast_covers_the_teachers_relabelling_of_twins_and_augmented_batches(tiny, tmp_path, run_of):
    method = {"replay_size": 64, "replay_pen_width": 1.0, "student_shift": 1}
    run = run_of(tiny(perf={"autocast": "bf16"}, method=method), tmp_path)
    seen = []
    run.game.teacher.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    run.step()
    steps = run.cfg.method.n_generator_steps + 1 + run.cfg.method.n_student_steps  # + the twin
    assert seen == [torch.bfloat16] * steps


def test_a_forward_after_an_optimizer_step_in_one_autocast_region_runs_on_the_new_weights():
    """GAN-KD steps its discriminator and then scores the student with it, in one bf16 region."""
    from dfkd.perf import autocast

    layer, x, cpu = torch.nn.Linear(8, 2), torch.randn(4, 8), torch.device("cpu")
    with autocast(PerfConfig(autocast="bf16"), cpu):
        layer(x)
        with torch.no_grad():
            layer.weight.mul_(-1)  # what an optimizer step does: in place
        after = layer(x)
    with autocast(PerfConfig(autocast="bf16"), cpu):
        assert torch.equal(after, layer(x))


def test_fast_paths_are_applied_and_compute_the_same_first_step(tiny, tmp_path, run_of):
    slow = run_of(
        tiny(perf={"channels_last": False, "fused_optimizers": False, "autocast": "none"}), tmp_path / "slow"
    )
    fast = run_of(
        tiny(perf={"channels_last": True, "fused_optimizers": True, "autocast": "none"}), tmp_path / "fast"
    )
    players = fast.game.players
    assert players["s"].optimizer.defaults["fused"] and players["g"].optimizer.defaults["fused"]
    conv = fast.game.generator.block1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fast.step()
    slow.step()
    for a, b in zip(fast.game.student.parameters(), slow.game.student.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_run_resumes_with_other_fast_paths(tiny, tmp_path, run_of):
    # float32 both: bf16 would round the two apart at once
    laid_out = {"channels_last": True, "fused_optimizers": False, "autocast": "none"}
    full = run_of(tiny(perf=laid_out), tmp_path / "full")
    full.fit()
    run_of(tiny(perf=laid_out), tmp_path / "split").fit(stop_at=2)
    other = {"channels_last": False, "fused_optimizers": True, "autocast": "none"}
    resumed = run_of(tiny(perf=other), tmp_path / "split")
    resumed.resume(tmp_path / "split" / "checkpoints" / "last.pt")
    # the saved state, bit for bit, in networks laid out and optimized differently
    saved = load_safe(resumed.checkpoint_path)
    assert resumed.iterations_done == saved["step"] == 2
    for name, net in resumed.game.networks.items():
        assert all(torch.equal(v, saved[name][k]) for k, v in net.state_dict().items()), name
    assert resumed.fit()["iterations"] == 4
    # ...and from there the same run: other kernels round differently, so close rather than equal.
    for name in ("student", "ema"):
        mine = resumed.game.networks[name].state_dict()
        for k, v in full.game.networks[name].state_dict().items():
            assert torch.allclose(v, mine[k], rtol=1e-3, atol=1e-5), f"{name}.{k}"
    # The generator by what it draws: the biases ahead of its BatchNorm layers have no effect on it
    # (Adam moves them by rounding noise alone).
    z = torch.randn(16, full.cfg.generator.latent_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        drawn = [copy.deepcopy(r.game.generator).train()(z) for r in (full, resumed)]
    assert torch.allclose(*drawn, rtol=1e-3, atol=1e-4)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if "train/loss_S" in line]
    assert steps == [2, 4]


def test_the_plain_loop_runs_dfkds_algorithm(tiny, tmp_path, run_of):
    cfg = with_settings(plain_config(tiny(method={"loss": "l1"})), NO_FAST_PATHS)
    run = run_of(cfg, tmp_path)
    game = run.game
    plain = PlainLoop(cfg, game.teacher, run.parts.spec, run.device)
    for a, b in zip(plain.student.parameters(), game.student.parameters()):
        assert torch.equal(a, b)  # same initial weights
    # dfkd's generator step leaves the student's gradients as the last student step left them
    untouched = []
    generator_step = game.generator_player.step

    def spied(loss):
        before = [None if p.grad is None else p.grad.clone() for p in game.student.parameters()]
        generator_step(loss)
        after = [p.grad for p in game.student.parameters()]
        same = [
            (a is None) == (b is None) and (a is None or torch.equal(a, b)) for a, b in zip(before, after)
        ]
        untouched.append(all(same))

    game.generator_player.step = spied
    for _ in range(2):
        plain.iteration()
        run.step()
    for mine, theirs in [(game.student, plain.student), (game.generator, plain.generator)]:
        for a, b in zip(mine.parameters(), theirs.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    # The reference computes the teacher's parameter gradients and throws them away; dfkd never does:
    # its teacher is frozen, and its generator step backpropagates into the generator alone.
    assert all(p.grad is not None for p in plain.teacher.parameters())
    assert not any(p.requires_grad for p in game.teacher.parameters())
    assert untouched == [True, True] and all(p.grad is not None for p in game.student.parameters())


def test_bench_refuses_what_the_plain_loop_cannot_mirror(tiny):
    with pytest.raises(DfkdError, match="drop method.priors"):
        plain_config(tiny(method={"priors": {"balance": 1.0}}))
    with pytest.raises(DfkdError, match="drop method.extra_priors"):
        plain_config(tiny(method={"extra_priors": {"balance": 1.0}}))


RATE = re.compile(r"(?P<name>\S.*?) +(?P<rate>\d+\.\d) +(?P<ratio>\d+\.\d\d)")
# A row of the phase table: name, ms, share, then the achieved GFLOP/s columns.
PHASE = re.compile(r"  (?P<name>\S.*?) +(?P<ms>\d+\.\d) ms +(?P<share>\d+\.\d) %.*")


def rate_table(lines) -> dict[str, tuple[float, float]]:
    """The bench's rate table: contender -> (images/s, rate relative to the plain loop), checked
    for consistency: positive rates, and each ratio the contender's rate over the plain loop's."""
    rows = {m["name"]: (float(m["rate"]), float(m["ratio"])) for m in map(RATE.fullmatch, lines) if m}
    reference, one = rows["plain loop (reference)"]
    assert one == 1.0 and all(rate > 0 and ratio > 0 for rate, ratio in rows.values()), rows
    for name, (rate, ratio) in rows.items():
        assert ratio == pytest.approx(rate / reference, abs=0.01), name
    return rows


def check_speedup_line(lines, rows) -> None:
    """The last line repeats the configured run's ratio to the plain loop."""
    last = re.fullmatch(r"speedup: (\d+\.\d\d)", lines[-1])
    assert last, lines[-1]
    assert float(last[1]) == rows["dfkd as configured"][1] and float(last[1]) > 0


def tiny_bench(*options: str) -> list[str]:
    """`dfkd bench` on the demo shrunk to seconds: one timed iteration, one repeat."""
    tiny = ["teacher.epochs=1", "generator.width=4", "train.batch_size=16"]
    return ["bench", "--iterations", "1", "--repeats", "1", *options, *tiny]


def test_bench_prints_rates_phases_and_the_speedup_last(capsys):
    assert main(tiny_bench("--no-variants")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"speedup: \d+\.\d\d", out[-1])
    rows = rate_table(out)
    assert set(rows) == {"plain loop (reference)", "dfkd, no fast paths", "dfkd as configured"}
    check_speedup_line(out, rows)
    assert "(chosen for this CPU" in out[2]  # the fast paths the default config left to the device
    text = "\n".join(out)
    for row in (
        "plain loop (reference)",
        "dfkd as configured",
        "generator forward",
        "teacher forward",
        "student forward",
        "backward (generator step)",
        "backward (student step)",
        "optimizer",
        "framework overhead",
    ):
        assert row in text, row
    table = {m["name"]: (float(m["ms"]), float(m["share"])) for m in map(PHASE.fullmatch, out) if m}
    everything = table.pop("all phases")
    shares = [share for _, share in table.values()]
    assert len(shares) >= 8 and sum(shares) == pytest.approx(100, abs=0.5)
    # the phases add up to the time per iteration the heading (and the table's last row) gives
    total = float(re.search(r"([\d.]+) ms per iteration", text)[1])
    assert everything == (total, 100.0) and all(ms >= 0 for ms, _ in table.values())
    assert sum(ms for ms, _ in table.values()) == pytest.approx(total, abs=0.05 * len(table) + 0.05)


@pytest.mark.parametrize("flag", [["--iterations", "0"], ["--repeats", "-1"], ["--time-to-accuracy", "-5"]])
def test_bench_refuses_bad_counts(flag, capsys):
    assert main(["bench", *flag]) == 2
    assert "must be" in capsys.readouterr().err


def time_to_accuracy_table(lines) -> dict[str, dict]:
    """The bench's time-to-accuracy table: contender -> the seconds to each ratio of the teacher's
    accuracy (None: never), best and final ratio, iterations; checked for consistency."""
    (head,) = [i for i, line in enumerate(lines) if line.startswith("contender") and " to 0." in line]
    ratios = [float(r) for r in re.findall(r"to (\d\.\d\d)", lines[head])]
    cell = r" +(\d+ s|never)"
    row = re.compile(r"(\S.*?)" + cell * len(ratios) + r" +(\d\.\d{3}) +(\d\.\d{3}) +(\d+)")
    table = {}
    for line in lines[head + 1 :]:
        m = row.fullmatch(line)
        if not m:
            break
        *cells, best, final, iterations = m.groups()[1:]
        seconds = [None if c == "never" else int(c[:-2]) for c in cells]
        best, final, iterations = float(best), float(final), int(iterations)
        assert 0 <= final <= best <= 1.5 and iterations > 0 and iterations % 20 == 0, line
        for s, ratio in zip(seconds, ratios):  # never: the best ratio stayed below it
            assert best <= ratio if s is None else best >= ratio and s >= 0, line
        reached = [s for s in seconds if s is not None]
        assert reached == sorted(reached) and seconds[: len(reached)] == reached, line  # a higher ratio later
        table[m[1]] = {
            "seconds": dict(zip(ratios, seconds)),
            "best": best,
            "final": final,
            "iterations": iterations,
        }
    return table


@pytest.mark.slow
def test_bench_every_fast_path_and_time_to_accuracy(capsys):
    assert main(tiny_bench("--time-to-accuracy", "3")) == 0
    text = capsys.readouterr().out
    for row in (
        "dfkd + fused_optimizers",
        "dfkd + compile",
        "dfkd + sample reuse",
        "DFAD as published (mnist5k_dfad)",
        "to 0.95",
    ):
        assert row in text, row
    lines = text.strip().splitlines()
    rows = rate_table(lines)
    variants = {"channels_last", "fused_optimizers", "compile", "bf16 autocast"}
    assert {f"dfkd + {v}" for v in variants} | {"plain loop (reference)", "dfkd as configured"} <= set(rows)
    check_speedup_line(lines, rows)
    reached = time_to_accuracy_table(lines)
    contenders = {"plain loop (reference)", "DFAD as published (mnist5k_dfad)", "dfkd as configured"}
    assert set(reached) == contenders
    assert all(set(r["seconds"]) == {0.9, 0.95, 0.98} for r in reached.values())


@pytest.mark.slow
def test_the_gpu_check_script_runs_on_the_cpu(tmp_path):
    """No GPU here: a smoke test of runs/gpu_check.py with the CIFAR-size ResNets on stand-in data."""
    script = Path(__file__).parents[1] / "runs" / "gpu_check.py"
    cmd = [
        sys.executable,
        str(script),
        "--device",
        "cpu",
        "--records",
        "16",
        "--batch-size",
        "4",
        "--iterations",
        "1",
        "--repeats",
        "1",
        "--no-compile",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "resnet34 -> resnet18" in lines[0]
    row = re.compile(r"(?P<name>\S.*?) +(\d+) +(\d+\.\d\d) +(\d+\.\d) +(-|\d+) +(\d+\.\d\d) +(\d+\.\d)%")
    rows = {m["name"]: m for m in map(row.fullmatch, lines) if m}
    assert set(rows) == {
        "plain loop (reference)",
        "dfkd, no fast paths",
        "dfkd + channels_last only",
        "dfkd + fused_optimizers only",
        "dfkd default (chosen for this device)",
    }
    assert rows["plain loop (reference)"][3] == "1.00" and all(
        m[5] == "-" for m in rows.values()
    )  # no GPU memory
    assert re.fullmatch(r"gpu_check: \d+ s in all", lines[-1])


CPU_AMX = Capabilities("cpu", "CPU", "AMX")
CPU_AVX512_BF16 = Capabilities("cpu", "CPU", "AVX512-BF16")
CPU_PLAIN = Capabilities("cpu", "CPU", None)
GPU_BF16 = Capabilities("cuda", "NVIDIA H200", "CUDA")
GPU_NO_BF16 = Capabilities("cuda", "Tesla V100", None)


@pytest.mark.parametrize(
    "caps, autocast",
    [
        (CPU_AMX, "bf16"),
        (CPU_AVX512_BF16, "bf16"),
        (CPU_PLAIN, "none"),
        (GPU_BF16, "bf16"),
        (GPU_NO_BF16, "none"),
    ],
)
def test_unset_fast_paths_are_chosen_for_the_device(caps, autocast):
    chosen, note = choose_perf(PerfConfig(), caps)
    assert chosen == PerfConfig(channels_last=True, compile=False, autocast=autocast, fused_optimizers=True)
    assert f"autocast={autocast}" in note and caps.name in note and "perf.* overrides" in note
    assert ("native bf16 by" in note) == (autocast == "bf16")


def test_a_fast_path_the_config_sets_is_kept_and_a_fully_set_one_is_not_announced():
    chosen, note = choose_perf(PerfConfig(autocast="none", channels_last=False), CPU_AMX)
    assert chosen == PerfConfig(channels_last=False, compile=False, autocast="none", fused_optimizers=True)
    assert "autocast" not in note and "channels_last" not in note and "fused_optimizers=true" in note
    given = PerfConfig(channels_last=True, compile=True, autocast="bf16", fused_optimizers=False)
    assert choose_perf(given, CPU_PLAIN) == (given, None)


def test_an_unknown_device_gets_no_fast_path():
    chosen, _ = choose_perf(PerfConfig(), Capabilities("mps", "mps", None))
    assert chosen == PerfConfig(channels_last=False, compile=False, autocast="none", fused_optimizers=False)


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected", [(True, True, "AMX"), (False, True, "AVX512-BF16"), (False, False, None)]
)
def test_the_cpu_probe_reads_the_bf16_units(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert probe(torch.device("cpu")) == Capabilities("cpu", "CPU", expected)


@pytest.mark.parametrize("bf16", [True, False])
def test_the_cuda_probe_reads_bf16_support(monkeypatch, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert probe(torch.device("cuda")) == Capabilities("cuda", "Some GPU", "CUDA" if bf16 else None)


def test_a_run_announces_its_chosen_fast_paths_and_records_them(tiny, tmp_path, capsys):
    from dfkd.api import distill

    result = distill(config=tiny(perf={"compile": False}), out=tmp_path / "run", progress=False)
    chosen, note = choose_perf(PerfConfig(compile=False), probe(torch.device("cpu")))
    assert f"dfkd: perf: {note}" in capsys.readouterr().err
    assert result.config.perf == chosen
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["perf"]
    assert written == dataclasses.asdict(chosen)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["perf"] == {"settings": dataclasses.asdict(chosen), "chosen": note}
