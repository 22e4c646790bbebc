"""Discriminator architectures (over logits or features), registered by name in DISCRIMINATORS.

The GAN-KD variant that uses them is built on this registry; none is registered yet.
"""
from dfkd.registry import Registry

DISCRIMINATORS: Registry = Registry("discriminator")

__all__ = ["DISCRIMINATORS"]
