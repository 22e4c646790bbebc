"""A run's parts, from the config (and, through the Python API, from objects the caller holds):
the input spec, the frozen teacher pool, the student and the evaluation data.

The spec is settled in one place: `input.*` (or the API's InputSpec) first, then the first teacher's
checkpoint meta, then the dataset; a given value that disagrees with a checkpoint's meta is an error,
and a teacher whose input normalization nobody records is an error, never a silent default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from dfkd import distributed
from dfkd.classifier_files import freeze, load_classifier
from dfkd.config import ExperimentConfig, TeacherConfig
from dfkd.data import Dataset, load_dataset
from dfkd.errors import DfkdError
from dfkd.graph_files import torchscript_as_graph
from dfkd.models import build_classifier
from dfkd.perf import check_perf
from dfkd.pool import TeacherPool, check_agreement
from dfkd.report import EvalSet
from dfkd.spec import InputSpec
from dfkd.teachers import get_teacher

NO_DATASET = "none"
SPEC_KEYS = {"channels": "in_channels", "size": "image_size", "num_classes": "num_classes"}


@dataclass
class Parts:
    spec: InputSpec
    pool: TeacherPool
    student: nn.Module
    student_arch: str
    evaluation: EvalSet
    device: torch.device
    teacher_files: list  # per teacher: the file it came from (None for an in-memory module)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DfkdError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def dataset_for(cfg: ExperimentConfig) -> Dataset | None:
    if cfg.data.name == NO_DATASET:
        return None
    size = cfg.input.size or cfg.data.image_size
    return load_dataset(dataclasses.replace(cfg.data, image_size=size))


def teacher_shape(cfg: ExperimentConfig, dataset: Dataset | None) -> tuple[int | None, int, int | None]:
    """(channels, size, num_classes) to rebuild or check a teacher file with, as far as known."""
    i = cfg.input
    if dataset is not None:
        return (
            i.channels or dataset.info.channels,
            dataset.image_size,
            i.num_classes or dataset.info.num_classes,
        )
    return i.channels, i.size or cfg.data.image_size, i.num_classes


def load_teacher(
    cfg: ExperimentConfig,
    recipe: TeacherConfig,
    dataset: Dataset | None,
    device: torch.device,
    progress: bool,
) -> tuple[nn.Module, dict]:
    """A teacher, frozen (eval, requires_grad False) once for the whole run."""
    if recipe.checkpoint is None:
        if dataset is None:
            raise DfkdError("data.name=none has no images to train a teacher on: set teacher.checkpoint")
        return get_teacher(cfg.data, recipe, dataset, device, progress)  # from its recipe
    path = Path(recipe.checkpoint).expanduser()
    model, meta = load_classifier(
        path,
        arch=recipe.arch,
        kwargs=recipe.kwargs,
        shape=teacher_shape(cfg, dataset),
        trust_pickle=recipe.trust_pickle,
    )
    return freeze(model.to(device)), meta


def module_meta(model: nn.Module) -> dict:
    return {"arch": type(model).__name__, "format": "module"}


def settle_spec(
    cfg: ExperimentConfig,
    metas: list[dict],
    sources: list[str],
    dataset: Dataset | None,
    given: InputSpec | None = None,
) -> tuple[InputSpec, list[dict]]:
    """The run's input spec, and each teacher's meta completed with its own normalization."""
    i = cfg.input
    explicit = {"channels": i.channels, "size": i.size, "num_classes": i.num_classes}
    if given is not None:
        explicit = {"channels": given.channels, "size": given.size, "num_classes": given.num_classes}
    norm = (list(given.mean), list(given.std)) if given is not None else (i.mean, i.std)
    if (norm[0] is None) != (norm[1] is None):
        raise DfkdError("set both input.mean and input.std (one value per channel), or neither")
    for key, meta_key in SPEC_KEYS.items():
        for meta, source in zip(metas, sources):
            if (
                explicit[key] is not None
                and meta.get(meta_key) is not None
                and meta[meta_key] != explicit[key]
            ):
                raise DfkdError(
                    f"input.{key}={explicit[key]} disagrees with teacher {source}, whose checkpoint "
                    f"says {meta_key}={meta[meta_key]}; drop input.{key} or fix it"
                )
    completed = [_with_normalization(meta, source, norm) for meta, source in zip(metas, sources)]
    first = completed[0]
    if dataset is not None:
        info = dataset.info
        values = {"channels": info.channels, "size": dataset.image_size, "num_classes": info.num_classes}
        mean, std = info.mean, info.std  # the generator works in the dataset's normalized space
    else:
        values = {key: explicit[key] or first.get(meta_key) for key, meta_key in SPEC_KEYS.items()}
        values["size"] = values["size"] or cfg.data.image_size
        mean, std = first["mean"], first["std"]
    for key, value in values.items():
        if value is None:
            raise DfkdError(
                f"teacher {sources[0]} does not record its input {key.replace('_', ' ')}: set input.{key}"
            )
    spec = InputSpec(values["channels"], values["size"], values["num_classes"], mean, std)
    if len(mean) != spec.channels or len(std) != spec.channels:
        raise DfkdError(
            f"input.mean and input.std need {spec.channels} value(s), one per channel; got {list(mean)} "
            f"and {list(std)}"
        )
    return spec, completed


def _with_normalization(meta: dict, source: str, given: tuple) -> dict:
    mean, std = given
    if meta.get("mean") is not None and meta.get("std") is not None:
        if mean is not None and (list(meta["mean"]) != list(mean) or list(meta["std"]) != list(std)):
            raise DfkdError(
                f"input.mean/std ({mean}, {std}) disagree with teacher {source}, whose checkpoint says "
                f"mean={meta['mean']} std={meta['std']}; drop input.mean/std or fix them"
            )
        return meta
    if mean is None:
        raise DfkdError(
            f"teacher {source} does not record the input normalization it was trained with: set "
            "input.mean and input.std (per channel, of pixel values in [0, 1])"
        )
    return {**meta, "mean": list(mean), "std": list(std)}


def check_fits(metas: list[dict], sources: list[str], spec: InputSpec) -> None:
    for meta, source in zip(metas, sources):
        for key, meta_key in SPEC_KEYS.items():
            value = getattr(spec, key)
            if meta.get(meta_key) is not None and meta[meta_key] != value:
                raise DfkdError(
                    f"teacher {source} has {meta_key}={meta[meta_key]} but the input has "
                    f"{key}={value}; set input.{key} or use a teacher for this input"
                )


def build_student(
    cfg: ExperimentConfig, spec: InputSpec, student: nn.Module | None, device
) -> tuple[nn.Module, str]:
    """The student, initialized from train.seed (the game's generator is built right after it)."""
    torch.manual_seed(cfg.train.seed)
    if student is None:
        arch = cfg.student.arch
        model = build_classifier(
            arch, spec.channels, spec.num_classes, spec.size, **_kwargs(cfg.student.kwargs)
        )
        return model.to(device), arch
    cls = type(student)
    return student.to(device).train(), f"{cls.__module__}:{cls.__qualname__}"


def _kwargs(kwargs: dict) -> dict:
    return {"kwargs": kwargs} if kwargs else {}


def sources_of(cfg: ExperimentConfig) -> list[str]:
    recipes = cfg.teacher_recipes
    if len(recipes) == 1:
        return [repr(recipes[0].checkpoint) if recipes[0].checkpoint else recipes[0].arch]
    return [f"#{i} ({r.checkpoint or r.arch})" for i, r in enumerate(recipes)]


def assemble(
    cfg: ExperimentConfig,
    progress: bool = True,
    teachers: list[nn.Module] | None = None,
    student: nn.Module | None = None,
    spec: InputSpec | None = None,
    eval_split=None,
) -> Parts:
    """Everything a Run needs. `teachers` (frozen here), `student`, `spec` and `eval_split` (a
    dfkd.data.Split) replace what the config would build."""
    device = resolve_device(cfg.train.device)
    check_perf(cfg.perf, device)
    dataset = dataset_for(cfg)
    if teachers is not None:
        models = [freeze(t.to(device)) for t in teachers]
        metas, sources = (
            [module_meta(t) for t in models],
            [f"#{i} ({type(t).__name__})" for i, t in enumerate(models)],
        )
        files = [None] * len(models)
    else:
        with distributed.main_first():  # one process trains and caches a missing teacher
            loaded = [load_teacher(cfg, r, dataset, device, progress) for r in cfg.teacher_recipes]
        models, metas, sources = [m for m, _ in loaded], [meta for _, meta in loaded], sources_of(cfg)
        files = [meta.get("path") or r.checkpoint for meta, r in zip(metas, cfg.teacher_recipes)]
    if len(models) > 1:
        check_agreement(metas, sources)
    spec, metas = settle_spec(cfg, metas, sources, dataset, spec)
    # TorchScript runs its BatchNorm layers where no forward hook sees them; as a graph they are modules
    models = [freeze(torchscript_as_graph(m, spec.channels, spec.size)) for m in models]
    check_fits(metas, sources, spec)
    pool = TeacherPool(models, metas, spec, cfg.pool, seed=cfg.train.seed + 2)
    evaluation = evaluation_for(cfg, dataset, spec, eval_split)
    model, arch = build_student(cfg, spec, student, device)
    return Parts(spec, pool, model, arch, evaluation, device, files)


def evaluation_for(cfg: ExperimentConfig, dataset: Dataset | None, spec: InputSpec, split=None) -> EvalSet:
    from dfkd.data import Split
    from dfkd.evaldata import load_labelled

    e = cfg.eval
    if split is not None:
        return EvalSet(split if isinstance(split, Split) else load_labelled(split, spec), "the images given")
    if e.folder or e.file:
        if e.folder and e.file:
            raise DfkdError("set eval.folder or eval.file, not both")
        source = e.folder or e.file
        return EvalSet(load_labelled(Path(source).expanduser(), spec, e.classes or None), source)
    if dataset is not None:
        return EvalSet(dataset.test, f"{dataset.name} test split")
    return EvalSet(None, "synthetic")
