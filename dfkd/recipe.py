"""The default recipe's adaptation to the teachers it is given (method.adapt_to_teacher).

A teacher without BatchNorm (LeNet-5, an MLP) plays the plain adversarial game with two additions,
measured on MNIST-5k (runs/RESULTS.md, "Teachers without BatchNorm"): DeepInversion's jitter, as in
the BatchNorm game below, and the `input_kl` prior, which holds the images' brightness and contrast
to what the input normalization says real images have. Such a teacher keeps no statistics of its
training data beyond that normalization, and an MLP, with no convolution to prefer local shapes, is
otherwise won over by images far from any digit (0.91 of the teacher without them, 0.96 with them;
LeNet-5 0.99 either way). Against a BatchNorm teacher that ends in global pooling the generator
wins the game with images the teacher's running statistics do not describe: its logits grow without
bound and the generator settles on a few classes where the student is most wrong (runs/RESULTS.md,
"Teacher families"). For such teachers the recipe plays Fast-DFKD's generator game
(runs/mnist5k_fast.yaml, without its meta-learned start, which measured no gain, and with a lighter
adversarial term, which measured a little better): the teacher's BatchNorm statistics to match, a
class drawn at random for every synthetic image and coded into the latent, two generator steps per
iteration at a higher rate, and a replay memory the student learns from, twenty student steps per
iteration: a student step on stored images and logits costs a fraction of a generator step through
a large teacher, so a slow teacher's run spends more of its time teaching. A student whose twenty
steps would cost more than half the generator steps' forward FLOPs takes fewer
(`student_steps_within`): a WRN-16-1 learning from a WRN-16-2 would spend two thirds of each
iteration on images it has seen, and learns more from more new ones (five steps). The memory holds
the last 20,000 images: one of 50,000 keeps more images of a generator that has since moved on,
and read WRN-16-1 three points lower. Each batch it stores comes with a twin drawn by another pen
and hand, which the teacher labels (`method.replay_pen_width`: every image blended toward its 3×3
grey dilation or erosion; `method.replay_elastic`: then warped by a smooth random displacement
field), so the memory spans about 78 iterations: a student taught by the generators' strokes alone
reads digits of another pen width far worse than its teacher does (a WRN-16-1's student 66-79 % on
the test digits' dilation, where the teacher reads 94 %); with the pen's twins it reads them 3 to 13
points better and the plain digits about a point better (0.941 of the teacher over four seeds,
against 0.932), and with the warp as well 0.957 over six seeds, four of them above 0.95 (ResNet-8
0.946 -> 0.971). Two generators take turns, one an
iteration, each with its own weights and optimizer, both filling the one memory: half the images of
each of two generators teach more than all the images of either (ResNet-8 0.906 -> 0.937 of the
teacher, WRN-16-1 0.870 -> 0.906; four lift ResNet-8 a point further and not WRN-16-1). A setting
that follows one generator (a meta-learned start, a generator average, the contrastive term) keeps
one. DeepInversion's jitter (each generator image shifted by up to two pixels before the teacher
sees it) asks for images whose class survives a small move: without it the generator finds patterns
the teacher reads at one position only, which teach the student little about real digits; each image
is also turned by up to 15 degrees and scaled by up to 10 %, which asks the same of orientation and
size (ResNet-8 and the home-made CNN two points each). Two departures from Fast-DFKD, measured on
ResNet-8 and the home-made CNN (runs/RESULTS.md, "The BatchNorm game"): the generator keeps the
default output in the valid pixel range, not DFAD's standardized one (ResNet-8 on Fashion-MNIST 56
-> 63 %), and batches are 128 images, not 256: twice the iterations in the same time, which a slow
teacher needs more than a larger batch (WRN-16-1 0.67 -> 0.77 of the teacher in 600 s of one core).

Only settings nobody set are adapted: those at their default and not in the config's `given`, which
the loader fills from the experiment file and the command line, so a value given at its default
stays. The adaptation is one line that the run prints, that summary.json keeps, and that the
written config.yaml (and W&B's) carries as values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dfkd.config import ExperimentConfig
from dfkd.config_checks import TWIN_SETTINGS, one_generator_options
from dfkd.configfile import as_override, config_to_dict, with_settings
from dfkd.features import batchnorm_layers, device_of, evaluating
from dfkd.game import generator_for
from dfkd.spec import InputSpec

# The game for a BatchNorm teacher, measured on MNIST-5k (runs/RESULTS.md, "Teacher families" and
# "The BatchNorm game").
BATCHNORM_GAME: dict[str, Any] = {
    "generator.conditional": True,
    "method.priors": {"bn": 10.0, "target": 0.5},
    "method.adversarial_weight": 0.5,
    "method.n_generator_steps": 2,
    "method.n_student_steps": 20,
    "method.n_generators": 2,
    "method.generator_shift": 2,
    "method.generator_rotate": 15.0,
    "method.generator_scale": 0.1,
    "method.replay_size": 20000,
    "method.replay_pen_width": 1.0,
    "method.replay_elastic": 34.0,
    "generator_optim.lr": 0.005,
    "generator_optim.betas": [0.5, 0.999],
    "generator_optim.schedule": "constant",
    # The student as Fast-DFKD and CMI train theirs: SGD with momentum 0.9 (the default), on a cosine,
    # here rising over its first 50 iterations: at the full rate from the first step, a ResNet-8
    # student died on the generators' first, nearly one-class batches.
    "student_optim.name": "sgd",
    "student_optim.lr": 0.1,
    "student_optim.weight_decay": 5e-4,
    "student_optim.warmup": 50,
    "train.batch_size": 128,
}


# The plain game for teachers without BatchNorm, measured on MNIST-5k (runs/RESULTS.md, "Teachers
# without BatchNorm").
PLAIN_GAME: dict[str, Any] = {
    "method.priors": {"input_kl": 1.0},
    "method.generator_shift": 2,
}


def _value(config: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def forward_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """The FLOPs of `model`'s forward pass on `inputs`, counted in eval mode."""
    with torch.no_grad(), evaluating(model), FlopCounterMode(display=False) as counter:
        model(inputs)
    return counter.get_total_flops()


