import os

import pytest
import torch

from dfkd.config import ExperimentConfig, config_from_dict

# Tests never touch the user's cache or W&B account, whatever the environment says.
if os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
    os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="package", autouse=True)  # one cache for the whole suite
def dfkd_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("dfkd-cache")
    old = os.environ.get("DFKD_CACHE")
    os.environ["DFKD_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("DFKD_CACHE", None)
    else:
        os.environ["DFKD_CACHE"] = old


def flush_wandb() -> None:
    """Stop W&B's service, which writes a run's .wandb file out: run.finish() returns before it has."""
    import wandb

    wandb.teardown()


def make_run(cfg: ExperimentConfig, run_dir, progress: bool = False, callback=None):
    """A run as `dfkd run` builds it, for tests that drive its parts."""
    from dfkd.assemble import assemble
    from dfkd.loop import Run

    return Run(cfg, run_dir, assemble(cfg, progress=False), progress=progress, callback=callback)


def tiny_config(**sections) -> ExperimentConfig:
    """The demo setting shrunk to seconds: a one-epoch teacher, small batches, a few iterations."""
    data = {
        "teacher": {"epochs": 1},
        "generator": {"width": 4},
        "train": {
            "iterations": 4,
            "batch_size": 16,
            "log_every": 2,
            "eval_every": 2,
            "sample_every": 2,
            "checkpoint_every": 2,
        },
        "tracking": {"mode": "disabled"},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return config_from_dict(data)


@pytest.fixture
def tiny():
    return tiny_config


@pytest.fixture
def run_of():
    return make_run


def pytest_terminal_summary(terminalreporter):
    """What could not run here is said loudly at the end, not only as an `s` in the progress line."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.write_sep(
        "!", f"{len(skipped)} test(s) COULD NOT RUN on this machine", red=True, bold=True
    )
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.write_line(f"  {report.nodeid}: {reason}", red=True)


# .ci/run runs the slow checks on two workers, one thread each (--dist loadgroup): each worker takes
# one of two halves of about equal time there. One thread, no bf16 (2026-12-02, seconds):
# Fashion-MNIST ~1,220 (1,926 at 500 iterations), ResNet-8 985 at its former 600 iterations (the
# BatchNorm game's 400 at batch 128 took 310 with bf16 beside another run, 2026-12-04; unmeasured
# without bf16, about 600 expected),
# gpu_check 76 | pool 786, GAN-KD 741, demo 666, bench 123, the MLP's 500 iterations ~100 with bf16
# beside another run, 164 in float32 (2026-12-05).
FIRST_HALF = {
    "test_fashion_mnist_recipe_keeps_its_measured_level",
    "test_a_resnet8_teacher_gets_the_batchnorm_recipe_and_distils_beyond_the_plain_game",
    "test_the_gpu_check_script_runs_on_the_cpu",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("first" if item.name in FIRST_HALF else "second"))
