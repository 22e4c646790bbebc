"""Labelled real images to evaluate on: an ImageFolder tree, an .npz / .pt file, or arrays in memory.

Every source becomes a `Split` at the teacher's input spec. Nothing is converted behind the user's
back: images with another channel count than the teacher takes, or float images that are not
pixels in [0, 1], are errors that say how to fix them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.data import Split
from dfkd.errors import DfkdError
from dfkd.spec import InputSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL modes read as they are, by channel count; other modes are refused rather than guessed at.
PIL_CHANNELS = {"1": 1, "L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
PIXEL_SLACK = 1e-3  # float pixels may stray this far outside [0, 1] (rounding in the writer's code)


def load_labelled(source: str | Path | tuple, spec: InputSpec, classes: Sequence[str] | None = None) -> Split:
    """Images and int64 labels from `source`, resized to spec.size and normalized with spec.mean/std.

    `source`: a folder with one sub-folder of PNG/JPEG images per class (torchvision's ImageFolder
    layout; folders are classes in sorted order unless `classes`, the class names in the teacher's
    order, maps them), an .npz or .pt file holding `images` and `labels`, or an (images, labels)
    pair of arrays or tensors. Images are uint8 (0..255) or float (0..1), N×C×H×W, N×H×W×C or N×H×W.
    """
    if isinstance(source, tuple):
        if len(source) != 2:
            raise DfkdError(f"eval data as a tuple must be (images, labels), got {len(source)} items")
        return _from_arrays(source[0], source[1], spec, "the given eval images")
    path = Path(source).expanduser()
    if not path.exists():
        raise DfkdError(f"eval data {str(path)!r} not found; give an ImageFolder folder or an .npz/.pt file")
    if path.is_dir():
        return _from_folder(path, spec, classes)
    images, labels = _read_file(path)
    return _from_arrays(images, labels, spec, f"eval file {str(path)!r}")


# --- files -----------------------------------------------------------------------------------------


def _read_file(path: Path) -> tuple:
    if path.suffix == ".npz":
        return _read_npz(path)
    if path.suffix == ".pt":
        return _read_pt(path)
    raise DfkdError(
        f"eval file {str(path)!r} is neither .npz nor .pt; save `images` and `labels` in one of those"
    )


def _read_npz(path: Path) -> tuple:
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            _require_keys(path, keys)
            return data["images"], data["labels"]
    except DfkdError:
        raise
    except Exception as err:  # not a zip, truncated, or object arrays (pickles)
        raise DfkdError(
            f"eval file {str(path)!r} is not a readable .npz of plain arrays ({type(err).__name__})"
        ) from None


def _read_pt(path: Path) -> tuple:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # junk, truncated, or pickled objects beyond tensors
        raise DfkdError(
            f"eval file {str(path)!r} is not a readable tensor file ({type(err).__name__}); "
            "save a dict of tensors: torch.save({'images': x, 'labels': y}, path)",
        ) from None
    if not isinstance(data, dict):
        raise DfkdError(
            f"eval file {str(path)!r} holds a {type(data).__name__}, not a dict with 'images' and 'labels'"
        )
    _require_keys(path, set(data))
    return data["images"], data["labels"]


def _require_keys(path: Path, keys: set) -> None:
    missing = [k for k in ("images", "labels") if k not in keys]
    if missing:
        found = ", ".join(sorted(map(str, keys))) or "nothing"
        raise DfkdError(
            f"eval file {str(path)!r} has no {' or '.join(repr(k) for k in missing)} "
            f"(found: {found}); store the arrays under 'images' and 'labels'"
        )


# --- arrays ----------------------------------------------------------------------------------------


def _from_arrays(images, labels, spec: InputSpec, what: str) -> Split:
    x = _as_tensor(images, what, "images")
    y = _labels(labels, what)
    if x.ndim not in (3, 4):
        raise DfkdError(f"{what}: images have shape {tuple(x.shape)}; expected N×C×H×W, N×H×W×C or N×H×W")
    if len(x) != len(y):
        raise DfkdError(f"{what} has {len(x)} images but {len(y)} labels; give one label per image")
    if len(x) == 0:
        raise DfkdError(f"{what} holds no images")
    _check_label_range(y, spec, what)
    pixels = _to_pixels(_channels_first(x, spec, what), what)
    return Split(spec.normalize(_resize(pixels, spec.size)).contiguous(), y)


def _as_tensor(value, what: str, name: str) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.detach().cpu()
    try:
        return torch.from_numpy(np.ascontiguousarray(value))
    except (TypeError, ValueError):
        raise DfkdError(
            f"{what}: {name} must be a numeric array or tensor, got {type(value).__name__}"
        ) from None


def _labels(value, what: str) -> torch.Tensor:
    y = _as_tensor(value, what, "labels")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise DfkdError(f"{what}: labels must be integer class indices, got dtype {_dtype(y)}")
    if y.ndim != 1:
        raise DfkdError(
            f"{what}: labels must be one class index per image (shape N), got shape {tuple(y.shape)}"
        )
    return y.to(torch.int64)


def _check_label_range(y: torch.Tensor, spec: InputSpec, what: str) -> None:
    bad = (y < 0) | (y >= spec.num_classes)
    if bad.any():
        raise DfkdError(
            f"{what}: label {int(y[bad][0])} is out of range for a teacher with "
            f"{spec.num_classes} classes; labels must be class indices "
            f"0..{spec.num_classes - 1}"
        )


def _channels_first(x: torch.Tensor, spec: InputSpec, what: str) -> torch.Tensor:
    """N×H×W -> N×1×H×W; N×H×W×C -> N×C×H×W, where the spec's channel count says which axis is which."""
    if x.ndim == 3:
        found = 1
        x = x.unsqueeze(1)
    elif x.shape[1] == spec.channels:
        return x
    elif x.shape[-1] == spec.channels:
        return x.permute(0, 3, 1, 2)
    else:  # neither axis fits: report the axis that looks like channels
        found = x.shape[1] if x.shape[1] <= 4 or x.shape[1] < x.shape[-1] else x.shape[-1]
    if found != spec.channels:
        raise DfkdError(_channel_message(f"{what}: images have", found, spec.channels))
    return x


