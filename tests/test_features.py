"""Feature terms and the hooks that read layers."""
import numpy as np
import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.features import capture, layer_shapes
from dfkd.losses import FEATURE_LOSSES
from dfkd.models import build_classifier


def golden_attention_transfer(s, t):
    """Written out with numpy: channel mean of squares, average-pooled to the smaller map, L2-normalized."""
    def amap(f, size):
        a = (f**2).mean(axis=1)  # (B, H, W)
        k = a.shape[-1] // size
        a = a.reshape(a.shape[0], size, k, size, k).mean(axis=(2, 4))
        a = a.reshape(a.shape[0], -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    size = min(s.shape[-1], t.shape[-1])
    return ((amap(s, size) - amap(t, size)) ** 2).mean()


def test_attention_transfer_golden_values():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 4, 8, 8)), rng.normal(size=(3, 6, 4, 4))
    got = FEATURE_LOSSES.get("at")(torch.tensor(s), torch.tensor(t))
    assert got.item() == pytest.approx(golden_attention_transfer(s, t), rel=1e-10)
    assert FEATURE_LOSSES.get("at")(torch.tensor(t), torch.tensor(t)).item() == 0.0


def test_attention_transfer_is_differentiable_in_both_features():
    s = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(FEATURE_LOSSES.get("at"), (s, t))


def test_capture_reads_layers_and_leaves_no_hook():
    model = build_classifier("lenet5", 1, 10, 32)
    with capture(model, ["features.2", "features.5"]) as feats:
        model(torch.randn(2, 1, 32, 32))
    assert feats["features.2"].shape == (2, 6, 14, 14) and feats["features.5"].shape == (2, 16, 5, 5)
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(DfkdError, match="model has no layer 'features.9'"):
        with capture(model, ["features.9"]):
            pass


def test_layer_shapes_lists_paths_for_the_config():
    rows = layer_shapes(build_classifier("resnet8", 1, 10, 32), (1, 32, 32))
    shapes = {path: shape for path, _, shape in rows}
    assert shapes["layers.0"] == (16, 32, 32) and shapes["layers.2"] == (64, 8, 8) and shapes["fc"] == (10,)
