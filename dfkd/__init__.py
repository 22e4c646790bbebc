"""dfkd: data-free adversarial knowledge distillation.

import dfkd
result = dfkd.distill(teacher, student="lenet5_half", input=dfkd.InputSpec(1, 32, 10, (0.5,), (0.5,)))
"""

__version__ = "0.1.0"

from dfkd.api import DistillResult, distill  # noqa: E402
from dfkd.spec import InputSpec  # noqa: E402


def load_student(path, arch=None):
    """A distilled student (student.pt, or a run directory holding one) and its InputSpec; `arch`
    names a student of your own code (dfkd runs no code a file's meta names)."""
    from dfkd.export import load_student as load

    return load(path, arch)


def export_student(source, fmt: str, out=None, overwrite: bool = False, arch=None):
    """Write a deployable student (torchscript | onnx | exported | state_dict), verified; its path.
    An existing file is replaced only with `overwrite`; `arch` names a student of your own code."""
    from dfkd.export import export_student as export

    return export(source, fmt, out, overwrite=overwrite, arch=arch)


__all__ = ["DistillResult", "InputSpec", "distill", "export_student", "load_student", "__version__"]
