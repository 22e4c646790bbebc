"""The config's validation: ranges, choices and shapes, each error naming the key and the fix."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from dfkd.errors import DfkdError
from dfkd.meta import META_RULES
from generators.registry import OUTPUTS as GENERATOR_OUTPUTS

if TYPE_CHECKING:
    from dfkd.config import ExperimentConfig

OPTIMIZER_SECTIONS = ("student_optim", "generator_optim", "discriminator_optim")


def _check_finite(node: Any, prefix: str = "") -> None:
    """NaN and infinities are refused wherever a number goes (NaN also never equals itself, which
    would make a run refuse its own checkpoint)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name)
        return
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        _check_finite(value, f"{prefix}.{key}" if isinstance(node, dict) else f"{prefix}[{key}]")
    if isinstance(node, float) and not math.isfinite(node):
        raise DfkdError(f"{prefix} must be a finite number, got {node}")


# The method settings that shape the replay memory's twins: each needs a memory.
TWIN_SETTINGS = ("replay_pen_width", "replay_elastic")


def check_adapted(cfg: ExperimentConfig) -> None:
    """What the game needs of the rest of the config, checked once the recipe has adapted it
    (dfkd.loop.Run): the recipe may supply it (a replay memory, for one)."""
    check_priors(cfg, "extra_priors")
    for key in TWIN_SETTINGS:
        value = getattr(cfg.method, key)
        if value and not cfg.method.replay_size:
            raise DfkdError(
                f"method.{key}={value:g} draws twins of the batches the replay memory stores, but "
                f"method.replay_size is 0; set method.replay_size or method.{key}=0"
            )


def check_priors(cfg: ExperimentConfig, key: str) -> None:
    """What the priors in method.`key` need of the rest of the config. method.extra_priors is
    checked once the recipe has adapted the game (check_adapted), which may supply it."""
    priors = getattr(cfg.method, key)
    if "target" in priors and not cfg.generator.conditional:
        raise DfkdError(
            f"method.{key}.target asks the teacher for the class each latent codes for, but "
            "generator.conditional is false; set generator.conditional=true"
        )
    if "memory_balance" in priors and not cfg.method.replay_size:
        raise DfkdError(
            f"method.{key}.memory_balance weighs the balance prior by how unevenly the replay "
            "memory's images spread over the classes, but method.replay_size is 0; set "
            "method.replay_size (20000 in the BatchNorm game) or use the balance prior"
        )


