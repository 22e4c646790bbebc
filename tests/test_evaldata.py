"""Labelled evaluation data from folders, files and arrays, at the teacher's input spec."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dfkd.data import MNIST_INFO, to_model_input
from dfkd.errors import DfkdError
from dfkd.evaldata import load_labelled
from dfkd.spec import InputSpec

GRAY = InputSpec(1, 32, 3, (0.5,), (0.25,))
RGB = InputSpec(3, 16, 3, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def pixels(n, h, w, c=None, seed=0):
    shape = (n, h, w) if c is None else (n, h, w, c)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_folder(root, classes, channels=1, per_class=2, size=20):
    """An ImageFolder tree of PNGs; returns {class: [uint8 H×W(×C) arrays in file order]}."""
    written = {}
    for i, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        images = pixels(per_class, size, size, None if channels == 1 else channels, seed=i)
        for j, img in enumerate(images):
            Image.fromarray(img, mode="L" if channels == 1 else "RGB").save(root / name / f"{j}.png")
        written[name] = images
    return written


def expected(raw_nhwc_or_nhw, spec):
    """What dfkd.data.to_model_input makes of the same uint8 images, at the spec's normalization."""
    x = torch.from_numpy(raw_nhwc_or_nhw).float().div(255)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False, antialias=True)
    return spec.normalize(x)


def test_image_folder_sorted_classes_resized_and_normalized(tmp_path):
    written = write_folder(tmp_path, ["b_two", "a_one", "c_three"])
    split = load_labelled(tmp_path, GRAY)
    assert split.images.shape == (6, 1, 32, 32) and split.images.dtype == torch.float32
    assert split.labels.dtype == torch.int64
    assert split.labels.tolist() == [0, 0, 1, 1, 2, 2]  # folders in sorted order: a_one, b_two, c_three
    want = expected(np.concatenate([written[c] for c in ["a_one", "b_two", "c_three"]]), GRAY)
    torch.testing.assert_close(split.images, want, atol=1e-5, rtol=0)


def test_image_folder_rgb_and_a_class_mapping_with_a_subset_of_folders(tmp_path):
    written = write_folder(tmp_path, ["dog", "cat"], channels=3)
    split = load_labelled(tmp_path, RGB, classes=["plane", "dog", "cat"])
    assert split.images.shape == (4, 3, 16, 16)
    assert split.labels.tolist() == [2, 2, 1, 1]  # cat (sorted first) is the teacher's class 2
    torch.testing.assert_close(
        split.images, expected(np.concatenate([written["cat"], written["dog"]]), RGB), atol=1e-5, rtol=0
    )


def test_jpeg_files_of_any_suffix_case_and_other_files_ignored(tmp_path):
    for i, name in enumerate(["a", "b", "c"]):
        (tmp_path / name).mkdir()
        Image.fromarray(pixels(1, 40, 30, seed=i)[0], mode="L").save(tmp_path / name / "x.JPG", quality=95)
        (tmp_path / name / "README.txt").write_text("not an image")
    split = load_labelled(tmp_path, GRAY)
    assert split.images.shape == (3, 1, 32, 32) and split.labels.tolist() == [0, 1, 2]


def test_npz_uint8_nhwc(tmp_path):
    raw, labels = pixels(5, 8, 8, 3), np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "eval.npz", images=raw, labels=labels)
    split = load_labelled(tmp_path / "eval.npz", RGB)
    assert split.images.shape == (5, 3, 16, 16) and split.labels.tolist() == labels.tolist()
    torch.testing.assert_close(split.images, expected(raw, RGB), atol=1e-5, rtol=0)


def test_pt_float_nchw_matches_uint8(tmp_path):
    raw = pixels(4, 32, 32)
    floats = torch.from_numpy(raw).float().div(255).unsqueeze(1)  # N×1×H×W in [0, 1]
    torch.save({"images": floats, "labels": torch.tensor([0, 1, 2, 0])}, tmp_path / "eval.pt")
    split = load_labelled(tmp_path / "eval.pt", GRAY)
    assert split.images.shape == (4, 1, 32, 32) and split.labels.dtype == torch.int64
    torch.testing.assert_close(split.images, expected(raw, GRAY), atol=1e-5, rtol=0)


def test_tuple_of_arrays_nhw_resized_like_the_dataset_loader():
    raw = pixels(3, 28, 28)
    mnist = InputSpec(1, 32, 10, MNIST_INFO.mean, MNIST_INFO.std)
    split = load_labelled((raw, np.array([7, 0, 9])), mnist)
    torch.testing.assert_close(split.images, to_model_input(raw, MNIST_INFO, 32), atol=1e-5, rtol=0)
    assert split.labels.tolist() == [7, 0, 9]


def test_tuple_of_tensors():
    images = torch.rand(2, 3, 16, 16)
    split = load_labelled((images, torch.tensor([1, 2], dtype=torch.int32)), RGB)
    torch.testing.assert_close(split.images, RGB.normalize(images))
    assert split.labels.dtype == torch.int64


