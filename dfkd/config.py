"""Typed experiment configuration: dataclasses loaded from YAML, with dotted overrides.

Unknown keys and values of the wrong type are errors that name the key. YAML is read with
`yaml.safe_load`, which builds plain data and never executes code.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dfkd.errors import DfkdError
from generators.registry import OUTPUTS as GENERATOR_OUTPUTS


@dataclass
class DataConfig:
    # A registered dataset (dfkd.data.DATASETS): it trains missing teachers, describes the input
    # (unless `input` says otherwise) and its test split evaluates the student. `none`: no dataset;
    # the teacher is a checkpoint and `input` describes what it takes.
    name: str = "mnist5k"
    root: str | None = None  # folder for datasets read from disk
    image_size: int = 32  # model input size; images are resized to it


@dataclass
class InputConfig:
    """What the teacher takes, for teachers no registered dataset describes. An unset field comes
    from the teacher's dfkd checkpoint meta, else from the dataset; a given one must agree with
    the checkpoint's meta. `size` unset means data.image_size."""

    channels: int | None = None
    size: int | None = None
    num_classes: int | None = None
    mean: list[float] | None = None  # per channel, of pixel values in [0, 1]
    std: list[float] | None = None


@dataclass
class EvalConfig:
    """Labelled real images to score teacher and student on, instead of the dataset's test split:
    `folder` (torchvision ImageFolder: one sub-folder of images per class) or `file` (.npz or .pt
    holding `images` and `labels`). With neither and data.name none, the run reports teacher-student
    agreement on `synthetic_holdout` synthetic images the student never trains on."""

    folder: str | None = None
    file: str | None = None
    # Class folder names in the teacher's class order (default: sorted, folder i is class i).
    classes: list[str] = field(default_factory=list)
    synthetic_holdout: int = 1000
    # A teacher whose accuracy on the evaluation data is not this fraction of the way from chance
    # to 100 % is an error (a wrong normalization or architecture, most often); 0 skips the check.
    min_teacher_margin: float = 0.25


@dataclass
class TeacherConfig:
    """A checkpoint to load, or a recipe to train (and cache, keyed by the recipe) when it is missing.
    `teachers` (a list of these) replaces `teacher` when it is not empty."""

    # A registered classifier, `torchvision.<name>`, `timm.<name>`, or the user's own code:
    # `path/to/file.py:MyNet` or `package.module:factory` (imported and run: the user's choice).
    arch: str = "lenet5"
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to a user's class or factory
    # A dfkd checkpoint, a plain state_dict (of `arch`), a TorchScript archive or a torch.export
    # program (.pt2); recognised by content.
    checkpoint: str | None = None
    # Also accept a whole pickled module (torch.save(model)): loading it runs code from the file.
    trust_pickle: bool = False
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0


@dataclass
class StudentConfig:
    arch: str = "lenet5_half"  # any name teacher.arch takes
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GeneratorConfig:
    name: str = "dfad"
    latent_dim: int = 100
    width: int = 16  # DFAD's ngf; the paper uses 64, which costs 16x more per image on a CPU
    # After the final tanh: `pixels` (tanh mapped to pixel values in [0, 1], then normalized with the
    # data's mean and std: only images a camera could take) or `standardized` (DFAD's non-affine
    # BatchNorm: zero mean and unit variance per batch, values beyond black and white allowed).
    # pixels lifted the demo from 0.961 to 0.979 and Fashion-MNIST by 2 to 5 points (runs/RESULTS.md).
    output: str = "pixels"


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam only
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | cosine
    grad_clip: float | None = None  # max total grad norm; None disables clipping