def _image(model: nn.Module, spec: InputSpec) -> torch.Tensor:
    return torch.zeros(1, *spec.shape, device=device_of(model))


# The student steps' forward FLOPs per iteration, at most this share of the generator steps'.
# Measured on Fashion-MNIST WRN-16-2 -> WRN-16-1 (runs/RESULTS.md): 1 (10 student steps) 0.923 of
# the teacher, 0.5 (5 steps) 0.934, against 0.905 with the game's 20; 0.2 (2 steps) trailed 0.5 by
# 7-10 points at the half.
STUDENT_FLOPS_SHARE = 0.5


def student_steps_within(
    cfg: ExperimentConfig, teachers: list[nn.Module], student: nn.Module, spec: InputSpec
) -> tuple[int, str]:
    """The student steps per iteration (at most cfg's, at least one) whose forward FLOPs stay within
    STUDENT_FLOPS_SHARE of the generator steps': a generator step runs the generator, a teacher and
    the student, a student step on stored images and logits the student alone. Forward FLOPs of one
    image stand for the cost; in time the share runs higher, as a generator step's backward pass
    skips the teacher's and student's weights (five WRN-16-1 steps take about 0.6 of the generator
    steps' time, from calibrations at 5.4 s an iteration with 20 steps and 3.5 s with 10).
    Student-step options that also run the teacher (student shifts, flips, mixup, feature terms)
    are not counted. A student as large as its teacher thus gets more new images in the same time,
    and a small one keeps all its steps. Also the reason, one readable line."""
    with torch.random.fork_rng(devices=[]):  # its initialisation draws nothing from the run's RNG
        generator = generator_for(cfg, spec)
    g = forward_flops(generator, torch.zeros(1, cfg.generator.latent_dim))
    # one member plays an iteration; a strategy that plays them all makes generator steps dearer, so
    # the count errs low
    t = sum(forward_flops(m, _image(m, spec)) for m in teachers) / len(teachers)
    s = forward_flops(student, _image(student, spec))
    within = STUDENT_FLOPS_SHARE * cfg.method.n_generator_steps * (g + t + s) // max(s, 1)
    steps = int(min(max(within, 1), cfg.method.n_student_steps))
    cost = " ".join(f"{name} {f / 1e6:.3g}" for name, f in (("generator", g), ("teacher", t), ("student", s)))
    reason = f"keeps the student's forward FLOPs within {STUDENT_FLOPS_SHARE:g} of the generator steps'"
    return steps, f"method.n_student_steps={steps} {reason} (MFLOPs an image: {cost})"


