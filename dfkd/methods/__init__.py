"""Objectives: named combinations of loss terms, registered in METHODS (see base.py)."""

from dfkd.methods import adversarial, gankd  # noqa: F401  (registration)
from dfkd.methods.base import METHODS, Method, Setting, build_method

__all__ = ["METHODS", "Method", "Setting", "build_method"]
