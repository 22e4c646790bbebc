"""What each `dfkd` command does, once dfkd.cli has parsed its arguments: run (and demo),
train-teacher, bench, export, convert, list, layers, and the output checks they share.

Each command imports what it needs when it runs, so that a command loads only the modules it uses.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dfkd.errors import DfkdError
from dfkd.signals import Interrupted

if TYPE_CHECKING:
    from dfkd.config import ExperimentConfig


def experiment_config(path: Path | None, args) -> ExperimentConfig:
    """The experiment file at `path` (None: the demo's) with the overrides and shortcuts of `args`."""
    from dfkd.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "iterations", None) is not None:
        overrides.append(f"train.iterations={args.iterations}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    return load_config(path, overrides)


def _check_output_file(out: Path, overwrite: bool) -> None:
    """Before any training: --out must be a file this process may create or, with --overwrite, replace."""
    from dfkd.export import check_target

    if out.is_dir():  # the message names a file in it to write instead
        raise DfkdError(f"--out {str(out)!r} is a directory; name the file to write: {out / 'teacher.pt'}")
    check_target(out, overwrite)
    missing = [p for p in out.parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=".dfkd-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DfkdError(
            f"cannot write to {str(out.parent)!r}: {err.strerror}; choose another --out"
        ) from None
    finally:
        _remove_empty(missing)


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (deepest first) that exist, are directories and hold nothing."""
    for folder in folders:
        with contextlib.suppress(OSError):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


@contextlib.contextmanager
def no_empty_dirs_left(out: Path | None, default_parent: Path | None = None):
    """A command that fails leaves no empty directory behind that it created for its output."""
    watch = out if out is not None else default_parent
    if watch is None:
        yield
        return
    created = [p for p in [watch, *watch.parents] if not p.exists()]
    before = set(watch.iterdir()) if out is None and watch.is_dir() else None
    try:
        yield
    except BaseException:
        new = [] if before is None or not watch.is_dir() else [p for p in watch.iterdir() if p not in before]
        _remove_empty([*new, *created])
        raise


def _raise_terminated(signum, frame):
    """SIGTERM before the run's loop (which notes it itself): stop like Ctrl-C, exit 143."""
    raise Interrupted(signum)


def cmd_run(cfg, args) -> int:
    from dfkd import distributed
    from dfkd.api import distill

    signal.signal(signal.SIGTERM, _raise_terminated)
    distributed.init(cfg.train.device)  # under torchrun: join the other processes
    result = distill(
        config=cfg, out=args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
    )
    distributed.shutdown()
    if not distributed.is_main():
        return 0
    s, out = result.summary, result.run_dir
    archs = s["teacher_archs"]
    if s["teacher_acc"] is None:
        print(f"\n{'teachers':<14}{', '.join(archs)}  (no real evaluation data)")
        print(
            f"{'agreement':<14}{s['synthetic_agreement']:7.2f} %  "
            "(student with teacher, held-out synthetic images)"
        )
    else:
        best = archs[s["teacher_accs"].index(s["teacher_acc"])]
        which = f"{best}, best of {len(archs)} teachers" if len(archs) > 1 else best
        print(f"\n{'teacher acc':<14}{s['teacher_acc']:7.2f} %  ({which})")
        print(
            f"{'student acc':<14}{s['student_acc']:7.2f} %  "
            f"({cfg.student.arch}, best {s['best_student_acc']:.2f})"
        )
        print(f"{'ratio':<14}{s['ratio']:7.3f}")
        print(f"{'weakest class':<14}{weakest_class(s['class_acc'])}")
    done = f"{s['iterations']} iterations"
    if s["time_limit_reached"]:
        limit = f"train.time_limit={s['time_limit']:g} s"
        done = f"{s['iterations']} of {s['planned_iterations']} iterations: {limit}"
    print(f"{'wall time':<14}{s['wall_s']:7.1f} s  ({done}, {s['images_per_s']:.0f} images/s)")
    print(f"{'run dir':<14}{out}")
    print(f"{'W&B':<14}{wandb_hint(out, cfg)}")
    return 0


def weakest_class(class_acc: dict) -> str:
    """The class where the student trails the teacher most, as the run's table prints it."""
    student, teacher = class_acc["student"], class_acc["teacher"]
    present = [c for c, acc in enumerate(student) if acc is not None]
    c = max(present, key=lambda k: teacher[k] - student[k])  # the first of equal gaps
    return f"{student[c]:7.2f} %  (class {c}; teacher {teacher[c]:.2f}; every class: summary.json class_acc)"


def wandb_hint(out: Path, cfg) -> str:
    from dfkd.tracking import resolve_mode

    mode = resolve_mode(cfg.tracking)
    if mode == "disabled":
        return "disabled"
    if mode == "offline":
        return f"offline, in {out / 'wandb'} (upload: wandb sync {out / 'wandb'}/offline-run-*)"
    return f"online, project {cfg.tracking.project}"


def cmd_train_teacher(cfg, args) -> int:
    from dfkd.assemble import resolve_device
    from dfkd.data import load_dataset
    from dfkd.evaluate import accuracy
    from dfkd.teachers import classifier_meta, save_classifier, train_classifier

    _check_output_file(args.out, args.overwrite)
    device = resolve_device(cfg.train.device)
    dataset = load_dataset(cfg.data)
    start = time.perf_counter()
    model = train_classifier(cfg.teacher, dataset, device, progress=not args.no_progress)
    acc = accuracy(model, dataset.test, device)
    meta = classifier_meta(cfg.teacher.arch, dataset, acc, train_s=round(time.perf_counter() - start, 1))
    save_classifier(args.out, model, meta)
    print(f"{cfg.teacher.arch} on {dataset.name}: test accuracy {acc:.2f} %, saved to {args.out}")
    return 0


def cmd_bench(cfg, args) -> int:
    from dfkd.bench import run_bench

    for flag, value in (("iterations", args.timed_iterations), ("repeats", args.repeats)):
        if value <= 0:
            raise DfkdError(f"--{flag} must be positive, got {value}")
    if args.time_to_accuracy < 0:
        raise DfkdError(
            f"--time-to-accuracy must be 0 (skip) or positive seconds, got {args.time_to_accuracy:g}"
        )
    run_bench(cfg, args.timed_iterations, args.repeats, args.variants, args.time_to_accuracy)
    return 0


def cmd_list() -> int:
    import generators
    from dfkd.data import DATASETS
    from dfkd.losses import FEATURE_LOSSES, LOSSES, PRIORS
    from dfkd.methods import METHODS
    from dfkd.models import classifier_names
    from dfkd.pool import STRATEGIES

    for title, names in [
        ("datasets", DATASETS.names()),
        ("classifiers", classifier_names()),
        ("generators", generators.GENERATORS.names()),
        ("losses", LOSSES.names()),
        ("feature losses", FEATURE_LOSSES.names()),
        ("generator priors", PRIORS.names()),
        ("methods", METHODS.names()),
        ("teacher strategies", STRATEGIES.names()),
    ]:
        print(f"{title}: {', '.join(names)}")
    from dfkd.configfile import experiments_dir, first_comment, shipped_experiments

    shipped = shipped_experiments()
    print(f"experiments (dfkd run NAME), in {experiments_dir()}:" if shipped else "experiments: none shipped")
    width = max(map(len, shipped), default=0) + 2
    for name, path in shipped.items():
        print(f"  {name:<{width}}{first_comment(path)}")
    return 0


def cmd_layers(args) -> int:
    from dfkd.features import layer_shapes
    from dfkd.models import build_classifier

    for flag in ("channels", "size", "classes"):
        if getattr(args, flag) <= 0:
            raise DfkdError(f"--{flag} must be positive, got {getattr(args, flag)}")
    model = build_classifier(args.arch, args.channels, args.classes, args.size)
    for path, kind, shape in layer_shapes(model, (args.channels, args.size, args.size)):
        print(f"{path:<24}{kind:<18}{' x '.join(map(str, shape))}")
    return 0


def _print_spec(spec) -> None:
    print(
        f"{'input':<10}{spec.channels} x {spec.size} x {spec.size} float32 per image "
        "((pixel in [0, 1] - mean) / std)"
    )
    print(f"{'classes':<10}{spec.num_classes}")
    print(f"{'mean':<10}{' '.join(f'{m:g}' for m in spec.mean)}")
    print(f"{'std':<10}{' '.join(f'{v:g}' for v in spec.std)}")


def cmd_export(args) -> int:
    from dfkd.export import ATOL, RTOL, VERIFY_BATCH, export_verified

    result = export_verified(args.run_dir, args.format, args.out, overwrite=args.overwrite)
    _print_spec(result.spec)
    print(
        f"{'verified':<10}max |Δlogit| = {result.max_diff:.3g} on {VERIFY_BATCH} seeded inputs "
        f"(tolerance {ATOL:g} + {RTOL:g}·|logit|)"
    )
    print(f"{'written':<10}{result.path}" + (f" and {result.sidecar}" if result.sidecar else ""))
    return 0


def cmd_convert(args) -> int:
    from dfkd.convert import convert_to_checkpoint

    shape = (args.channels, args.size, args.classes)
    spec, diff = convert_to_checkpoint(
        args.source, args.out, args.arch, shape, args.mean or [], args.std or [], args.overwrite
    )
    _print_spec(spec)
    print(f"{'verified':<10}max |Δlogit| = {diff:.3g} after reloading")
    print(f"{'written':<10}{args.out} (use it as teacher.checkpoint={args.out})")
    return 0