def _configured_by_hand(cfg: ExperimentConfig) -> list[str]:
    """The settings that make a config its own method (a preset's priors, a class-coded generator):
    the recipe fits nothing to the teacher around them."""
    hand = {"method.priors": cfg.method.priors, "generator.conditional": cfg.generator.conditional}
    return [key for key, value in hand.items() if value]


def why_not_adapted(cfg: ExperimentConfig) -> str | None:
    """Why a config that lets the recipe adapt it is run as given (None: it is adapted, or
    method.adapt_to_teacher=false says not to): a prior given in method.priors replaces the default
    recipe's whole game, which the user should hear of, with the way to add one instead."""
    hand = _configured_by_hand(cfg)
    if not cfg.method.adapt_to_teacher or not hand:
        return None
    return (
        f"{' and '.join(hand)} set: the game runs as configured, not fitted to the teacher; to add "
        "priors to the recipe's game, give them as method.extra_priors instead, and to change its "
        "other settings, pass those its 'dfkd: recipe:' line lists as well "
        "(method.adapt_to_teacher=false silences this)"
    )


# What an optimizer's name gives its meaning to: a learning rate given for Adam is no SGD rate.
RATE_SETTINGS = ("lr", "betas", "momentum")


def _left_to_recipe(cfg: ExperimentConfig, game: dict[str, Any]) -> list[str]:
    """The game's settings nobody set: outside `given` and at their default. An optimizer the game
    swaps (its `name`) is not swapped for one the user chose: named otherwise, or given a rate for
    the default optimizer; then that optimizer's settings all stay as configured."""
    settings, default = config_to_dict(cfg), config_to_dict(ExperimentConfig())

    def untouched(key: str) -> bool:
        return key not in cfg.given and _value(settings, key) == _value(default, key)

    left = [k for k in game if untouched(k)]
    for name in (k for k in game if k.endswith(".name")):
        section = name.rsplit(".", 1)[0]
        if untouched(name):
            own = not all(untouched(f"{section}.{field}") for field in RATE_SETTINGS)
        else:
            own = _value(settings, name) != game[name]
        if own:
            left = [k for k in left if not k.startswith(f"{section}.")]
    return left


def adapt_to_teachers(
    cfg: ExperimentConfig, teachers: list[nn.Module], student: nn.Module, spec: InputSpec
) -> tuple[ExperimentConfig, list[str]]:
    """The config to run and the adaptations made, one readable line each (none: the config as given)."""
    if not cfg.method.adapt_to_teacher or _configured_by_hand(cfg):
        return cfg, []
    with_bn = [len(batchnorm_layers(t)) for t in teachers]
    if any(with_bn):
        found = (
            f"the teacher has {with_bn[0]} BatchNorm layers"
            if len(with_bn) == 1
            else f"the teachers have BatchNorm layers ({', '.join(map(str, with_bn))})"
        )
        game, name = BATCHNORM_GAME, "the BatchNorm game (after Fast-DFKD)"
    else:
        found = (
            "no teacher has BatchNorm layers" if len(teachers) > 1 else "the teacher has no BatchNorm layers"
        )
        game, name = PLAIN_GAME, "the plain game with jitter and the input statistics"
    changes = {k: game[k] for k in _left_to_recipe(cfg, game)}
    settings = config_to_dict(cfg)
    kept = [as_override(k, _value(settings, k)) for k in game if k not in changes]
    reasons = []
    if "method.n_generators" in changes and (alone := one_generator_options(cfg)):
        del changes["method.n_generators"]
        reasons.append(f"method.n_generators stays 1: {', '.join(alone)} follows one generator")
    if not with_settings(cfg, changes).method.replay_size:
        for key in [f"method.{k}" for k in TWIN_SETTINGS if f"method.{k}" in changes]:
            del changes[key]
            reasons.append(f"{key} stays 0: method.replay_size=0 keeps no memory")
    if "method.n_student_steps" in changes:
        steps, reason = student_steps_within(with_settings(cfg, changes), teachers, student, spec)
        changes["method.n_student_steps"] = steps
        reasons.append(reason)
    said = " ".join(as_override(k, v) for k, v in changes.items())
    note = f"{found}: {name}: {said}"
    if kept:
        note += f" (kept as configured: {' '.join(kept)})"
    if cfg.method.extra_priors:
        note += f", with {as_override('method.extra_priors', cfg.method.extra_priors)}"
    reasons.append("method.adapt_to_teacher=false keeps dfkd's plain game")
    return with_settings(cfg, changes), ["; ".join([note, *reasons])]
