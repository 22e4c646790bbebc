"""The Python API. `dfkd run` and `dfkd demo` call `distill` too: one code path for both."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from dfkd import distributed
from dfkd.config import ExperimentConfig, TeacherConfig, load_config, with_settings
from dfkd.errors import DfkdError
from dfkd.spec import InputSpec


@dataclass
class DistillResult:
    # The deployed student (the weight average when there is one), in eval mode; a student passed
    # in as a module is that module, holding those weights.
    student: nn.Module
    summary: dict | None  # summary.json; None when paused by stop_at
    run_dir: Path
    spec: InputSpec  # what the student takes: channels, size, classes, normalization
    config: ExperimentConfig  # as run: with the recipe's adaptations to the teacher (dfkd.recipe)


def distill(
    teacher: Any = None,
    student: str | nn.Module | None = None,
    input: InputSpec | None = None,  # noqa: A002 - the name users read in the README
    eval_data: Any = None,
    config: str | Path | ExperimentConfig | None = None,
    overrides: dict[str, Any] | Sequence[str] | None = None,
    out: str | Path | None = None,
    callback=None,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    stop_at: int | None = None,
) -> DistillResult:
    """Distil `teacher` (an nn.Module, a checkpoint path, or a list of either: a pool) into `student`
    (a name `student.arch` takes, or an nn.Module) without data.

    `input` describes what the teacher takes; `eval_data` is an ImageFolder, an .npz/.pt file with
    `images` and `labels`, an (images, labels) pair, or None (agreement on held-out synthetic
    images). `config` is an experiment file, a shipped experiment's name or an ExperimentConfig;
    `overrides` dotted keys on top of it. Given a teacher and no config, no dataset is implied
    (data.name none). `callback(step, metrics)` runs at every log step; returning False ends the run
    there, with its summary and student. The run directory `out` holds config.yaml,
    metrics.jsonl, summary.json, samples/, checkpoints/ and student.pt.
    """
    cfg = _config(config, overrides, implied_no_dataset=teacher is not None and config is None)
    teacher_modules, cfg = _teachers(teacher, cfg)
    student_module = student if isinstance(student, nn.Module) else None
    if isinstance(student, str):
        cfg = with_settings(cfg, {"student.arch": student})
    if input is not None:
        cfg = with_settings(
            cfg,
            {
                f"input.{k}": list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(input).items()
            },
        )
    eval_split = None
    if isinstance(eval_data, (str, Path)):
        path = Path(eval_data).expanduser()
        cfg = with_settings(cfg, {"eval.folder" if path.is_dir() else "eval.file": str(path)})
    elif eval_data is not None:
        eval_split = eval_data
    run_dir = _run_dir(out, cfg.name)
    created, replace = (
        prepare_run_dir(run_dir, resume, overwrite) if distributed.is_main() else (False, False)
    )
    distributed.barrier()
    from dfkd.assemble import assemble
    from dfkd.loop import Run

    try:
        parts = assemble(cfg, progress, teacher_modules, student_module, input, eval_split)
        run = Run(cfg, run_dir, parts, progress=progress, callback=callback)
        if resume:
            run.resume()
    except BaseException:
        if created:  # bad input leaves no empty run directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if replace:  # only now that every input checked out does the old run go
        _empty(run_dir)
    try:
        summary = run.fit(stop_at)
    finally:
        parts.pool.release()
    deployed = run.game.deployed_student
    if student_module is not None and deployed is not student_module:
        student_module.load_state_dict(deployed.state_dict())  # the caller's module holds the result
        deployed = student_module
    return DistillResult(deployed.eval(), summary, run_dir, parts.spec, run.cfg)


def _config(config, overrides, implied_no_dataset: bool) -> ExperimentConfig:
    if isinstance(config, ExperimentConfig):
        cfg = config
    else:
        cfg = load_config(config)
        if implied_no_dataset:
            cfg = with_settings(cfg, {"data.name": "none"})
    if not overrides:
        return cfg
    if isinstance(overrides, dict):
        return with_settings(cfg, overrides)
    from dfkd.config import parse_override

    return with_settings(cfg, dict(parse_override(text) for text in overrides))


def _teachers(teacher, cfg: ExperimentConfig) -> tuple[list[nn.Module] | None, ExperimentConfig]:
    """In-memory teachers, and the config with teacher files put in `teacher` / `teachers`."""
    if teacher is None:
        return None, cfg
    many = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    if all(isinstance(t, nn.Module) for t in many):
        return many, cfg
    if not all(isinstance(t, (str, Path)) for t in many):
        raise DfkdError("teacher must be an nn.Module, a checkpoint path, or a list of only one of the two")
    base = dataclasses.asdict(cfg.teacher)
    recipes = [TeacherConfig(**{**base, "checkpoint": str(t)}) for t in many]
    if len(recipes) == 1:
        return None, dataclasses.replace(cfg, teacher=recipes[0], teachers=[])
    return None, dataclasses.replace(cfg, teachers=recipes)


def _run_dir(out, name: str) -> Path:
    run_dir = Path(out) if out is not None else Path("outputs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return distributed.gather(run_dir)[0]  # rank 0's clock names the run


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """Check (and make) the run directory. Returns (created: this call made it, replace: an old run
    is to be removed once the inputs have been checked)."""
    if out.exists() and not out.is_dir():
        raise DfkdError(f"--out {str(out)!r} is a file, not a run directory; choose another --out")
    if resume:
        last = out / "checkpoints" / "last.pt"
        if not last.is_file():  # what it holds, state.load_run_state checks when it reads it
            raise DfkdError(f"--resume: no checkpoint at {last}")
        return False, False
    replace = out.exists() and any(out.iterdir())
    if replace and not overwrite:
        raise DfkdError(
            f"run directory {str(out)!r} exists; pass --resume to continue it or --overwrite to replace it"
        )
    if replace and not is_run_dir(out):
        raise DfkdError(
            f"--overwrite replaces a dfkd run, and {str(out)!r} holds other files (no config.yaml or "
            "checkpoints/); choose another --out"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DfkdError(
            f"cannot write to run directory {str(out)!r}: {err.strerror}; choose another --out"
        ) from None
    return created, replace


def _empty(folder: Path) -> None:
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
