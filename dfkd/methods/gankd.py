"""GAN-KD without data: the generator plays the adversarial game; the student minimizes
CE(student, teacher argmax) + alpha · KL(teacher ‖ student) + beta · GAN loss, where a
discriminator tells teacher outputs (real) from student outputs (fake)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.config import MethodConfig
from dfkd.errors import DfkdError
from dfkd.features import Adapter
from dfkd.losses import GAN_LOSSES, kl
from dfkd.methods.adversarial import Adversarial
from dfkd.methods.base import METHODS, Setting
from discriminators import DISCRIMINATORS, build_discriminator


@METHODS.register("gankd")
class GanKD(Adversarial):
    def __init__(self, cfg: MethodConfig):
        super().__init__(cfg)
        self.alpha, self.beta = cfg.alpha, cfg.beta
        self.gan = GAN_LOSSES.get(cfg.gan_loss)()
        self.uses_discriminator = cfg.beta > 0
        self.discriminator_layers: list[str] = []
        self.discriminator_steps = 1
        self.adapter = None  # the student's feature adapter, when the discriminator reads features

    @property
    def layer_pairs(self) -> list[list[str]]:
        """The feature terms' pairs, then the discriminator's."""
        d = self.discriminator_layers if self.uses_discriminator else []
        return [*self.cfg.features, *([d] if d else [])]

    def prepare(self, setting: Setting) -> None:
        self.discriminator_layers = list(setting.discriminator.layers)
        self.discriminator_steps = setting.discriminator.steps
        super().prepare(setting)

    def build_discriminator(self, setting: Setting) -> None:
        """The discriminator (none with beta 0), and the student's feature adapter when the
        discriminator reads a student layer whose shape differs from the teacher's."""
        if not self.uses_discriminator:
            return
        d = setting.discriminator
        reads = DISCRIMINATORS.get(d.name).reads
        if reads == "features" and not d.layers:
            raise DfkdError(
                f"discriminator.name={d.name} reads feature maps: set discriminator.layers "
                "[student_layer, teacher_layer], or use discriminator.name=mlp on outputs"
            )
        if reads == "outputs" and d.layers:
            raise DfkdError(
                f"discriminator.name={d.name} reads class probabilities; for discriminator.layers "
                "use conv or feature_mlp"
            )
        if not d.layers:
            width = setting.spec.num_classes
        else:
            s_shape, t_shape = setting.pair_shapes(*d.layers)
            self.adapter = None if s_shape == t_shape else Adapter(s_shape, t_shape).to(setting.device)
            width = t_shape[0]
        self.discriminator = build_discriminator(d.name, width, d.width, d.spectral_norm).to(setting.device)

    def build_feature_adapters(self, setting: Setting) -> None:
        super().build_feature_adapters(setting)
        if self.adapter is not None:
            self.student_modules.append(self.adapter)

    def discriminator_views(self, logits, teacher_logits, fs, ft) -> tuple[torch.Tensor, torch.Tensor]:
        """What the discriminator compares: the teacher's (real) and the student's (fake)
        temperature-softened probabilities, or their feature maps at discriminator.layers."""
        if not self.discriminator_layers:
            tau = self.temperature
            return F.softmax(teacher_logits / tau, dim=1), F.softmax(logits / tau, dim=1)
        s_path, t_path = self.discriminator_layers
        return ft[t_path], fs[s_path] if self.adapter is None else self.adapter(fs[s_path])

    def student_losses(self, student_logits, teacher_logits, feature_pairs=(), d_fake=None):
        ce = F.cross_entropy(student_logits, teacher_logits.argmax(1))
        div = kl(student_logits, teacher_logits, self.temperature)
        out = {"loss": ce + self.alpha * div, "ce": ce, "kl": div}
        if d_fake is not None:
            out["gan"] = self.gan.student(d_fake)
            out["loss"] = out["loss"] + self.beta * out["gan"]
        return self.with_features(out, feature_pairs)

    def discriminator_losses(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> dict[str, torch.Tensor]:
        """The discriminator's loss, and its accuracy (a metric, no gradient) on both halves."""
        with torch.no_grad():
            t = self.gan.threshold
            acc = 0.5 * ((d_real > t).float().mean() + (d_fake <= t).float().mean())
        return {"loss": self.gan.discriminator(d_real, d_fake), "acc": acc}
