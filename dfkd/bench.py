"""`dfkd bench`: dfkd's run against a plain reference loop, same algorithm, same process.

The plain loop is written the way the reference DFAD code is: a fresh generator batch for every
student step, the teacher left trainable (its parameter gradients are computed and never used),
full backward passes (the generator step also fills the student's gradients), and a host sync
(`.item()`) after every step. dfkd runs the same algorithm (sample reuse off, no weight average)
with the same networks, initial weights, latents, losses, optimizers and schedules; the two are
timed in turns, several times, and the medians compared.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from dfkd.assemble import assemble
from dfkd.config import ExperimentConfig, with_settings
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy
from dfkd.game import generator_for
from dfkd.loop import Run
from dfkd.losses import LOSSES
from dfkd.models import build_classifier
from dfkd.optim import build_optimizer, build_schedule
from dfkd.perf import matmul_peak
from dfkd.spec import InputSpec

# What makes dfkd's run execute exactly the plain loop's algorithm.
PLAIN_ALGORITHM = {
    "method.adapt_to_teacher": False,
    "method.reuse_samples": False,
    "train.student_ema": 0.0,
    "method.replay_size": 0,
    "method.generator_ema": 0.0,
    "method.student_shift": 0,
    "method.student_flip": False,
}
# Each fast path alone, on top of dfkd without any.
FAST_PATHS = {
    "channels_last": {"perf.channels_last": True},
    "fused_optimizers": {"perf.fused_optimizers": True},
    "compile": {"perf.compile": True},
    "bf16 autocast": {"perf.autocast": "bf16"},
}
NO_FAST_PATHS = {
    "perf.channels_last": False,
    "perf.fused_optimizers": False,
    "perf.compile": False,
    "perf.autocast": "none",
}


def plain_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with the plain DFAD algorithm; what the plain loop cannot mirror is refused."""
    m = cfg.method
    unsupported = {
        "method.name": m.name != "adversarial",
        "method.priors": bool(m.priors),
        "method.extra_priors": bool(m.extra_priors),
        "method.features": bool(m.features),
        "teachers": len(cfg.teacher_recipes) > 1,
    }
    for key, present in unsupported.items():
        if present:
            raise DfkdError(
                "dfkd bench times the plain DFAD loop (one teacher, one response loss); "
                f"drop {key} from the config"
            )
    return with_settings(cfg, PLAIN_ALGORITHM)


class PlainLoop:
    """The reference DFAD loop. It builds its own networks with the run's seed, so both start
    from the same weights; the teacher is a trainable copy of the run's."""

    def __init__(self, cfg: ExperimentConfig, teacher: nn.Module, spec: InputSpec, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.train.seed)
        self.student = build_classifier(cfg.student.arch, spec.channels, spec.num_classes, spec.size).to(
            device
        )
        self.generator = generator_for(cfg, spec).to(device)
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(True)
        self.opt_s = build_optimizer(self.student.parameters(), cfg.student_optim)
        self.opt_g = build_optimizer(self.generator.parameters(), cfg.generator_optim)
        self.sched_s = build_schedule(self.opt_s, cfg.student_optim, cfg.train.iterations)
        self.sched_g = build_schedule(self.opt_g, cfg.generator_optim, cfg.train.iterations)
        self.loss = LOSSES.get(cfg.method.loss)
        self.rng = torch.Generator().manual_seed(cfg.train.seed)

    def latent(self) -> torch.Tensor:
        return torch.randn(self.cfg.train.batch_size, self.cfg.generator.latent_dim, generator=self.rng).to(
            self.device
        )

    def iteration(self) -> None:
        m, tau = self.cfg.method, self.cfg.method.temperature
        self.student.train()
        self.generator.train()
        for _ in range(m.n_generator_steps):
            self.opt_g.zero_grad()
            fake = self.generator(self.latent())
            loss_g = -m.adversarial_weight * self.loss(self.student(fake), self.teacher(fake), tau)
            loss_g.backward()
            self.opt_g.step()
            loss_g.item()
        for _ in range(m.n_student_steps):
            self.opt_s.zero_grad()
            fake = self.generator(self.latent()).detach()
            t_logit = self.teacher(fake)
            loss_s = self.loss(self.student(fake), t_logit.detach(), tau)
            loss_s.backward()
            self.opt_s.step()
            loss_s.item()
        self.sched_s.step()
        self.sched_g.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_s(
    contenders: dict[str, Callable[[], None]],
    iterations: int,
    repeats: int,
    images: int,
    device: torch.device,
) -> dict[str, float]:
    """Median images/s of each contender over `repeats` timings of `iterations` iterations, taken in
    turns so that a change in the machine's load hits every contender alike. One untimed warm-up
    iteration each (compilation, allocator)."""
    for step in contenders.values():
        step()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, step in contenders.items():
            seconds[name].append(seconds_per_iteration(step, iterations, device))
    return {name: images / statistics.median(s) for name, s in seconds.items()}


