"""Discriminator architectures for the GAN-KD variant, registered by name in DISCRIMINATORS.

`mlp` reads class probabilities; `conv` and `feature_mlp` read the feature map of a named layer,
the student's passing through a `dfkd.features.Adapter` when its shape differs from the teacher's.
"""

from discriminators import heads  # noqa: F401  (registration)
from discriminators.registry import DISCRIMINATORS, build_discriminator

__all__ = ["DISCRIMINATORS", "build_discriminator"]
