"""The run: the game's iterations with the cadence of logging, evaluation, sample grids and
checkpoints, divergence rollback and collapse warnings. Under torchrun every process runs it on
its own synthetic batches; rank 0 alone writes files and W&B."""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from dfkd import distributed
from dfkd.assemble import Parts
from dfkd.checkpoint import DiskFull, remove_stale_temp_files, save_atomic
from dfkd.config import ExperimentConfig, config_to_dict
from dfkd.config_checks import check_adapted
from dfkd.errors import DfkdError
from dfkd.game import Game
from dfkd.health import CollapseWatch, first_non_finite
from dfkd.optim import scale_lr
from dfkd.perf import choose_perf, probe
from dfkd.recipe import adapt_to_teachers, why_not_adapted
from dfkd.report import Report, student_meta
from dfkd.signals import Interrupted, boundary_signals
from dfkd.state import load_run_state, run_state
from dfkd.tracking import NullTracker, Tracker

# callback(step, metrics) at every log step; returning False ends the run there.
Callback = Callable[[int, dict], "bool | None"]

# No student is judged "not learning" before this many iterations: a healthy game's first
# evaluations (those of a 20-iteration calibration run, say) read near chance.
JUDGE_LEARNING_AFTER = 50


def warn(message: str) -> None:
    tqdm.write(f"dfkd: warning: {message}", file=sys.stderr)


def _every(step: int, interval: int, last: int) -> bool:
    return step % interval == 0 or step == last


