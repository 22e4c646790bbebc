"""Typed experiment configuration: dataclasses loaded from YAML, with dotted overrides.

Unknown keys and values of the wrong type are errors that name the key. YAML is read with
`yaml.safe_load`, which builds plain data and never executes code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    # Class-conditional latents (dfkd.latents): the first num_classes coordinates carry a one-hot
    # code of a drawn class, which the `target` prior asks the teacher to see.
    conditional: bool = False


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam only
    weight_decay: float = 0.0
    schedule: str = "cosine"  # constant | cosine
    # Iterations (a generator's: its turns) over which the rate rises linearly to the schedule's,
    # from 1/warmup of it; 0: none.
    warmup: int = 0
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
    # The generator ascends the discrepancy only on images whose top class the student and the
    # teacher agree on (CMI's and Fast-DFKD's mask): an image the student already gets wrong is
    # not pushed further from what the teacher reads. train/discrepancy then logs the masked term.
    adversarial_agreed_only: bool = False
    n_student_steps: int = 5
    n_generator_steps: int = 1
    # Generators that take turns, one an iteration, each with its own weights and optimizer: with a
    # replay memory the student learns from images of several generators' paths through the game.
    n_generators: int = 1
    # The generator step's own batch (and its teacher logits) serves all student steps of the
    # iteration instead of a fresh batch per step: no extra generator or teacher forward at all.
    reuse_samples: bool = True
    # Generator priors (dfkd.losses.PRIORS) and their weights, added to the generator's loss to keep
    # its samples where the teacher is confident and spread over all classes.
    priors: dict[str, float] = field(default_factory=dict)
    # Priors added to the game's own, name -> weight: to the recipe's when it adapts the game to the
    # teachers (priors given in `priors` replace the recipe's game), else to `priors`; a name the
    # game already weighs takes this weight.
    extra_priors: dict[str, float] = field(default_factory=dict)
    # With no priors and a plain generator given: fit the recipe to the teachers (dfkd.recipe; a
    # BatchNorm teacher gets Fast-DFKD's generator game in the settings nobody set: those outside
    # `given` that hold their default). The run prints what it changed; false plays the game
    # exactly as configured.
    adapt_to_teacher: bool = True
    activation_layer: str | None = None  # the teacher layer the `activation` prior reads
    # CMI's contrastive term for the generator (dfkd.contrast), weight `contrast` (0 disables it):
    # each image's teacher features under a random crop covering at least `contrast_crop` of it
    # must pick out its uncropped features among the batch and a bank of `contrast_bank` past
    # images, through a learned head at `contrast_temperature`. Needs a BatchNorm teacher.
    contrast: float = 0.0
    contrast_temperature: float = 0.1
    contrast_bank: int = 4096
    contrast_crop: float = 0.25
    # Fast-DFKD's meta-learned generator start (dfkd.meta): each iteration the generator starts
    # again from a learned initialisation, takes its n_generator_steps with a fresh optimizer, and
    # the initialisation then moves at generator_optim.lr x n_generator_steps by `fomaml` (the sum
    # of those steps' gradients, as in the published runs) or `reptile` (towards where the steps
    # ended). null: one live generator plays the whole game.
    meta_generator: str | None = None
    # Keep the last `replay_size` synthetic images with their teacher logits; student steps draw
    # their batches from this memory (it always holds the newest batch). 0 disables it.
    replay_size: int = 0
    # Each batch the memory stores gets a twin drawn with another pen: every image blended toward
    # its 3×3 grey dilation or erosion (thicker or thinner strokes) by a weight drawn within ±this,
    # labelled by the teacher (one teacher forward per iteration; the memory fills twice as fast).
    # A student taught by a generator's strokes alone reads real strokes of another width worse than
    # its teacher does. 0 stores no twin.
    replay_pen_width: float = 0.0
    # The twin's images also warped, each by its own smooth random displacement field (Simard et
    # al.'s elastic distortion: uniform noise blurred by a Gaussian of 4 pixels, times this many
    # pixels; 34 moves a pixel by about one): strokes wobble as another hand draws them. With
    # replay_pen_width 0 the twin is warped only. 0 leaves the twin's shapes as they are.
    replay_elastic: float = 0.0
    # DeepInversion's jitter: each image of a generator step is shifted by up to this many pixels
    # (its own offset) before the teacher and the student see it, so the generator is asked for
    # images whose class survives a small move. The replay memory keeps the shifted images.
    # 0 disables it.
    generator_shift: int = 0
    # Likewise after the shift, each image turned by up to `generator_rotate` degrees and scaled by
    # a factor within 1 ± `generator_scale` about its centre: the class must also survive a small
    # turn and change of size, as a handwritten digit's does. 0 disables each.
    generator_rotate: float = 0.0
    generator_scale: float = 0.0
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

    @property
    def generator_priors(self) -> dict[str, float]:
        """The priors the generator's loss weighs: `priors`, with `extra_priors` added."""
        return {**self.priors, **self.extra_priors}


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
    # Seconds of distilling (evaluations included, a teacher's training not) after which the run
    # ends at the next iteration boundary (under torchrun, the next log step), finished as if it had
    # reached `iterations`; 0: no limit. The learning-rate schedules still span `iterations`, so a
    # limit that cuts a run short leaves them mid-way: it guards a budget, it does not choose the
    # length.
    time_limit: float = 0.0
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
    # Collapse: more than `collapse_threshold` of a generator's batches in one teacher class, on
    # average, for `collapse_patience` log intervals in a row (fewer in a short run: at most a
    # quarter of its intervals, at least 2). Then `collapse_action`: `reinit` gives that generator
    # fresh weights and optimizer state (a collapsed generator rarely recovers by itself), `warn`
    # only warns. Both log health/collapse.
    collapse_threshold: float = 0.9
    collapse_patience: int = 5
    collapse_action: str = "reinit"


