"""CMI's contrastive term (dfkd.contrast): its value, its memory bank, its crops, and where its
gradients go."""

import math

import numpy as np
import pytest
import torch
from test_gradients import Routes, reaches

from dfkd.augment import random_resized_crop
from dfkd.contrast import InstanceContrast, instance_features
from dfkd.errors import DfkdError


def numpy_infonce(head, local, whole, past_local, past_whole, temperature):
    """The loss as the paper's code computes it, from the head's weights, in float64."""
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in head.parameters())

    def project(x):
        h = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
        return h / np.linalg.norm(h, axis=1, keepdims=True)

    q = project(np.concatenate([local, past_local]))
    k = project(np.concatenate([whole, past_whole]))
    logits = q @ k.T / temperature
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    per_row = -np.diag(log_p)
    n = len(local)
    return per_row[:n].mean() + (per_row[n:].mean() if len(past_local) else 0.0)


def test_infonce_golden_value_with_and_without_the_bank():
    torch.manual_seed(0)
    term = InstanceContrast(feature_dim=6, bank_size=5, temperature=0.1, head_dim=4).double()
    rng = np.random.default_rng(0)
    first, second = [(rng.normal(size=(3, 6)), rng.normal(size=(3, 6))) for _ in range(2)]
    got = term.loss(*map(torch.tensor, first))
    empty = np.zeros((0, 6))
    assert got.item() == pytest.approx(numpy_infonce(term.head, *first, empty, empty, 0.1), rel=1e-9)
    term.remember(*map(torch.tensor, first))
    got = term.loss(*map(torch.tensor, second))
    want = numpy_infonce(term.head, *second, *first, 0.1)
    assert got.item() == pytest.approx(want, rel=1e-9)


def test_a_batch_of_copies_cannot_be_told_apart():
    # every key the same: each row's softmax is uniform, whatever the head
    term = InstanceContrast(feature_dim=8, bank_size=16, temperature=0.1)
    one = torch.randn(1, 8)
    loss = term.loss(torch.randn(10, 8), one.expand(10, 8))
    assert loss.item() == pytest.approx(math.log(10), rel=1e-5)


def test_the_bank_keeps_the_newest_rows_and_its_fill_travels_in_the_state_dict():
    term = InstanceContrast(feature_dim=2, bank_size=5, temperature=0.1)
    batches = [torch.full((3, 2), float(i)) for i in range(3)]  # 9 rows through a bank of 5
    for b in batches:
        term.remember(b, -b)
    assert (term.filled, term.cursor) == (5, 4)
    # batch 0 went to slots 0-2, batch 1 to 3, 4, 0, batch 2 to 1-3: batch 0 is gone
    assert term.bank[:, 0, 0].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]
    assert torch.equal(term.bank[:, 1], -term.bank[:, 0])
    copy = InstanceContrast(feature_dim=2, bank_size=5, temperature=0.1)
    copy.load_state_dict(term.state_dict())
    assert (copy.filled, copy.cursor) == (5, 4) and torch.equal(copy.bank, term.bank)
    # a batch larger than the bank keeps its last rows
    term.remember(torch.arange(14.0).view(7, 2), torch.zeros(7, 2))
    assert sorted(term.bank[:, 0, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]


def test_instance_features_average_each_map_per_image():
    maps, flat = torch.randn(4, 3, 5, 5), torch.randn(4, 2)
    got = instance_features([maps, flat])
    assert got.shape == (4, 5)
    assert torch.allclose(got[:, :3], maps.mean((2, 3))) and torch.equal(got[:, 3:], flat)


def test_a_full_crop_is_the_image_and_smaller_crops_zoom_each_image_on_its_own():
    x = torch.randn(6, 1, 16, 16, requires_grad=True)
    same = random_resized_crop(x, 1.0, torch.Generator().manual_seed(0))
    assert torch.allclose(same, x, atol=1e-5)
    crops = random_resized_crop(x, 0.25, torch.Generator().manual_seed(0))
    assert crops.shape == x.shape and not torch.allclose(crops, x, atol=1e-2)
    # each image has its own crop: a batch of one image repeated comes back with different crops
    copies = random_resized_crop(x[:1].detach().expand(6, -1, -1, -1), 0.25, torch.Generator().manual_seed(0))
    assert not torch.allclose(copies[0], copies[1])
    crops.sum().backward()
    assert x.grad.abs().sum() > 0


def bn_contrast(tiny, **method):
    method = {"contrast": 0.8, "contrast_bank": 64, **method}
    return tiny(teacher={"arch": "lenet5_bn", "epochs": 1}, method=method)


def test_the_term_trains_the_generator_and_its_head_and_never_the_student(tiny, tmp_path, run_of):
    run = run_of(bn_contrast(tiny, n_student_steps=2), tmp_path)
    game = run.game
    head = list(game.method.contrast.parameters())
    assert all(any(p is q for q in game.generator_player.params) for p in head)
    assert not any(any(p is q for q in game.student_player.params) for p in head)
    routes = Routes(game)
    before = [p.clone() for p in head]
    for _ in range(2):
        out = run.step()
    assert "train/contrast" in out
    for call in routes.calls["g"]:
        assert call["terms"]["contrast"] == {"g"} and call["changed"] == {"g"}
    for call in routes.calls["s"]:
        assert call["terms"] == {"loss": {"s"}} and call["changed"] == {"s"}
    assert all(not torch.equal(a, b) for a, b in zip(before, head))  # the head learns
    # every generator step banks its batch: two iterations of the adapted game's two steps
    assert game.method.contrast.filled == 2 * game.cfg.method.n_generator_steps * game.cfg.train.batch_size


def test_the_term_reaches_the_generator_through_both_views_and_the_head(tiny, tmp_path, run_of):
    game = run_of(bn_contrast(tiny), tmp_path).game
    x = game.generator_player.forward(game.sample_latent())
    logits, taps = game.method.teacher_forward(game.teacher, x, game.phases)
    local, whole = taps["views"]
    term = game.method.contrast.loss(local, whole)
    assert reaches(term, list(game.generator.parameters()))
    assert reaches(term, list(game.method.contrast.head.parameters()))
    # the keys are held fixed (as in CMI): the global view alone sends nothing back
    assert not reaches(game.method.contrast.loss(local.detach(), whole), list(game.generator.parameters()))


def test_contrast_needs_a_batchnorm_teacher_and_sane_settings(tiny, tmp_path, run_of):
    with pytest.raises(DfkdError, match=r"method.contrast compares the teacher's BatchNorm inputs.*lenet5"):
        run_of(tiny(method={"contrast": 0.8}), tmp_path)
    for key, value, message in [
        ("contrast", -1.0, "must be 0 .off. or positive"),
        ("contrast_bank", 0, "must be positive"),
        ("contrast_temperature", 0.0, "must be positive"),
        ("contrast_crop", 0.0, r"must be in \(0, 1\]"),
    ]:
        with pytest.raises(DfkdError, match=rf"method.{key} {message}"):
            tiny(method={key: value})
