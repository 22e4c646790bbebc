"""dfkd: data-free adversarial knowledge distillation."""

__version__ = "0.1.0"
