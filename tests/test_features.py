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


def huber(a, b):
    d = np.abs(a - b)
    return np.where(d < 1, 0.5 * d**2, d - 0.5).mean()


def golden_rkd_distance(s, t):
    def normalized(x):
        flat = x.reshape(len(x), -1)
        d = np.array([[np.linalg.norm(a - b) for b in flat] for a in flat])
        return d / (d.sum() / (len(x) * (len(x) - 1)))

    return huber(normalized(s), normalized(t))


def golden_rkd_angle(s, t):
    def cosines(x):
        flat = x.reshape(len(x), -1)
        out = []
        for j in range(len(flat)):
            for i in range(len(flat)):
                for k in range(len(flat)):
                    u, v = flat[i] - flat[j], flat[k] - flat[j]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out.append(0.0 if nu == 0 or nv == 0 else (u @ v) / (nu * nv))
        return np.array(out)

    return huber(cosines(s), cosines(t))


def golden_gram(s, t):
    def matrices(x):
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        return np.stack([f @ f.T / f.shape[1] for f in flat])

    return ((matrices(s) - matrices(t)) ** 2).sum(axis=(1, 2)).mean()


GOLDEN = {
    "hint": (lambda s, t: ((s - t) ** 2).mean(), (4, 3, 5, 5), (4, 3, 5, 5)),
    "rkd_distance": (golden_rkd_distance, (5, 3, 4, 4), (5, 6, 2, 2)),
    "rkd_angle": (golden_rkd_angle, (4, 3, 2, 2), (4, 7)),
    "gram": (golden_gram, (3, 4, 5, 5), (3, 4, 2, 2)),
}


@pytest.mark.parametrize("name", GOLDEN)
def test_feature_term_golden_values_and_gradients(name):
    golden, s_shape, t_shape = GOLDEN[name]
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=s_shape), rng.normal(size=t_shape)
    term = FEATURE_LOSSES.get(name)
    assert term(torch.tensor(s), torch.tensor(t)).item() == pytest.approx(golden(s, t), rel=1e-9)
    st, tt = (torch.tensor(a, requires_grad=True) for a in (s, t))
    assert torch.autograd.gradcheck(term, (st, tt))


def test_every_registered_feature_term_has_a_golden_test():
    assert set(FEATURE_LOSSES.names()) == {"at", *GOLDEN}


@pytest.mark.parametrize("loss", ["hint", "gram", "rkd_angle"])
def test_feature_terms_train_in_a_run_with_adapters_where_needed(tiny, tmp_path, run_of, loss):
    # lenet5_half has half the teacher's channels at both layers: shapes differ
    cfg = tiny(
        method={
            "features": [["features.5", "features.5"], ["classifier.1", "classifier.1"]],
            "feature_loss": loss,
            "feature_weight": 1.0,
        }
    )
    run = run_of(cfg, tmp_path)
    game = run.game
    adapters = game.method.feature_adapters
    assert [type(a).__name__ for a in adapters] == (
        ["Adapter", "Adapter"] if loss in ("hint", "gram") else ["Identity", "Identity"]
    )
    x, t = game.synthesize()
    losses, _ = game.student_step(x, t)
    assert losses["feature"] > 0
    if loss in ("hint", "gram"):
        trained = {id(p) for p in game.student_player.params}
        params = list(adapters.parameters())
        assert params and all(id(p) in trained for p in params), "the student's optimizer trains the adapters"
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    else:
        assert not list(adapters.parameters())
    assert run.fit()["iterations"] == 4


def test_the_feature_term_alone_trains_the_adapters_and_the_student_not_the_generator(tiny, tmp_path, run_of):
    pairs = [["features.5", "features.5"], ["classifier.1", "classifier.1"]]
    method = {"features": pairs, "feature_loss": "hint", "feature_weight": 1.0}
    game = run_of(tiny(method=method), tmp_path).game
    x, teacher_logits = game.synthesize()
    with capture(game.student, [s for s, _ in pairs]) as fs:
        logits = game.student_player.forward(x)
    with torch.no_grad(), capture(game.teacher, [t for _, t in pairs]) as ft:
        game.teacher(x)
    feature = game.method.student_losses(logits, teacher_logits, game.method.feature_pairs(fs, ft))["feature"]

    def reached(params):
        found = torch.autograd.grad(feature, list(params), retain_graph=True, allow_unused=True)
        return [g is not None and bool(g.abs().sum() > 0) for g in found]

    assert all(reached(game.method.feature_adapters.parameters()))
    assert any(reached(game.student.parameters()))
    assert not any(reached(game.generator.parameters()))


def test_attention_transfer_refuses_flat_layers(tiny, tmp_path, run_of):
    message = r"feature_loss=at compares spatial maps, but 'classifier.1' gives \(42,\)"
    with pytest.raises(DfkdError, match=message):
        run_of(tiny(method={"features": [["classifier.1", "classifier.1"]]}), tmp_path)
