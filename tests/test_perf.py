"""Fast paths (config `perf`), the inner loop's freedom from host syncs, and `dfkd bench`."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dfkd
import discriminators
import generators
from dfkd.bench import NO_FAST_PATHS, PlainLoop, plain_config
from dfkd.cli import main
from dfkd.config import with_settings
from dfkd.errors import DfkdError
from dfkd.trainer import Trainer

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")


OWN_CODE = tuple(str(Path(package.__file__).parent) + os.sep for package in (dfkd, generators, discriminators))


@pytest.mark.parametrize("method", [{}, {"name": "gankd"}, {"replay_size": 64, "generator_ema": 0.9, "student_shift": 2}])
def test_the_inner_loop_never_reads_a_tensor_back_to_the_host(tiny, tmp_path, monkeypatch, method):
    """No .item()/.tolist()/bool(tensor) in dfkd's own inner-loop code (torch's optimizers read their
    CPU step counters, which is no device sync); on CUDA, torch's sync debug mode checks the rest."""
    trainer = Trainer(tiny(method=method), tmp_path, progress=False)
    trainer.iteration()  # warm-up
    calls = []

    def spy(name, original):
        def converted(self, *args):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OWN_CODE):
                calls.append((name, caller))
            return original(self, *args)

        return converted

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.iteration()
    finally:
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
    assert calls == []


def test_bf16_autocast_runs_the_forward_passes_in_bf16_and_the_losses_in_float32(tiny, tmp_path):
    trainer = Trainer(tiny(perf={"autocast": "bf16"}), tmp_path, progress=False)
    seen = []
    trainer.student.classifier[-1].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    metrics = trainer.iteration()
    assert set(seen) == {torch.bfloat16}
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in metrics.values())
    x, logits = trainer.synthesize()
    assert x.dtype == logits.dtype == torch.float32  # what replay memory and sample grids keep


def test_fast_paths_are_applied_and_compute_the_same_first_step(tiny, tmp_path):
    fast = Trainer(tiny(perf={"channels_last": True, "fused_optimizers": True}), tmp_path / "fast", progress=False)
    slow = Trainer(tiny(perf={"channels_last": False}), tmp_path / "slow", progress=False)
    assert fast.opt_s.defaults["fused"] and fast.opt_g.defaults["fused"]
    conv = fast.generator.block1[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    fast.iteration()
    slow.iteration()
    for a, b in zip(fast.student.parameters(), slow.student.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_a_run_resumes_with_other_fast_paths(tiny, tmp_path):
    Trainer(tiny(perf={"channels_last": True}), tmp_path, progress=False).fit(stop_at=2)
    resumed = Trainer(tiny(perf={"channels_last": False, "fused_optimizers": True}), tmp_path, progress=False)
    resumed.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert resumed.fit()["iterations"] == 4


def test_the_plain_loop_runs_the_trainers_algorithm(tiny, tmp_path):
    cfg = with_settings(plain_config(tiny(method={"loss": "l1"})), NO_FAST_PATHS)
    trainer = Trainer(cfg, tmp_path, progress=False)
    plain = PlainLoop(cfg, trainer.teacher, trainer.dataset.info, trainer.device)
    for a, b in zip(plain.student.parameters(), trainer.student.parameters()):
        assert torch.equal(a, b)  # same initial weights
    for _ in range(2):
        plain.iteration()
        trainer.iteration()
    for mine, theirs in [(trainer.student, plain.student), (trainer.generator, plain.generator)]:
        for a, b in zip(mine.parameters(), theirs.parameters()):
            assert torch.allclose(a, b, atol=1e-6)
    # The reference computes the teacher's parameter gradients and throws them away; dfkd never does.
    assert all(p.grad is not None for p in plain.teacher.parameters())
    assert all(p.grad is None for p in trainer.teacher.parameters())


def test_bench_refuses_what_the_plain_loop_cannot_mirror(tiny):
    with pytest.raises(DfkdError, match="drop method.priors"):
        plain_config(tiny(method={"priors": {"balance": 1.0}}))


def test_bench_prints_rates_phases_and_the_speedup_last(capsys):
    argv = ["bench", "--iterations", "1", "--repeats", "1", "--no-variants", "teacher.epochs=1", "generator.width=4",
            "train.batch_size=16"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"speedup: \d+\.\d\d", out[-1])
    text = "\n".join(out)
    for row in ("plain loop (reference)", "dfkd as configured", "generator forward", "teacher forward",
                "student forward", "backward (generator step)", "backward (student step)", "optimizer", "framework overhead"):
        assert row in text, row
    shares = [float(m) for m in re.findall(r"ms +([\d.]+) %", text)]
    assert len(shares) >= 8 and sum(shares) == pytest.approx(100, abs=0.5)


@pytest.mark.parametrize("flag", [["--iterations", "0"], ["--repeats", "-1"], ["--time-to-accuracy", "-5"]])
def test_bench_refuses_bad_counts(flag, capsys):
    assert main(["bench", *flag]) == 2
    assert "must be" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_every_fast_path_and_time_to_accuracy(capsys):
    argv = ["bench", "--iterations", "1", "--repeats", "1", "--time-to-accuracy", "3", "teacher.epochs=1",
            "generator.width=4", "train.batch_size=16"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for row in ("dfkd + fused_optimizers", "dfkd + compile", "dfkd + sample reuse", "dfkd recipe, no sample reuse", "to 0.95"):
        assert row in text, row


@pytest.mark.slow
def test_the_gpu_check_script_runs_on_the_cpu(tmp_path):
    """No GPU here: a smoke test of runs/gpu_check.py with the CIFAR-size ResNets on stand-in data."""
    script = Path(__file__).parents[1] / "runs" / "gpu_check.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--records", "16", "--batch-size", "4", "--iterations", "1",
           "--repeats", "1", "--no-variants"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resnet34 -> resnet18" in done.stdout
    assert re.fullmatch(r"speedup: \d+\.\d\d", done.stdout.strip().splitlines()[-1])