def phase_flops(run: Run) -> dict[str, float]:
    """Floating-point operations per phase of one iteration (counted on a separate, untimed one)."""
    timer = run.game.phases
    timer.reset()
    timer.enabled = timer.count_flops = True
    run.step()
    timer.enabled = timer.count_flops = False
    return dict(timer.flops)


def phase_breakdown(run: Run, iterations: int) -> tuple[float, dict[str, float]]:
    """Seconds per iteration in all, and per phase; what no phase covers is framework overhead. It
    includes the phase timer's own bookkeeping, so the figure errs high."""
    timer = run.game.phases
    timer.reset()
    timer.enabled = True
    total = seconds_per_iteration(run.step, iterations, run.device)
    timer.enabled = False
    phases = {name: s / iterations for name, s in timer.totals.items()}
    phases["framework overhead"] = max(total - sum(phases.values()), 0.0)
    return total, phases


def seconds_per_iteration(step: Callable[[], None], iterations: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    sync(device)
    return (time.perf_counter() - start) / iterations


@dataclass
class Progress:
    """Accuracy over training wall time (evaluation excluded) of one contender."""

    seconds: list[float]
    ratios: list[float]

    def first_at(self, ratio: float) -> float | None:
        return next((s for s, r in zip(self.seconds, self.ratios) if r >= ratio), None)


def time_to_accuracy(
    step: Callable[[], None],
    evaluate: Callable[[], float],
    teacher_acc: float,
    budget_s: float,
    eval_every: int,
    max_iterations: int,
    device: torch.device,
) -> Progress:
    progress, trained, it = Progress([], []), 0.0, 0
    while trained < budget_s and it < max_iterations:
        trained += seconds_per_iteration(step, eval_every, device) * eval_every
        it += eval_every
        progress.seconds.append(trained)
        progress.ratios.append(evaluate() / teacher_acc)
    return progress


def fresh_run(cfg: ExperimentConfig, run_root: str) -> Run:
    return Run(cfg, tempfile.mkdtemp(dir=run_root), assemble(cfg, progress=False), progress=False)


def run_bench(
    cfg: ExperimentConfig, iterations: int, repeats: int, variants: bool, tta_s: float, out=print
) -> float:
    """Print the comparison; return the speedup of dfkd, as `cfg` configures it, over the plain loop."""
    plain_cfg = plain_config(cfg)
    with tempfile.TemporaryDirectory(prefix="dfkd-bench-") as root:
        configured = fresh_run(plain_cfg, root)
        chosen = configured.cfg.perf  # unset perf settings chosen for the device
        base_cfg = with_settings(plain_cfg, NO_FAST_PATHS)
        baseline = fresh_run(base_cfg, root) if base_cfg.perf != chosen else configured
        plain = PlainLoop(plain_cfg, baseline.game.teacher, baseline.parts.spec, configured.device)
        m, t = plain_cfg.method, plain_cfg.train
        out(
            f"dfkd bench: {cfg.teacher_recipes[0].arch} -> {cfg.student.arch}, "
            f"{cfg.generator.name} generator "
            f"(width {cfg.generator.width}), batch {t.batch_size}, {m.n_student_steps} student step(s) per "
            f"generator step, loss {m.loss}, {configured.device} ({torch.get_num_threads()} threads), "
            f"torch {torch.__version__}"
        )
        perf = ", ".join(f"{k}={v}" for k, v in vars(chosen).items())
        out(f"dfkd as configured: perf {perf}")
        if configured.perf_choice:
            out(f"  unset in the config, so chosen: {configured.perf_choice}")
        out(f"timing {iterations} iterations x {repeats} repeats in turns; student images/s (median)\n")
        contenders: dict[str, Callable[[], None]] = {"plain loop (reference)": plain.iteration}
        if baseline is not configured:
            contenders["dfkd, no fast paths"] = baseline.step
        if variants:
            for name, settings in FAST_PATHS.items():
                variant_cfg = with_settings(base_cfg, settings)
                if variant_cfg.perf == chosen:
                    continue
                contenders[f"dfkd + {name}"] = fresh_run(variant_cfg, root).step
            reuse = fresh_run(with_settings(plain_cfg, {"method.reuse_samples": True}), root)
            contenders["dfkd + sample reuse (not the same algorithm)"] = reuse.step
        contenders["dfkd as configured"] = configured.step
        images = configured.game.images_per_iteration
        rates = images_per_s(contenders, iterations, repeats, images, configured.device)
        reference = rates["plain loop (reference)"]
        width = max(map(len, rates)) + 2
        out(f"{'contender':<{width}}{'images/s':>10}{'vs plain':>10}")
        for name, rate in rates.items():
            out(f"{name:<{width}}{rate:>10.1f}{rate / reference:>10.2f}")

        _report_phases(configured, iterations * repeats, out)

        if tta_s > 0:
            _report_time_to_accuracy(cfg, plain_cfg, baseline, root, tta_s, out)
    speedup = rates["dfkd as configured"] / reference
    out(f"speedup: {speedup:.2f}")
    return speedup


def _report_phases(run: Run, iterations: int, out) -> None:
    """Time (over `iterations` timed iterations) and achieved FLOP/s per phase, against the machine's
    measured matmul peak."""
    flops = phase_flops(run)
    total, phases = phase_breakdown(run, iterations)
    dtype = torch.bfloat16 if run.cfg.perf.autocast == "bf16" else torch.float32
    peak = matmul_peak(run.device, dtype)
    out(
        "\nwhere dfkd's time goes (as configured; phases timed on their own): "
        f"{1000 * total:.1f} ms per iteration; "
        f"matmul peak {peak / 1e9:.0f} GFLOP/s ({str(dtype).removeprefix('torch.')}, measured now)"
    )
    out(f"  {'phase':<28}{'ms':>9}   {'share':>6}{'GFLOP/s':>10}{'of peak':>9}")
    for name, s in sorted(phases.items(), key=lambda kv: -kv[1]):
        rate = flops.get(name, 0.0) / s if s > 0 else 0.0
        cells = (
            f"{rate / 1e9:>10.1f}{100 * rate / peak:>8.1f}%"
            if name in flops and flops[name]
            else f"{'-':>10}{'-':>9}"
        )
        out(f"  {name:<28}{1000 * s:>9.1f} ms{100 * s / total:>6.1f} %{cells}")
    achieved = sum(flops.values()) / total
    out(
        f"  {'all phases':<28}{1000 * total:>9.1f} ms{100.0:>6.1f} %"
        f"{achieved / 1e9:>10.1f}{100 * achieved / peak:>8.1f}%"
    )


TTA_RATIOS = (0.90, 0.95, 0.98)
REFERENCE_RECIPE = "mnist5k_dfad"  # DFAD as published: L1, student SGD, a fresh batch per student step


def reference_recipe(cfg: ExperimentConfig) -> ExperimentConfig:
    """DFAD's published recipe on `cfg`'s data, teachers, student and length."""
    from dfkd.config import config_to_dict, load_config

    mine = config_to_dict(cfg)
    shared = ("data", "input", "eval", "teacher", "teachers", "pool", "student", "perf", "tracking")
    settings = {key: mine[key] for key in shared}
    settings.update({"train.iterations": cfg.train.iterations, "train.device": cfg.train.device})
    return with_settings(load_config(REFERENCE_RECIPE), settings)


def _report_time_to_accuracy(cfg, plain_cfg, baseline: Run, root: str, budget_s: float, out) -> None:
    """Wall seconds of training (evaluation excluded) until the student reaches 0.90, 0.95 and 0.98 of
    the teacher: the plain loop, DFAD's published recipe run by dfkd, and dfkd as configured."""
    out(
        f"\ntime to accuracy: at most {budget_s:g} s of training each (or train.iterations), "
        "evaluated every 20 iterations"
    )
    teacher_acc, test, device = baseline.report.teacher_acc, baseline.parts.evaluation.split, baseline.device
    plain = PlainLoop(plain_cfg, baseline.game.teacher, baseline.parts.spec, device)
    reference, recipe = fresh_run(reference_recipe(cfg), root), fresh_run(cfg, root)
    contenders = {
        "plain loop (reference)": (plain.iteration, lambda: accuracy(plain.student, test, device)),
        f"DFAD as published ({REFERENCE_RECIPE})": (
            reference.step,
            lambda: reference.evaluate()["eval/student_acc"],
        ),
        "dfkd as configured": (recipe.step, lambda: recipe.evaluate()["eval/student_acc"]),
    }
    width = max(map(len, contenders)) + 2
    heads = "".join(f"{f'to {r:.2f}':>10}" for r in TTA_RATIOS)
    out(f"{'contender':<{width}}{heads}{'best':>8}{'final':>8}{'iterations':>12}")
    for name, (step, evaluate) in contenders.items():
        p = time_to_accuracy(step, evaluate, teacher_acc, budget_s, 20, cfg.train.iterations, device)
        reached = [p.first_at(r) for r in TTA_RATIOS]
        cells = "".join(f"{f'{s:.0f} s' if s is not None else 'never':>10}" for s in reached)
        out(f"{name:<{width}}{cells}{max(p.ratios):>8.3f}{p.ratios[-1]:>8.3f}{20 * len(p.ratios):>12}")