def check(cfg: ExperimentConfig) -> None:
    from dfkd.optim import OPTIMIZERS, SCHEDULES

    _check_finite(cfg)
    for key, value in _positive(cfg).items():
        if value <= 0:
            raise DfkdError(f"{key} must be positive, got {value}")
    non_negative = {
        f"method.{k}": getattr(cfg.method, k)
        for k in (
            "replay_size",
            "replay_elastic",
            "generator_shift",
            "student_shift",
            "alpha",
            "beta",
            "adversarial_weight",
            "contrast",
        )
    }
    non_negative["train.max_rollbacks"] = cfg.train.max_rollbacks
    non_negative["train.time_limit"] = cfg.train.time_limit
    non_negative["eval.min_teacher_margin"] = cfg.eval.min_teacher_margin
    for name in OPTIMIZER_SECTIONS:
        opt = getattr(cfg, name)
        non_negative.update({f"{name}.{k}": getattr(opt, k) for k in ("weight_decay", "momentum", "warmup")})
    for key, value in non_negative.items():
        if value < 0:
            raise DfkdError(f"{key} must be 0 (off) or positive, got {value}")
    ranges = {  # key: (value, low, high, low inclusive, high inclusive)
        "train.rollback_lr_factor": (cfg.train.rollback_lr_factor, 0.0, 1.0, False, True),
        "train.collapse_threshold": (cfg.train.collapse_threshold, 0.0, 1.0, False, True),
        "method.student_mixup": (cfg.method.student_mixup, 0.0, 1.0, True, True),
        "method.replay_pen_width": (cfg.method.replay_pen_width, 0.0, 1.0, True, True),
        "method.generator_rotate": (cfg.method.generator_rotate, 0.0, 180.0, True, True),
        "method.generator_scale": (cfg.method.generator_scale, 0.0, 1.0, True, False),
        "method.generator_ema": (cfg.method.generator_ema, 0.0, 1.0, True, False),
        "method.generator_ema_mix": (cfg.method.generator_ema_mix, 0.0, 1.0, False, False),
        "method.contrast_crop": (cfg.method.contrast_crop, 0.0, 1.0, False, True),
        "train.student_ema": (cfg.train.student_ema, 0.0, 1.0, True, False),
        "eval.min_teacher_margin": (cfg.eval.min_teacher_margin, 0.0, 1.0, True, False),
    }
    for name in OPTIMIZER_SECTIONS:
        for n, beta in enumerate(getattr(cfg, name).betas):
            ranges[f"{name}.betas[{n}]"] = (beta, 0.0, 1.0, True, False)
    for key, (value, low, high, low_in, high_in) in ranges.items():
        if not ((value >= low if low_in else value > low) and (value <= high if high_in else value < high)):
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise DfkdError(f"{key} must be in {interval}, got {value}")
    choices = {
        "train.device": (cfg.train.device, ("cpu", "cuda", "auto")),
        "perf.autocast": ("none" if cfg.perf.autocast is None else cfg.perf.autocast, ("none", "bf16")),
        "generator.output": (cfg.generator.output, GENERATOR_OUTPUTS),
        "tracking.mode": (cfg.tracking.mode, ("online", "offline", "disabled")),
        "train.collapse_action": (cfg.train.collapse_action, ("reinit", "warn")),
        "method.meta_generator": (
            "null" if cfg.method.meta_generator is None else cfg.method.meta_generator,
            ("null", *META_RULES),
        ),
    }
    for name in OPTIMIZER_SECTIONS:
        opt = getattr(cfg, name)
        choices[f"{name}.name"] = (opt.name, OPTIMIZERS.names())
        choices[f"{name}.schedule"] = (opt.schedule, SCHEDULES.names())
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise DfkdError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
    for name in OPTIMIZER_SECTIONS:
        if len(getattr(cfg, name).betas) != 2:
            raise DfkdError(
                f"{name}.betas must be two numbers [beta1, beta2], got {getattr(cfg, name).betas}"
            )
    if cfg.discriminator.layers and len(cfg.discriminator.layers) != 2:
        raise DfkdError(
            f"discriminator.layers must be [student_layer, teacher_layer], got {cfg.discriminator.layers}"
        )
    check_priors(cfg, "priors")
    if cfg.method.meta_generator is not None and cfg.method.contrast > 0:
        raise DfkdError(
            "method.meta_generator restarts the generator's optimizer every iteration, and with it "
            "the contrastive head's (method.contrast); set one of them off"
        )
    if cfg.method.n_generators > 1 and (clash := one_generator_options(cfg)):
        raise DfkdError(
            f"method.n_generators={cfg.method.n_generators} plays generators in turn, but "
            f"{', '.join(clash)} follows one generator; set method.n_generators=1 or turn it off"
        )
    for i, pair in enumerate(cfg.method.features):
        if len(pair) != 2:
            raise DfkdError(f"method.features[{i}] must be a pair [student_layer, teacher_layer], got {pair}")


def one_generator_options(cfg: ExperimentConfig) -> list[str]:
    """The options set in `cfg` that follow a single generator, not several taking turns."""
    m = cfg.method
    on = {
        "method.meta_generator": m.meta_generator is not None,
        "method.generator_ema": m.generator_ema > 0,
        "method.contrast": m.contrast > 0,
    }
    return [k for k, set_ in on.items() if set_]


def _positive(cfg: ExperimentConfig) -> dict[str, float]:
    t, m, g, d = cfg.train, cfg.method, cfg.generator, cfg.discriminator
    out = {
        f"train.{k}": getattr(t, k)
        for k in (
            "iterations",
            "batch_size",
            "log_every",
            "eval_every",
            "sample_every",
            "checkpoint_every",
            "collapse_patience",
        )
    }
    out.update(
        {
            f"method.{k}": getattr(m, k)
            for k in (
                "n_student_steps",
                "n_generator_steps",
                "n_generators",
                "temperature",
                "contrast_temperature",
                "contrast_bank",
            )
        }
    )
    out.update({"generator.latent_dim": g.latent_dim, "generator.width": g.width})
    out.update({"data.image_size": cfg.data.image_size, "tracking.init_timeout": cfg.tracking.init_timeout})
    out.update({f"teacher.{k}": getattr(cfg.teacher, k) for k in ("epochs", "batch_size", "lr")})
    out.update(
        {
            "discriminator.width": d.width,
            "discriminator.steps": d.steps,
            "eval.synthetic_holdout": cfg.eval.synthetic_holdout,
        }
    )
    out.update({f"{name}.lr": getattr(cfg, name).lr for name in OPTIMIZER_SECTIONS})
    for key in ("channels", "size", "num_classes"):
        if getattr(cfg.input, key) is not None:
            out[f"input.{key}"] = getattr(cfg.input, key)
    for n, std in enumerate(cfg.input.std or []):
        out[f"input.std[{n}]"] = std
    return out