@dataclass
class MethodConfig:
    """The adversarial game: what the generator maximizes and the student minimizes."""

    name: str = "adversarial"
    loss: str = "kl"  # a registered discrepancy (dfkd.losses.LOSSES); KL beat L1 here (runs/RESULTS.md)
    # Weight of the discrepancy in the generator's loss; 0 leaves the generator to its priors
    # alone (DAFL: samples the teacher likes, not samples the student gets wrong).
    adversarial_weight: float = 1.0
    temperature: float = 1.0  # for KL-type losses
    n_student_steps: int = 5
    n_generator_steps: int = 1
    # The generator step's own batch (and its teacher logits) serves all student steps of the
    # iteration instead of a fresh batch per step: no extra generator or teacher forward at all.
    reuse_samples: bool = True
    # Generator priors (dfkd.losses.PRIORS) and their weights, added to the generator's loss to keep
    # its samples where the teacher is confident and spread over all classes.
    priors: dict[str, float] = field(default_factory=dict)
    activation_layer: str | None = None  # the teacher layer the `activation` prior reads
    # Keep the last `replay_size` synthetic images with their teacher logits; student steps draw
    # their batches from this memory (it always holds the newest batch). 0 disables it.
    replay_size: int = 0
    # Student steps see each synthetic image shifted by up to this many pixels, with the teacher's
    # logits for the shifted image (one extra teacher forward per student step). 0 disables it.
    student_shift: int = 0
    # MAD-style remedy for the generator's drift: an exponential moving average of the generator
    # (decay `generator_ema`; 0 disables it) supplies `generator_ema_mix` of every student batch.
    generator_ema: float = 0.0
    generator_ema_mix: float = 0.5
    # Likewise, mirror each synthetic image left-right with probability 1/2 (for data whose
    # classes are mirror-symmetric, such as clothes; not digits).
    student_flip: bool = False
    # Likewise, blend this fraction of the images each with another synthetic image (mixup, weight
    # uniform in [0, 1)); the teacher labels the blend, so the student also learns between samples.
    student_mixup: float = 0.0
    # Feature-based term for the student: pairs [student layer, teacher layer] named by module path
    # (`dfkd layers ARCH` prints them), compared with `feature_loss`, weighted by `feature_weight`.
    features: list[list[str]] = field(default_factory=list)
    feature_loss: str = "at"  # a registered feature term (dfkd.losses.FEATURE_LOSSES)
    feature_weight: float = 250.0  # ZSKT's beta for attention transfer
    # GAN-KD (name: gankd): the student minimizes CE(student, teacher argmax) + alpha * KL(teacher,
    # student) + beta * the GAN loss of a discriminator (`discriminator`) telling the teacher's
    # outputs (or features) from the student's. beta 0 builds no discriminator.
    alpha: float = 1.0
    beta: float = 0.1
    gan_loss: str = "bce"  # a registered GAN objective (dfkd.losses.GAN_LOSSES): bce | lsgan | hinge


@dataclass
class DiscriminatorConfig:
    """GAN-KD's discriminator: over class probabilities (`mlp`), or over a feature map (`conv`,
    `feature_mlp`) of `layers` = [student layer, teacher layer]."""

    name: str = "mlp"  # a registered discriminator (discriminators.DISCRIMINATORS)
    width: int = 128
    spectral_norm: bool = False
    layers: list[str] = field(default_factory=list)
    steps: int = 1  # discriminator steps before each student step


@dataclass
class PoolConfig:
    """How several teachers (`teachers`) share the game; a single teacher ignores it."""

    strategy: str = "random"  # a registered strategy (dfkd.pool.STRATEGIES)
    weights: list[float] = field(default_factory=list)  # weighted: one weight per teacher
    response_teacher: int = 0  # split: index of the teacher for the response term and the generator
    feature_teacher: int = 1  # split: index of the teacher for the feature term (method.features)


@dataclass
class TrainConfig:
    iterations: int = 1000
    batch_size: int = 256
    seed: int = 0
    device: str = "cpu"  # cpu | cuda | auto
    log_every: int = 50
    eval_every: int = 200
    sample_every: int = 500
    checkpoint_every: int = 500
    # Decay of an exponential moving average of the student's weights; the average is what is
    # evaluated and saved. 0 disables it.
    student_ema: float = 0.99
    # Divergence: a NaN or Inf in a loss or parameter, found at a log or checkpoint step, reloads
    # the last good checkpoint with learning rates times `rollback_lr_factor`, at most
    # `max_rollbacks` times; then the run stops with an error.
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    # Collapse: warn when more than `collapse_threshold` of the synthetic batch falls in one teacher
    # class, on average, for `collapse_patience` log intervals in a row.
    collapse_threshold: float = 0.9
    collapse_patience: int = 5