def _folder(root, names, channels=1):
    write_folder(root, names, channels=channels, per_class=1, size=8)
    return root


def _npz(root, **arrays):
    np.savez(root / "x.npz", **arrays)
    return root / "x.npz"


def _pt(root, obj):
    torch.save(obj, root / "x.pt")
    return root / "x.pt"


def _file(root, name, data: bytes):
    (root / name).write_bytes(data)
    return root / name


def _class_without_images(root):
    _folder(root, ["a", "c"])
    (root / "b").mkdir()
    _file(root / "b", "notes.txt", b"not an image")
    return root


def _corrupt_png(root):
    _file(_folder(root, ["a", "b", "c"]) / "a", "0.png", b"junk")
    return root


def _labelled(images, labels):
    return lambda d: _npz(d, images=images, labels=np.array(labels))


# One row per kind of bad evaluation data: (make the source in tmp_path, kwargs, message fragment).
BAD = {
    "missing path": (lambda d: d / "nope", {}, "not found; give an ImageFolder folder or an .npz/.pt file"),
    "empty folder": (lambda d: d, {}, "has no class folders; lay it out as"),
    "class folder without images": (_class_without_images, {}, "holds no PNG or JPEG images"),
    "class count mismatch": (
        lambda d: _folder(d, ["a", "b"]),
        {},
        "has 2 class folders but the teacher has 3 classes: give eval.classes",
    ),
    "folder not in classes": (
        lambda d: _folder(d, ["a", "z"]),
        {"classes": ["a", "b", "c"]},
        "is not a class in eval.classes (a, b, c)",
    ),
    "classes of another length": (
        lambda d: _folder(d, ["a"]),
        {"classes": ["a", "b"]},
        "eval.classes names 2 classes but the teacher has 3",
    ),
    "rgb pngs for a gray teacher": (
        lambda d: _folder(d, ["a", "b", "c"], channels=3),
        {},
        "(RGB) has 3 channel(s) but the teacher takes 1; convert the images to grayscale",
    ),
    "rgb array for a gray teacher": (
        _labelled(pixels(2, 8, 8, 3), [0, 1]),
        {},
        "images have 3 channel(s) but the teacher takes 1",
    ),
    "corrupt png": (_corrupt_png, {}, "is unreadable or corrupt"),
    "label out of range": (
        _labelled(pixels(2, 8, 8), [0, 3]),
        {},
        "label 3 is out of range for a teacher with 3 classes",
    ),
    "negative label": (_labelled(pixels(2, 8, 8), [-1, 0]), {}, "label -1 is out of range"),
    "float labels": (
        _labelled(pixels(2, 8, 8), [0.0, 1.0]),
        {},
        "labels must be integer class indices, got dtype float64",
    ),
    "no images key": (
        lambda d: _npz(d, x=pixels(2, 8, 8), labels=np.array([0, 1])),
        {},
        "has no 'images' (found: labels, x); store the arrays under 'images' and 'labels'",
    ),
    "no labels key": (lambda d: _pt(d, {"images": torch.rand(2, 1, 8, 8)}), {}, "has no 'labels'"),
    "pt not a dict": (lambda d: _pt(d, [torch.rand(2, 1, 8, 8)]), {}, "holds a list, not a dict"),
    "junk pt": (lambda d: _file(d, "x.pt", b"junk"), {}, "is not a readable tensor file"),
    "junk npz": (lambda d: _file(d, "x.npz", b"junk"), {}, "is not a readable .npz"),
    "other suffix": (lambda d: _file(d, "x.csv", b"1,2"), {}, "is neither .npz nor .pt"),
    "mismatched lengths": (_labelled(pixels(3, 8, 8), [0, 1]), {}, "has 3 images but 2 labels"),
    "no images": (
        lambda d: _npz(d, images=np.zeros((0, 8, 8), np.uint8), labels=np.zeros(0, np.int64)),
        {},
        "holds no images",
    ),
    "normalized floats": (
        lambda d: _pt(d, {"images": torch.randn(2, 1, 8, 8) * 3, "labels": torch.arange(2)}),
        {},
        "not pixels in [0, 1]; give raw pixels",
    ),
    "images of another rank": (
        _labelled(pixels(2, 8, 8)[:, 0], [0, 1]),
        {},
        "expected N×C×H×W, N×H×W×C or N×H×W",
    ),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_eval_data_is_a_one_line_error(tmp_path, case):
    make, kwargs, message = BAD[case]
    source = make(tmp_path)
    with pytest.raises(DfkdError) as err:
        load_labelled(source, GRAY, **kwargs)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_tuple_of_the_wrong_length():
    with pytest.raises(DfkdError, match=r"must be \(images, labels\)"):
        load_labelled((np.zeros((1, 8, 8)),), GRAY)
