"""The default recipe's adaptation to the teachers it is given (method.adapt_to_teacher).

The plain adversarial game suits teachers without BatchNorm (LeNet-5, MLPs). Against a BatchNorm
teacher that ends in global pooling the generator wins the game with images the teacher's running
statistics do not describe: its logits grow without bound and the generator settles on a few
classes where the student is most wrong (runs/RESULTS.md, "Teacher families"). For such teachers
the recipe adds what the BatchNorm-based methods share (DeepInversion, DFQ, CMI, Fast-DFKD): the
teacher's BatchNorm statistics to match, as `bn_kl` (one scale at any depth and width).

Only settings the user left at their defaults are adapted; every adaptation is one line that the
run prints, that summary.json keeps, and that the written config.yaml (and W&B's) carries as values.
"""

from __future__ import annotations

import dataclasses

import torch.nn as nn

from dfkd.config import ExperimentConfig
from dfkd.features import batchnorm_layers

# Priors for a BatchNorm teacher, measured on MNIST-5k (runs/RESULTS.md, "Teacher families").
BATCHNORM_PRIORS = {"bn_kl": 1.0}


def adapt_to_teachers(cfg: ExperimentConfig, teachers: list[nn.Module]) -> tuple[ExperimentConfig, list[str]]:
    """The config to run and the adaptations made, one readable line each (none: the config as given)."""
    m = cfg.method
    if not m.adapt_to_teacher or m.priors or cfg.generator.conditional:
        return cfg, []
    with_bn = [len(batchnorm_layers(t)) for t in teachers]
    if not any(with_bn):
        return cfg, []
    found = (
        f"the teacher has {with_bn[0]} BatchNorm layers"
        if len(with_bn) == 1
        else f"the teachers have BatchNorm layers ({', '.join(map(str, with_bn))})"
    )
    priors = ", ".join(f"{k}: {v:g}" for k, v in BATCHNORM_PRIORS.items())
    notes = [f"{found}: method.priors={{{priors}}} (method.adapt_to_teacher=false keeps the plain game)"]
    return dataclasses.replace(cfg, method=dataclasses.replace(m, priors=dict(BATCHNORM_PRIORS))), notes