@dataclass
class PerfConfig:
    """Fast paths: how the same algorithm is executed. None changes what is computed beyond float
    rounding (bf16 aside), so a run may be resumed with other settings. `dfkd bench` measures each."""

    # NHWC memory layout for every network and synthetic batch: oneDNN (CPU) and cuDNN convolutions
    # run faster on it (the DFAD generator's forward 1.9x on the project's 2-core CPU). Off by
    # default: the default recipe reuses samples and gained 3 % from it, while the changed rounding
    # moved its final ratio from 0.961 to 0.948 (runs/RESULTS.md, "Speed").
    channels_last: bool = False
    # torch.compile the networks (opt-in: compiling takes tens of seconds before the first step).
    compile: bool = False
    # none | bf16: bfloat16 autocast of the forward passes (losses stay float32). Fast on GPUs and on
    # CPUs with AMX (the generator's forward 3.5x on this project's CPU); it changes the rounding.
    autocast: str = "none"
    fused_optimizers: bool = False  # Adam/SGD's fused kernels (one kernel per step for all parameters)


@dataclass
class TrackingConfig:
    mode: str = "offline"  # online | offline | disabled; WANDB_MODE overrides
    project: str = "dfkd"
    entity: str | None = None
    run_name: str | None = None
    init_timeout: float = 60.0  # seconds to reach the W&B server before logging offline instead


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    input: InputConfig = field(default_factory=InputConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    pool: PoolConfig = field(default_factory=PoolConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    student_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    generator_optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    discriminator_optim: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-4, betas=[0.5, 0.999]))
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> "ExperimentConfig":
        positive = {
            "train.iterations": self.train.iterations,
            "train.batch_size": self.train.batch_size,
            "train.log_every": self.train.log_every,
            "train.eval_every": self.train.eval_every,
            "train.sample_every": self.train.sample_every,
            "train.checkpoint_every": self.train.checkpoint_every,
            "method.n_student_steps": self.method.n_student_steps,
            "method.n_generator_steps": self.method.n_generator_steps,
            "student_optim.lr": self.student_optim.lr,
            "generator_optim.lr": self.generator_optim.lr,
            "generator.latent_dim": self.generator.latent_dim,
            "generator.width": self.generator.width,
            "data.image_size": self.data.image_size,
            "teacher.epochs": self.teacher.epochs,
            "teacher.batch_size": self.teacher.batch_size,
            "teacher.lr": self.teacher.lr,
            "method.temperature": self.method.temperature,
            "train.collapse_patience": self.train.collapse_patience,
            "tracking.init_timeout": self.tracking.init_timeout,
            "discriminator.width": self.discriminator.width,
            "discriminator.steps": self.discriminator.steps,
            "discriminator_optim.lr": self.discriminator_optim.lr,
        }
        for key, value in positive.items():
            if value <= 0:
                raise DfkdError(f"{key} must be positive, got {value}")
        for key in ("replay_size", "student_shift"):
            if getattr(self.method, key) < 0:
                raise DfkdError(f"method.{key} must be 0 (off) or positive, got {getattr(self.method, key)}")
        if self.train.max_rollbacks < 0:
            raise DfkdError(f"train.max_rollbacks must be 0 (stop at once) or positive, got {self.train.max_rollbacks}")
        for key in ("rollback_lr_factor", "collapse_threshold"):
            if not 0.0 < getattr(self.train, key) <= 1.0:
                raise DfkdError(f"train.{key} must be in (0, 1], got {getattr(self.train, key)}")
        if not 0.0 <= self.method.student_mixup <= 1.0:
            raise DfkdError(f"method.student_mixup must be in [0, 1] (0 disables it), got {self.method.student_mixup}")
        if not 0.0 <= self.method.generator_ema < 1.0:
            raise DfkdError(f"method.generator_ema must be in [0, 1), got {self.method.generator_ema}")
        if not 0.0 < self.method.generator_ema_mix < 1.0:
            raise DfkdError(f"method.generator_ema_mix must be in (0, 1), got {self.method.generator_ema_mix}")
        if not 0.0 <= self.train.student_ema < 1.0:
            raise DfkdError(f"train.student_ema must be in [0, 1), got {self.train.student_ema}")
        choices = {
            "train.device": (self.train.device, ("cpu", "cuda", "auto")),
            "perf.autocast": (self.perf.autocast, ("none", "bf16")),
            "generator.output": (self.generator.output, GENERATOR_OUTPUTS),
            "tracking.mode": (self.tracking.mode, ("online", "offline", "disabled")),
            "student_optim.name": (self.student_optim.name, ("adam", "sgd")),
            "generator_optim.name": (self.generator_optim.name, ("adam", "sgd")),
            "discriminator_optim.name": (self.discriminator_optim.name, ("adam", "sgd")),
            "discriminator_optim.schedule": (self.discriminator_optim.schedule, ("constant", "cosine")),
            "student_optim.schedule": (self.student_optim.schedule, ("constant", "cosine")),
            "generator_optim.schedule": (self.generator_optim.schedule, ("constant", "cosine")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise DfkdError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
        for key in ("alpha", "beta", "adversarial_weight"):
            if getattr(self.method, key) < 0:
                raise DfkdError(f"method.{key} must be 0 (off) or positive, got {getattr(self.method, key)}")
        if self.discriminator.layers and len(self.discriminator.layers) != 2:
            raise DfkdError(f"discriminator.layers must be [student_layer, teacher_layer], got {self.discriminator.layers}")
        for i, pair in enumerate(self.method.features):
            if len(pair) != 2:
                raise DfkdError(f"method.features[{i}] must be a pair [student_layer, teacher_layer], got {pair}")
        return self

    @property
    def teacher_recipes(self) -> list[TeacherConfig]:
        """The teachers of this run: the `teachers` pool, or the single `teacher`."""
        return self.teachers or [self.teacher]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints widen to floats, nothing else converts."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except DfkdError:
                pass
        raise DfkdError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise DfkdError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise DfkdError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DfkdError(f"{key}: expected a mapping of settings, got {value!r}")
        return _build(tp(), value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise DfkdError(f"{key}: expected {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise DfkdError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _build(base: Any, data: dict, prefix: str = "") -> Any:
    """Apply the mapping `data` onto the dataclass instance `base` (its defaults), checking every key."""
    hints = typing.get_type_hints(type(base))
    names = {f.name for f in dataclasses.fields(base)}
    for key, value in data.items():
        if key not in names:
            raise DfkdError(f"unknown config key '{prefix}{key}'; known: {', '.join(sorted(names))}")
        current = getattr(base, key)
        if isinstance(current, dict) and isinstance(value, dict):  # maps merge into their defaults
            setattr(base, key, {**current, **_coerce(value, hints[key], f"{prefix}{key}")})
        elif dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise DfkdError(f"{prefix}{key}: expected a mapping of settings, got {value!r}")
            _build(current, value, prefix=f"{prefix}{key}.")
        else:
            setattr(base, key, _coerce(value, hints[key], f"{prefix}{key}"))
    return base


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DfkdError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value); the value is read as a YAML scalar (`3`, `1e-3`, `true`, `null`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise DfkdError(f"bad override {text!r}; write it as section.key=value")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as err:
        raise DfkdError(f"bad override {text!r}: {err.__class__.__name__}") from None
    # "1e-3" is a string to YAML 1.1; users mean a number.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DfkdError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise DfkdError(f"config file {str(path)!r} is not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise DfkdError(f"config file {str(path)!r} must hold a mapping of sections")
    for text in overrides:
        _set_dotted(data, *parse_override(text))
    return config_from_dict(data)


def config_from_dict(data: dict) -> ExperimentConfig:
    return _build(ExperimentConfig(), data).validate()


def config_to_dict(config: ExperimentConfig) -> dict:
    return dataclasses.asdict(config)


def with_settings(config: ExperimentConfig, settings: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of `config` with dotted keys set: {"perf.compile": True}."""
    data = config_to_dict(config)
    for dotted, value in settings.items():
        _set_dotted(data, dotted, value)
    return config_from_dict(data)
