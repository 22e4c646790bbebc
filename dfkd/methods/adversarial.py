"""The DFAD / ZSKT game: the generator maximizes a discrepancy that the student minimizes, with
optional generator priors (DAFL, DeepInversion, DFQ) and feature terms for the student (ZSKT)."""

from __future__ import annotations

import torch
import torch.nn as nn

from dfkd.augment import box_blur, random_resized_crop
from dfkd.config import MethodConfig
from dfkd.contrast import InstanceContrast, instance_features
from dfkd.errors import DfkdError
from dfkd.features import Adapter, batchnorm_layers, capture, find_layers
from dfkd.losses import FEATURE_LOSSES, LOSSES, PRIOR_TAPS, PRIORS
from dfkd.methods.base import METHODS, Method, Setting


@METHODS.register("adversarial")
class Adversarial(Method):
    def __init__(self, cfg: MethodConfig):
        super().__init__(cfg)
        self.discrepancy = LOSSES.get(cfg.loss)
        self.temperature = cfg.temperature
        self.adversarial_weight = cfg.adversarial_weight
        self.priors = {name: (PRIORS.get(name), weight) for name, weight in cfg.generator_priors.items()}
        self.feature_loss = FEATURE_LOSSES.get(cfg.feature_loss)
        self.feature_weight = cfg.feature_weight
        self.feature_adapters = nn.ModuleList()
        self.contrast: InstanceContrast | None = None
        self.rng: torch.Generator | None = None

    @property
    def prior_taps(self) -> set[str]:
        return {PRIOR_TAPS[name] for name in self.priors if name in PRIOR_TAPS}

    @property
    def taps(self) -> set[str]:
        """The priors' taps, and the BatchNorm inputs the contrastive term describes images by."""
        return self.prior_taps | {"bn_inputs"} if self.cfg.contrast > 0 else self.prior_taps

    @property
    def layer_pairs(self) -> list[list[str]]:
        return list(self.cfg.features)

    # ---- building and checking ------------------------------------------------------------
    def prepare(self, setting: Setting) -> None:
        self.check_prior_taps(setting)
        self.check_feature_layers(setting)
        self.build_discriminator(setting)
        self.build_feature_adapters(setting)
        self.build_contrast(setting)

    def prior_key(self, name: str) -> str:
        """The setting that asks for prior `name`: method.extra_priors.NAME or method.priors.NAME."""
        return f"method.{'extra_priors' if name in self.cfg.extra_priors else 'priors'}.{name}"

    def check_prior_taps(self, setting: Setting) -> None:
        archs = ", ".join(setting.teacher_archs)
        prior_taps = self.prior_taps
        if "bn_inputs" in prior_taps and not any(batchnorm_layers(m) for m in setting.teachers):
            name = next(n for n in self.priors if PRIOR_TAPS.get(n) == "bn_inputs")
            raise DfkdError(
                f"{self.prior_key(name)} matches the teacher's BatchNorm statistics, but no teacher has "
                f"BatchNorm layers ({archs}); drop the {name} prior or use a teacher with BatchNorm"
            )
        if "activation" in prior_taps:
            layer = self.cfg.activation_layer
            if not layer:
                raise DfkdError(
                    f"{self.prior_key('activation')} reads a teacher layer: set method.activation_layer "
                    "(the penultimate one in DAFL; dfkd layers ARCH lists them)"
                )
            setting.need_one_teacher_per_iteration(self.prior_key("activation"))
            for model, arch in zip(setting.teachers, setting.teacher_archs):
                find_layers(model, [layer], f"teacher {arch}")

    def check_feature_layers(self, setting: Setting) -> None:
        pairs = self.layer_pairs
        if not pairs:
            return
        setting.need_one_teacher_per_iteration("feature layers")
        find_layers(setting.student, [s for s, _ in pairs], f"student {setting.student_arch}")
        for i in setting.feature_sources:
            find_layers(setting.teachers[i], [t for _, t in pairs], f"teacher {setting.teacher_archs[i]}")

    def build_contrast(self, setting: Setting) -> None:
        """CMI's head and memory bank (dfkd.contrast), trained with the generator."""
        if self.cfg.contrast <= 0:
            return
        widths = {
            sum(m.num_features for m in batchnorm_layers(teacher).values()) for teacher in setting.teachers
        }
        if 0 in widths:
            raise DfkdError(
                "method.contrast compares the teacher's BatchNorm inputs, but a teacher has no "
                f"BatchNorm layers ({', '.join(setting.teacher_archs)}); set method.contrast=0 "
                "or use a BatchNorm teacher"
            )
        if len(widths) > 1:
            raise DfkdError(
                "method.contrast needs one feature width across the pool; the teachers' BatchNorm "
                f"layers have {sorted(widths)} channels in all: distil from one teacher or set "
                "method.contrast=0"
            )
        m = self.cfg
        contrast = InstanceContrast(widths.pop(), m.contrast_bank, m.contrast_temperature)
        self.contrast = contrast.to(setting.device)
        self.generator_modules = [self.contrast]
        self.rng = setting.rng or torch.Generator().manual_seed(0)

    def build_discriminator(self, setting: Setting) -> None:
        """Methods with a discriminator build it here, before the feature adapters."""

    def build_feature_adapters(self, setting: Setting) -> None:
        """One adapter per method.features pair, for terms that compare same-shaped features
        (an identity where the shapes already match)."""
        term, features = self.feature_loss, self.cfg.features
        shapes = [setting.pair_shapes(s, t) for s, t in features]
        for (s, t), (a, b) in zip(features, shapes):
            if getattr(term, "needs_maps", False) and (len(a) != 3 or len(b) != 3):
                raise DfkdError(
                    f"method.feature_loss={self.cfg.feature_loss} compares spatial maps, but {s!r} gives "
                    f"{a} and {t!r} gives {b}; pick convolutional layers (dfkd layers ARCH)"
                )
        if not getattr(term, "needs_adapter", False):
            self.feature_adapters = nn.ModuleList(nn.Identity() for _ in shapes)
        else:
            adapters = (nn.Identity() if a == b else Adapter(a, b) for a, b in shapes)
            self.feature_adapters = nn.ModuleList(adapters).to(setting.device)
        self.student_modules = [self.feature_adapters]

    # ---- forward passes and losses --------------------------------------------------------
    def teacher_forward(self, teacher: nn.Module, x: torch.Tensor, phase) -> tuple[torch.Tensor, dict]:
        """The teacher's logits, and what the generator's priors read inside it on the way."""
        wanted = self.taps
        bn_layers = batchnorm_layers(teacher) if "bn_inputs" in wanted else {}
        act = [self.cfg.activation_layer] if "activation" in wanted else []
        with (
            capture(teacher, list(bn_layers), inputs=True) as bn_in,
            capture(teacher, act) as acts,
            phase("teacher forward"),
        ):
            logits = teacher(x)
        taps = {}
        if bn_layers:
            taps["bn_inputs"] = [(bn_in[p], m.running_mean, m.running_var) for p, m in bn_layers.items()]
        if act:
            taps["activation"] = acts[act[0]]
        if "images" in wanted:
            taps["images"] = x
        if "blurred" in wanted:
            with phase("teacher forward"):
                taps["blurred"] = teacher(box_blur(x))
        if self.contrast is not None:
            local = random_resized_crop(x, self.cfg.contrast_crop, self.rng)
            with capture(teacher, list(bn_layers), inputs=True) as local_in, phase("teacher forward"):
                teacher(local)
            taps["views"] = (
                instance_features([local_in[p] for p in bn_layers]),
                instance_features([bn_in[p] for p in bn_layers]),
            )
        return logits, taps

    def feature_pairs(self, student_features: dict, teacher_features: dict) -> list[tuple]:
        """(adapted student feature, teacher feature) for each method.features pair."""
        pairs = zip(self.feature_adapters, self.cfg.features)
        return [(adapt(student_features[s]), teacher_features[t]) for adapt, (s, t) in pairs]

    def generator_losses(self, student_logits, teacher_logits, **taps) -> dict[str, torch.Tensor]:
        """Minus the discrepancy (the generator ascends it), plus the weighted priors."""
        if self.cfg.adversarial_agreed_only:
            student_logits, teacher_logits = agreed_rows(student_logits, teacher_logits)
        d = self.discrepancy(student_logits, teacher_logits, self.temperature)
        out = {"loss": -self.adversarial_weight * d, "discrepancy": d}
        for name, (prior, weight) in self.priors.items():
            out[f"prior_{name}"] = prior(teacher_logits, **taps)
            out["loss"] = out["loss"] + weight * out[f"prior_{name}"]
        if self.contrast is not None:
            local, whole = taps["views"]
            out["contrast"] = self.contrast.loss(local, whole)
            out["loss"] = out["loss"] + self.cfg.contrast * out["contrast"]
            self.contrast.remember(local, whole)  # after it is scored: a batch is not its own negative
        return out

    def student_losses(self, student_logits, teacher_logits, feature_pairs=(), d_fake=None):
        """The response term, plus `feature_weight` times the feature term summed over layer pairs."""
        d = self.discrepancy(student_logits, teacher_logits, self.temperature)
        if not feature_pairs:
            return {"loss": d}
        return self.with_features({"loss": d, "response": d}, feature_pairs)

    def with_features(self, out: dict[str, torch.Tensor], feature_pairs) -> dict[str, torch.Tensor]:
        if feature_pairs:
            out["feature"] = sum(self.feature_loss(s, t) for s, t in feature_pairs)
            out["loss"] = out["loss"] + self.feature_weight * out["feature"]
        return out


def agreed_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Both logit batches with the rows whose top classes differ set to zero: identical rows add
    nothing to any registered discrepancy and pass it no gradient, so its batch mean becomes the sum
    over the agreed rows over the batch size (no host sync to count them)."""
    agreed = (student_logits.argmax(1) == teacher_logits.argmax(1)).unsqueeze(1).to(student_logits.dtype)
    return student_logits * agreed, teacher_logits * agreed