@dataclass
class PerfConfig:
    """Fast paths: how the same algorithm is executed. None changes what is computed beyond float
    rounding (bf16 aside), so a run may be resumed with other settings. A setting left unset (null)
    is chosen for the device at the start of the run (dfkd.perf.choose_perf; runs/RESULTS.md,
    "Fast defaults", has the measurements behind each choice); `dfkd bench` times each."""

    # NHWC memory layout for every network and synthetic batch: oneDNN (CPU) and cuDNN convolutions
    # run faster on it. Unset: on.
    channels_last: bool | None = None
    # torch.compile the networks. Unset: off (compiling takes tens of seconds before the first step).
    compile: bool | None = None
    # none | bf16: bfloat16 autocast of the forward passes (losses stay float32; it changes the
    # rounding). Unset: bf16 where the device has fast bfloat16 (AMX or AVX512-BF16 on a CPU, a GPU
    # that supports it), else none.
    autocast: str | None = None
    # Adam/SGD's fused kernels (one kernel per step for all parameters). Unset: on.
    fused_optimizers: bool | None = None


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
    discriminator_optim: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=2e-4, betas=[0.5, 0.999])
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # The dotted settings an experiment file, the command line or `with_settings` set, recorded by
    # the loader, so that a value given at its default is kept by the recipe (dfkd.recipe). Not part
    # of what the config says: two configs that differ only here are equal.
    given: list[str] = field(default_factory=list, compare=False)

    def validate(self) -> ExperimentConfig:
        """Every value in range, every name known; the first one that is not is an error naming its key."""
        from dfkd.config_checks import check

        check(self)
        return self

    @property
    def teacher_recipes(self) -> list[TeacherConfig]:
        """The teachers of this run: the `teachers` pool, or the single `teacher`."""
        return self.teachers or [self.teacher]


# Reading and writing configs (kept in dfkd.configfile, re-exported here: one import for users).
from dfkd.configfile import (  # noqa: E402
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    with_settings,
)

__all__ = [
    "ExperimentConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "with_settings",
]