class Run:
    """Distillation of `parts` (dfkd.assemble) in `run_dir`, to train.iterations."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        run_dir: Path,
        parts: Parts,
        progress: bool = True,
        callback: Callback | None = None,
    ):
        self.main = distributed.is_main()
        cfg, self.adaptations = adapt_to_teachers(cfg, parts.pool.models, parts.student, parts.spec)
        check_adapted(cfg)
        perf, self.perf_choice = choose_perf(cfg.perf, probe(parts.device))
        cfg = dataclasses.replace(cfg, perf=perf)
        self.cfg, self.run_dir, self.progress, self.callback = (
            cfg,
            Path(run_dir),
            progress and self.main,
            callback,
        )
        self.parts, self.device = parts, parts.device
        self.game = Game(cfg, parts.spec, parts.pool, parts.student, parts.student_arch, parts.device)
        t = cfg.train
        self.report = Report(
            self.run_dir,
            parts.spec,
            parts.pool,
            parts.evaluation,
            parts.device,
            self.game.latents,
            t.seed,
            cfg.eval.synthetic_holdout,
            cfg.eval.min_teacher_margin,
        )
        self.iterations_done = 0
        self.wall_s = 0.0
        self.rollbacks = 0
        self.collapse = CollapseWatch.for_run(
            len(self.game.generators), t.collapse_threshold, t.collapse_patience, t.iterations, t.log_every
        )
        self.generator_resets = 0
        self.run_id = uuid.uuid4().hex[:8]
        self.stopped = False  # by the callback or the time limit: the run finishes where it is
        self.time_limit_reached = False
        self.resumed = False  # continues a checkpoint: the record past it is dropped and re-made
        self.resume_changes: dict[str, tuple] = {}  # config keys a resume changed: (saved, new)
        self.warned_chance = False
        self.at_boundary = True
        self.signals: list[int] = []
        self.saved_step: int | None = None  # the step of the checkpoint on disk

    @property
    def several_generators(self) -> bool:
        """Generators take turns (method.n_generators > 1): metrics and warnings name each one."""
        return len(self.game.generators) > 1

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def step(self) -> dict[str, torch.Tensor]:
        """One iteration of the game; its metrics as detached tensors."""
        out = self.game.iteration(self.iterations_done)
        self.iterations_done += 1
        return out

    def fit(self, stop_at: int | None = None) -> dict | None:
        """Train to train.iterations and return the summary; or pause after step `stop_at`, with a
        checkpoint, and return None (resume with resume() and fit again)."""
        cfg = self.cfg.train
        stop = min(stop_at or cfg.iterations, cfg.iterations)
        tracker = self._open_tracker()
        if self.main:
            remove_stale_temp_files(self.checkpoint_path)
        self._record_resume_changes(tracker)
        if self.main and self.perf_choice and (self.iterations_done == 0 or self.resumed):
            tqdm.write(f"dfkd: perf: {self.perf_choice}", file=sys.stderr)
        if self.iterations_done == 0:
            if self.main:
                for note in self.adaptations or filter(None, [why_not_adapted(self.cfg)]):
                    tqdm.write(f"dfkd: recipe: {note}", file=sys.stderr)
            teacher = self.report.teacher_metrics()
            if teacher:
                tracker.log(teacher, step=0)
            self.save_checkpoint()  # the state a divergence before the first checkpoint rolls back to
        bar = tqdm(
            total=cfg.iterations,
            initial=self.iterations_done,
            desc="distill",
            disable=not self.progress,
            unit="it",
        )
        start = time.perf_counter() - self.wall_s
        self.at_boundary = True
        try:
            with boundary_signals() as self.signals:
                self._loop(stop, tracker, bar, start)
        except BaseException as err:
            bar.close()
            interrupted = isinstance(err, KeyboardInterrupt)  # Ctrl-C or SIGTERM: keep the work done so far
            if interrupted and self.at_boundary and self.non_finite({}) is None:
                self.save_checkpoint()
            tracker.finish(exit_code=getattr(err, "exit_code", 130) if interrupted else 1)
            raise
        bar.close()
        if self.iterations_done < cfg.iterations and not self.stopped:
            if self.non_finite({}) is None:  # a checkpoint is only ever written from a healthy state
                self.save_checkpoint()
            tracker.finish()
            return None
        summary = self.finish(tracker)
        tracker.finish()
        return summary

    def _record_resume_changes(self, tracker) -> None:
        changes = self.resume_changes
        if not changes:
            return
        tracker.log({f"resume/{key}": new for key, (_, new) in changes.items()}, self.iterations_done)
        told = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())
        warn(f"resuming at step {self.iterations_done} with {told}")
        self.resume_changes = {}

    def resume(self, path: Path | None = None) -> int:
        """Continue from a checkpoint (by default the run's own); returns its rollback count."""
        self.resumed = True
        return load_run_state(self, path or self.checkpoint_path)

    def _open_tracker(self) -> Tracker | NullTracker:
        """The run's record (rank 0's alone under torchrun): config.yaml, metrics.jsonl and W&B."""
        if not self.main:
            return NullTracker()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = config_to_dict(self.cfg)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        resume_step = self.iterations_done if self.resumed else None
        return Tracker(self.run_dir, self.cfg.tracking, config, self.run_id, resume_step=resume_step)

    def _loop(self, stop: int, tracker: Tracker, bar, start: float) -> None:
        cfg = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        count = 0
        self.collapse.clear()
        last_log = time.perf_counter()
        while self.iterations_done < stop and not self.stopped:
            if self._signalled():
                raise Interrupted(self.signals[0] if self.signals else signal.SIGTERM)
            self.at_boundary = False
            out = self.step()
            for k, v in out.items():
                sums[k] = sums[k] + v if k in sums else v
            count += 1
            self.collapse.record(self.game.turn, out["train/top_class_frac"])
            bar.update(1)
            step, last = self.iterations_done, cfg.iterations
            self.wall_s = time.perf_counter() - start
            # the step the time limit ends the run on logs, checks its health and checkpoints as a last one
            out_of_time = step < last and self._out_of_time()
            log_now, checkpoint_now = (
                out_of_time or _every(step, cfg.log_every, last),
                out_of_time or _every(step, cfg.checkpoint_every, last),
            )
            # A checkpoint is only ever written from a healthy state.
            if log_now or checkpoint_now:
                cause = self.non_finite(sums)
                if cause is not None:
                    self.roll_back(cause, tracker)
                    bar.n = self.iterations_done
                    bar.refresh()
                    sums, count, last_log = {}, 0, time.perf_counter()
                    self.collapse.clear()
                    self.at_boundary = True
                    continue
            if log_now:
                now = time.perf_counter()
                metrics = {k: v / count for k, v in zip(sums, torch.stack(list(sums.values())).tolist())}
                metrics["perf/student_images_per_s"] = (
                    count * self.game.images_per_iteration / max(now - last_log, 1e-9)
                )
                metrics["train/lr_S"] = self.game.student_player.lr
                # every rank decides on the mean over ranks, so a reset happens everywhere or nowhere
                fracs = {k: distributed.mean_over_ranks(m) for k, m in self.collapse.interval_means().items()}
                if self.several_generators:
                    metrics.update({f"train/top_class_frac_g{k}": frac for k, frac in fracs.items()})
                metrics["health/collapse"] = self._check_collapse(fracs)
                metrics["health/generator_resets"] = self.generator_resets
                pool = self.game.pool
                if len(pool) > 1:
                    metrics.update({f"pool/uses_{n}": u for n, u in zip(pool.names, pool.uses)})
                tracker.log(metrics, step)
                bar.set_postfix(loss_S=f"{metrics['train/loss_S']:.3f}", best=f"{self.report.best_acc:.1f}")
                sums, count, last_log = {}, 0, now
                if self.callback is not None and self.callback(step, metrics) is False:
                    self.stopped = True
            if out_of_time and not self.stopped:
                self.stopped = self.time_limit_reached = True
                if self.main:
                    tqdm.write(
                        f"dfkd: train.time_limit={cfg.time_limit:g} s reached at iteration {step} of {last}",
                        file=sys.stderr,
                    )
            if _every(step, cfg.eval_every, last) and self.main:
                began = time.perf_counter()
                evals = self.evaluate()
                score = next(iter(evals.values()))
                # runs/preset_table.py's calibration tells iterations from evaluations by it
                evals["perf/eval_s"] = time.perf_counter() - began
                evals["health/student_near_chance"] = self._check_learning(evals, step)
                tracker.log(evals, step)
                bar.set_postfix(acc=f"{score:.1f}", best=f"{self.report.best_acc:.1f}")
            if _every(step, cfg.sample_every, last) and self.main:
                path = self.report.save_samples(self.game.generator, step)
                tracker.log_image("train/samples", path, step)
            self.wall_s = time.perf_counter() - start
            if checkpoint_now or self.stopped:
                self.save_checkpoint()
            self.at_boundary = True

    def _on_every_rank(self, flag: bool) -> bool:
        """`flag`; under torchrun, true on every rank where it is true on any, decided at log steps
        only, so that the ranks stop together."""
        if not distributed.active():
            return flag
        if self.iterations_done % self.cfg.train.log_every:
            return False
        return distributed.any_rank(flag)

    def _signalled(self) -> bool:
        return self._on_every_rank(bool(self.signals))

    def _out_of_time(self) -> bool:
        limit = self.cfg.train.time_limit
        return bool(limit) and self._on_every_rank(self.wall_s >= limit)

    def evaluate(self) -> dict[str, float]:
        game = self.game
        raw = game.student if game.student_average is not None else None
        return self.report.evaluate(game.deployed_student, raw, game.generator)

    def non_finite(self, losses: dict[str, torch.Tensor]) -> str | None:
        """What is NaN or Inf, if anything; under torchrun every rank gets an answer when any finds one."""
        nets = {k: m for k, m in self.game.networks.items() if k not in ("ema", "generator_ema")}
        cause = first_non_finite(losses, nets)
        if distributed.any_rank(cause is not None) and cause is None:
            cause = "value on another process"
        return cause

    def roll_back(self, cause: str, tracker: Tracker) -> None:
        """Reload the last good checkpoint with lowered learning rates; stop after max_rollbacks."""
        cfg = self.cfg.train
        detected_at, rollbacks = self.iterations_done, self.rollbacks + 1
        if rollbacks > cfg.max_rollbacks:
            raise DfkdError(
                f"training diverged: non-finite {cause} at step {detected_at}, "
                f"after {self.rollbacks} rollback(s); "
                "lower student_optim.lr and generator_optim.lr or set student_optim.grad_clip"
            )
        saved_rollbacks = self.resume()
        self.rollbacks = rollbacks
        # The checkpoint's rates already carry its own rollbacks' factors: the factor compounds.
        factor = cfg.rollback_lr_factor ** (rollbacks - saved_rollbacks)
        for player in self.game.players.values():
            scale_lr(player.optimizer, player.schedule, factor)
        # A retry draws other latents than the attempt that diverged (else it would repeat it).
        self.game.latent_rng.manual_seed(cfg.seed + 1000 * distributed.rank() + 100_003 * rollbacks)
        tracker.rewind(self.iterations_done)
        tracker.log({"health/rollbacks": rollbacks, "health/diverged_at": detected_at}, self.iterations_done)
        warn(
            f"non-finite {cause} at step {detected_at}: "
            f"rolled back to step {self.iterations_done} with learning "
            f"rates x{cfg.rollback_lr_factor} ({rollbacks}/{cfg.max_rollbacks})"
        )

    def _check_learning(self, evals: dict[str, float], step: int) -> float:
        """1.0 when, past a quarter of the run and JUDGE_LEARNING_AFTER iterations, the student still
        scores near chance while the teacher is far above it (a learning rate far too high, most
        often); warns once."""
        report = self.report
        if not report.real or step < max(self.cfg.train.iterations / 4, JUDGE_LEARNING_AFTER):
            return 0.0
        chance = 100.0 / self.parts.spec.num_classes
        near = evals["eval/student_acc"] < chance + 0.1 * (report.teacher_acc - chance)
        if near and not self.warned_chance:
            self.warned_chance = True
            warn(
                f"the student scores {evals['eval/student_acc']:.1f} % at step {step}, near chance "
                f"({chance:.0f} %) while the teacher scores {report.teacher_acc:.1f} %: it is not learning. "
                + (
                    f"{'A' if self.several_generators else 'The'} generator collapsed "
                    "(health/collapse): try method.priors (onehot, balance, bn)"
                    if self.generator_resets or any(m.streak for m in self.collapse.monitors)
                    else "Lower student_optim.lr / generator_optim.lr"
                )
            )
        return float(near)

    def _check_collapse(self, top_class_fracs: dict[int, float]) -> float:
        """Feeds each generator that played its mean top-class fraction (index -> fraction); warns of
        one that collapsed just now and starts it afresh when collapse_action says so. 1.0 while any
        generator is collapsed."""
        newly, flagged = self.collapse.update(top_class_fracs)
        for k in newly:
            reinit = self.cfg.train.collapse_action == "reinit"
            images, who = (
                (f"generator {k}'s images", f"generator {k}")
                if self.several_generators
                else ("synthetic images", "the generator")
            )
            warn(
                f"generator collapse? the teacher puts {top_class_fracs[k]:.0%} of {images} in one class "
                f"(over {self.collapse.monitors[k].patience} log intervals); "
                + (f"{who} starts afresh" if reinit else "see samples/ and consider method.priors")
            )
            if reinit:
                self.generator_resets += 1
                self.game.reset_generator(k, self.cfg.train.seed + 7919 * self.generator_resets)
                self.collapse.monitors[k].streak = 0  # the fresh generator gets a window of its own
        return float(flagged)

    def finish(self, tracker: Tracker) -> dict:
        game, report, parts = self.game, self.report, self.parts
        acc, per_class = report.final_score(game.deployed_student, game.generator)
        archs = [meta["arch"] for meta in game.pool.metas]
        summary = report.summary(
            acc, self.iterations_done, self.wall_s, game.images_per_iteration, archs, parts.teacher_files
        )
        if per_class is not None:
            summary["class_acc"] = per_class
        summary["planned_iterations"] = self.cfg.train.iterations
        summary["time_limit"] = self.cfg.train.time_limit
        summary["time_limit_reached"] = self.time_limit_reached
        summary["adaptations"] = self.adaptations
        summary["perf"] = {"settings": dataclasses.asdict(self.cfg.perf), "chosen": self.perf_choice}
        if not self.main:
            return summary
        kwargs = self.cfg.student.kwargs if parts.student_arch == self.cfg.student.arch else {}
        meta = student_meta(
            parts.student_arch,
            self.cfg.data.name,
            parts.spec,
            acc if report.real else None,
            report.teacher_acc,
            kwargs,
        )
        path = report.write(summary, game.deployed_student, meta)
        tracker.summarize(report.dashboard_summary(acc))
        tracker.log_model(path, f"student-{self.run_id}", meta)
        return summary

    def save_checkpoint(self) -> Path:
        state = run_state(self)  # on every rank: it gathers each one's latent generator
        if self.main:
            try:
                save_atomic(state, self.checkpoint_path)
            except DiskFull as err:
                kept = (
                    f"the last good checkpoint (step {self.saved_step}) is kept"
                    if self.saved_step is not None
                    else "no checkpoint was written yet"
                )
                raise DfkdError(f"{err}; {kept}: free some space and continue with --resume") from None
        self.saved_step = self.iterations_done
        distributed.barrier()  # a rollback on any rank must find the file written
        return self.checkpoint_path