def _channel_message(subject: str, found: int, wanted: int) -> str:
    fix = "convert the images to grayscale" if wanted == 1 else f"give {wanted}-channel images"
    return (
        f"{subject} {found} channel(s) but the teacher takes {wanted}; {fix} "
        "(dfkd does not convert them for you)"
    )


def _to_pixels(x: torch.Tensor, what: str) -> torch.Tensor:
    """uint8 0..255 or float 0..1 -> float32 0..1."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if x.is_floating_point():
        lo, hi = float(x.min()), float(x.max())
        if lo < -PIXEL_SLACK or hi > 1 + PIXEL_SLACK:
            raise DfkdError(
                f"{what}: float images hold values in [{lo:.3g}, {hi:.3g}], not pixels in "
                "[0, 1]; give raw pixels (uint8 0..255 or float 0..1), not normalized "
                "images"
            )
        return x.float().clamp_(0.0, 1.0)
    raise DfkdError(f"{what}: images have dtype {_dtype(x)}; give uint8 (0..255) or float (0..1) pixels")


def _dtype(x: torch.Tensor) -> str:
    return str(x.dtype).replace("torch.", "")


def _resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """As dfkd.data.to_model_input resizes: bilinear with antialiasing, to size × size."""
    if tuple(pixels.shape[-2:]) == (size, size):
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# --- image folders ---------------------------------------------------------------------------------


def _from_folder(root: Path, spec: InputSpec, classes: Sequence[str] | None) -> Split:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DfkdError(
            f"eval folder {str(root)!r} has no class folders; lay it out as "
            f"{root}/<class>/<image>.png (one sub-folder per class)"
        )
    index = _class_index(root, [f.name for f in folders], spec, classes)
    images, labels = [], []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DfkdError(
                f"eval class folder {str(folder)!r} holds no PNG or JPEG images; add images or remove it"
            )
        for file in files:
            images.append(_resize(_to_pixels(_read_image(file, spec), f"image {str(file)!r}"), spec.size))
        labels += [index[folder.name]] * len(files)
    return Split(spec.normalize(torch.cat(images)).contiguous(), torch.tensor(labels, dtype=torch.int64))


def _class_index(
    root: Path, names: list[str], spec: InputSpec, classes: Sequence[str] | None
) -> dict[str, int]:
    if not classes:
        if len(names) != spec.num_classes:
            raise DfkdError(
                f"eval folder {str(root)!r} has {len(names)} class folders but the teacher has "
                f"{spec.num_classes} classes: give eval.classes (the class names in the "
                "teacher's order) to map the folders to the teacher's classes"
            )
        return {name: i for i, name in enumerate(names)}
    classes = list(classes)
    if len(classes) != spec.num_classes:
        raise DfkdError(
            f"eval.classes names {len(classes)} classes but the teacher has {spec.num_classes}; "
            "list every class name in the teacher's order"
        )
    if len(set(classes)) != len(classes):
        twice = next(c for c in classes if classes.count(c) > 1)
        raise DfkdError(
            f"eval.classes names {twice!r} twice; list each class name once, in the teacher's order"
        )
    for name in names:
        if name not in classes:
            raise DfkdError(
                f"eval folder {str(root / name)!r} is not a class in eval.classes "
                f"({', '.join(classes)}); rename or remove the folder, or add it to "
                "eval.classes"
            )
    return {name: classes.index(name) for name in names}


def _read_image(file: Path, spec: InputSpec) -> torch.Tensor:
    """One image as a 1×C×H×W uint8 tensor; its channel count must be the teacher's."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            mode = img.mode
            if mode not in PIL_CHANNELS:
                raise DfkdError(f"image {str(file)!r} has PIL mode {mode!r}; save it as grayscale (L) or RGB")
            found = PIL_CHANNELS[mode]
            if found != spec.channels:
                raise DfkdError(_channel_message(f"image {str(file)!r} ({mode}) has", found, spec.channels))
            array = np.asarray(img.convert("L") if mode == "1" else img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise DfkdError(
            f"image {str(file)!r} is unreadable or corrupt ({type(err).__name__}); replace or remove it"
        ) from None
    x = torch.from_numpy(array.copy())
    return (x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)).unsqueeze(0)
