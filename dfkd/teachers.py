"""Teachers: trained from a recipe (and cached, keyed by the recipe) or loaded from a file
(dfkd.classifier_files reads every format); `save_classifier` writes dfkd's own checkpoint format.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from dfkd.augment import random_batch_shift
from dfkd.checkpoint import save_atomic
from dfkd.classifier_files import freeze, load_classifier
from dfkd.config import DataConfig, TeacherConfig
from dfkd.data import Dataset
from dfkd.evaluate import accuracy
from dfkd.models import build_classifier

RECIPE_VERSION = 1  # bump when training code changes what a recipe produces


def cache_dir() -> Path:
    return Path(os.environ.get("DFKD_CACHE", "~/.cache/dfkd")).expanduser()


def classifier_meta(arch: str, dataset: Dataset, test_acc: float, **extra) -> dict:
    info = dataset.info
    return {
        "arch": arch,
        "dataset": dataset.name,
        "num_classes": info.num_classes,
        "in_channels": info.channels,
        "image_size": dataset.image_size,
        "mean": list(info.mean),
        "std": list(info.std),
        "test_acc": test_acc,
        **extra,
    }


def save_classifier(path: str | Path, model: nn.Module, meta: dict) -> None:
    """A dfkd checkpoint: the weights and `meta` (the schema dfkd.classifier_files describes)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_atomic({"state_dict": state, "meta": meta}, path)


def recipe_key(data: DataConfig, teacher: TeacherConfig) -> str:
    recipe = {"v": RECIPE_VERSION, "data": dataclasses.asdict(data), "teacher": dataclasses.asdict(teacher)}
    for key in ("checkpoint", "trust_pickle"):  # how to load a file, not what to train
        recipe["teacher"].pop(key)
    if not recipe["teacher"]["kwargs"]:  # keys of recipes without kwargs stay as they were
        recipe["teacher"].pop("kwargs")
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    # A user's arch is a path and a class ("runs/user_cnn.py:SmallCNN"): the file name keeps it
    # readable but flat, so no arch can put the file outside the cache or in a folder of its own.
    arch = re.sub(r"[^\w.-]+", "_", teacher.arch)
    return f"{data.name}-{arch}-{digest}"


def train_classifier(
    cfg: TeacherConfig, dataset: Dataset, device: torch.device, progress: bool = True
) -> nn.Module:
    """Adam with a cosine schedule and random ±2-pixel shifts, on the dataset's train split only."""
    torch.manual_seed(cfg.seed)
    info = dataset.info
    model = build_classifier(cfg.arch, info.channels, info.num_classes, dataset.image_size, cfg.kwargs)
    model = model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps_per_epoch = -(-len(dataset.train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    images, labels = dataset.train.images, dataset.train.labels
    model.train()
    bar = tqdm(range(cfg.epochs), desc=f"teacher {cfg.arch}", disable=not progress, unit="epoch")
    for _ in bar:
        order = torch.randperm(len(labels))
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            x, y = random_batch_shift(images[idx]).to(device), labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


def get_teacher(
    data: DataConfig, cfg: TeacherConfig, dataset: Dataset, device: torch.device, progress: bool = True
) -> tuple[nn.Module, dict]:
    """The teacher a recipe describes, frozen: from the cache, or trained on `dataset` and cached.
    (A teacher file is read by dfkd.classifier_files; dfkd.assemble chooses which.)"""
    path = cache_dir() / "teachers" / f"{recipe_key(data, cfg)}.pt"
    if path.is_file():
        model, meta = load_classifier(path, arch=cfg.arch, kwargs=cfg.kwargs)
    else:
        if not progress:  # a long silent pause in a log otherwise (a WRN teacher takes an hour of a core)
            tqdm.write(
                f"dfkd: training the teacher {cfg.arch} by dfkd's teacher recipe "
                f"(teacher.epochs={cfg.epochs}); it is cached at {path}",
                file=sys.stderr,
            )
        start = time.perf_counter()
        model = train_classifier(cfg, dataset, device, progress)
        extra = {"kwargs": cfg.kwargs} if cfg.kwargs else {}  # a user's network is rebuilt with them
        acc = accuracy(model, dataset.test, device)
        meta = classifier_meta(
            cfg.arch,
            dataset,
            acc,
            recipe=dataclasses.asdict(cfg),
            train_s=round(time.perf_counter() - start, 1),
            **extra,
        )
        save_classifier(path, model, meta)
        meta = {**meta, "format": "dfkd"}
    return freeze(model.to(device)), {**meta, "path": str(path)}
