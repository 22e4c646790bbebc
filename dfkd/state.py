"""A run's checkpoint: everything needed to continue bit for bit, and the resume compatibility check.

Keys: step, wall_s, best_acc, run_id, rollbacks, collapse_streak (per generator), generator_resets, config,
latent_rngs (one per process), torch_rng, pool, one state_dict per trained network (student, generator,
generator_1, ... (method.n_generators), ema, generator_ema, discriminator, adapter, feature_adapters,
contrast, generator_meta), opt_<player> and sched_<player> for s(tudent), g(enerator; g1, ...),
d(iscriminator), m (the generator's meta start),
memory (the replay memory), cuda_rng.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dfkd import distributed
from dfkd.checkpoint import load_safe, load_weights
from dfkd.config import ExperimentConfig, config_from_dict, config_to_dict
from dfkd.configfile import as_override
from dfkd.errors import DfkdError
from dfkd.optim import replan, scale_lr, schedule_state

if TYPE_CHECKING:
    from dfkd.loop import Run

# Sections that change how the same algorithm runs or is recorded, not what it computes (and `given`,
# where each setting came from).
MAY_CHANGE_ON_RESUME = ("perf", "tracking", "eval", "given")
# Keys a resumed run may change; the change is recorded in the run (resume/<key> in metrics.jsonl).
TUNABLE_ON_RESUME = (
    "train.iterations",
    "train.time_limit",
    "train.log_every",
    "train.eval_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.max_rollbacks",
    "student_optim.lr",
    "generator_optim.lr",
    "discriminator_optim.lr",
)


def run_state(run: Run) -> dict:
    game = run.game
    state = {
        "step": run.iterations_done,
        "wall_s": run.wall_s,
        "best_acc": run.report.best_acc,
        "run_id": run.run_id,
        "rollbacks": run.rollbacks,
        "collapse_streak": [m.streak for m in run.collapse.monitors],  # per generator
        "generator_resets": run.generator_resets,
        "config": config_to_dict(run.cfg),
        "latent_rngs": distributed.gather(game.latent_rng.get_state()),  # one per process (torchrun)
        "torch_rng": torch.get_rng_state(),
        "pool": game.pool.state_dict(),
    }
    state.update({name: net.state_dict() for name, net in game.networks.items()})
    for name, player in game.players.items():
        state[f"opt_{name}"], state[f"sched_{name}"] = (
            player.optimizer.state_dict(),
            player.schedule.state_dict(),
        )
    state.update(game.batches.state_dict())
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _with_defaults(saved: dict) -> dict:
    """A saved config with the keys added since it was written set to their defaults."""
    try:
        return config_to_dict(config_from_dict(saved))
    except DfkdError:
        return saved


def _leaves(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("priors", "extra_priors", "kwargs"):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resumable(saved: dict, cfg: ExperimentConfig, path: Path) -> dict[str, tuple]:
    """The saved run and this config must describe the same algorithm; the keys of TUNABLE_ON_RESUME
    may differ. Returns those changes: {key: (saved value, new value)}."""
    saved, mine = _leaves(_with_defaults(saved)), _leaves(config_to_dict(cfg))
    changed = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
    fixed = [k for k in changed if k not in TUNABLE_ON_RESUME and k.split(".")[0] not in MAY_CHANGE_ON_RESUME]
    if fixed:
        # where the recipe's game changed since the run began, a learning rate may differ with the
        # rest: the saved values of all continue the saved game
        tuned = [k for k in changed if k in TUNABLE_ON_RESUME]
        saved_values = " ".join(as_override(k, saved.get(k)) for k in fixed + tuned)
        raise DfkdError(
            f"cannot resume {path}: config differs from the saved run in {', '.join(fixed)} "
            f"(a resumed run may change only {', '.join(TUNABLE_ON_RESUME)} "
            f"and the perf, tracking and eval sections); to continue the saved run, pass its values: "
            f"{saved_values}"
        )
    return {k: change for k, change in changed.items() if k in TUNABLE_ON_RESUME}


def load_run_state(run: Run, path: Path) -> int:
    """Load `path` into `run`; returns the checkpoint's rollback count."""
    state = load_safe(path)
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        held = (
            type(state).__name__ if not isinstance(state, dict) else "a mapping without 'step' and 'config'"
        )
        raise DfkdError(
            f"--resume: {str(path)!r} is not a dfkd run checkpoint (it holds {held}); "
            "start the run afresh with --overwrite"
        )
    changes = check_resumable(state["config"], run.cfg, path)
    game = run.game
    for name, net in game.networks.items():
        load_weights(net, state[name], f"{name} in {path}")
    for name, player in game.players.items():
        player.optimizer.load_state_dict(state[f"opt_{name}"])
        player.schedule.load_state_dict(schedule_state(state[f"sched_{name}"]))
    game.batches.load_state_dict(state, game.device)
    rngs = state["latent_rngs"] if "latent_rngs" in state else [state["latent_rng"]]  # older checkpoints
    if distributed.rank() < len(rngs):  # else: a process the saved run did not have keeps its fresh seed
        game.latent_rng.set_state(rngs[distributed.rank()])
    game.pool.load_state_dict(state["pool"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    run.iterations_done, run.wall_s, run.run_id = state["step"], state["wall_s"], state["run_id"]
    run.saved_step = state["step"]
    run.report.best_acc = state["best_acc"]
    run.rollbacks = state["rollbacks"]
    streaks = state["collapse_streak"]
    streaks = [streaks] if isinstance(streaks, int) else streaks  # one number in older checkpoints
    for monitor, streak in zip(run.collapse.monitors, streaks):
        monitor.streak = streak
    run.generator_resets = state.get("generator_resets", 0)  # absent from older checkpoints
    _apply(changes, run)
    return state["rollbacks"]


def _apply(changes: dict[str, tuple], run: Run) -> None:
    """New learning rates scale the saved ones (schedule, rollbacks and all); a new length re-plans
    the schedules as if the run had been planned for it."""
    names = {"student_optim": "s", "generator_optim": "gm", "discriminator_optim": "d"}  # m: meta start
    players = run.game.players
    for key, (old, new) in changes.items():
        section = key.split(".")[0]
        if not key.endswith(".lr") or not old:
            continue
        for player in (p for k, p in players.items() if k[0] in names[section]):
            scale_lr(player.optimizer, player.schedule, new / old)
    for player in players.values():
        replan(player.optimizer, player.schedule, run.game.schedule_length(player, run.cfg.train.iterations))
    run.resume_changes = {**run.resume_changes, **changes}
