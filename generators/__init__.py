"""Generator architectures, registered by name in GENERATORS.

A generator maps a latent batch (N×latent_dim) to images in the teacher's normalized input space.
Factories take (latent_dim, width, channels, image_size, pixel_stats): pixel_stats, the data's
(mean, std) or None, picks the output layer after the final tanh (generators.registry.output_layer).
"""

from generators import dcgan, dfad  # noqa: F401  (registration)
from generators.registry import GENERATORS, build_generator

__all__ = ["GENERATORS", "build_generator"]
