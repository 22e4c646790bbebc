"""The terms the BatchNorm-based methods share: class-conditional latents with the `target` prior,
the depth-free `bn_kl` prior and the `input_kl` image prior."""

import math

import numpy as np
import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.latents import LatentSpace
from dfkd.losses import PRIORS


def test_a_conditional_latent_carries_a_one_hot_code_and_noise():
    space = LatentSpace(12, num_classes=3)
    z = space.draw(500, torch.Generator().manual_seed(0))
    code, noise = z[:, :3], z[:, 3:]
    assert torch.equal(code.sum(1), torch.ones(500)) and set(code.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(space.targets(z), code.argmax(1))
    counts = torch.bincount(space.targets(z), minlength=3)
    assert counts.min() > 130  # each class drawn about a third of the time
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05


def test_plain_noise_draws_what_torch_randn_draws():
    # an unconditional run keeps its latent stream (and so its results) unchanged
    z = LatentSpace(7).draw(5, torch.Generator().manual_seed(3))
    assert torch.equal(z, torch.randn(5, 7, generator=torch.Generator().manual_seed(3)))
    assert LatentSpace(7).targets(z) is None


def test_the_class_code_needs_room_in_the_latent():
    with pytest.raises(DfkdError, match=r"generator.latent_dim \(10\) must be larger"):
        LatentSpace(10, num_classes=10)


def test_target_prior_golden_value():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.double)
    got = PRIORS.get("target")(logits, targets=torch.tensor([0, 1]))

    def log_softmax(row, k):
        return row[k] - math.log(sum(math.exp(v) for v in row))

    expected = -(log_softmax([2.0, 0.0, -1.0], 0) + log_softmax([0.5, 0.5, 3.0], 1)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_bn_kl_golden_value_and_gradient():
    rng = np.random.default_rng(0)
    stats = [
        (rng.normal(1.0, 2.0, (6, 3, 4, 4)), rng.normal(size=3), rng.uniform(0.5, 2, 3)),
        (rng.normal(size=(6, 5)), rng.normal(size=5), rng.uniform(0.5, 2, 5)),
    ]
    per_layer = []
    for x, rm, rv in stats:
        axes = (0, 2, 3) if x.ndim == 4 else (0,)
        v, ref = x.var(axis=axes) + 1e-5, rv + 1e-5
        gap = (x.mean(axis=axes) - rm) ** 2
        per_layer.append(np.mean(0.5 * ((v + gap) / ref - 1 + np.log(ref / v))))
    inputs = [(torch.tensor(x), torch.tensor(rm), torch.tensor(rv)) for x, rm, rv in stats]
    got = PRIORS.get("bn_kl")(torch.zeros(6, 2), bn_inputs=inputs)
    assert got.item() == pytest.approx(np.mean(per_layer), rel=1e-6)
    # zero where the batch has the running statistics, positive elsewhere, with a gradient
    x = torch.randn(64, 3, requires_grad=True)
    exact = [(x, x.mean(0).detach(), x.var(0, unbiased=False).detach())]
    assert PRIORS.get("bn_kl")(torch.zeros(1), bn_inputs=exact).item() == pytest.approx(0, abs=1e-6)
    moved = PRIORS.get("bn_kl")(torch.zeros(1), bn_inputs=[(x + 1, *exact[0][1:])])
    moved.backward()
    assert moved > 0.4 and x.grad.abs().sum() > 0


def test_bn_kl_is_scale_free_where_bn_grows_with_the_activations():
    # the same mismatch, in activations ten times larger: bn grows tenfold, bn_kl stays
    x = torch.randn(256, 8)
    rm, rv = torch.full((8,), 0.5), torch.full((8,), 2.0)
    small = [(x, rm, rv)]
    large = [(10 * x, 10 * rm, 100 * rv)]
    kl = [PRIORS.get("bn_kl")(x, bn_inputs=s).item() for s in (small, large)]
    l2 = [PRIORS.get("bn")(x, bn_inputs=s).item() for s in (small, large)]
    assert kl[1] == pytest.approx(kl[0], rel=1e-3) and l2[1] > 9 * l2[0]


def test_target_prior_steers_a_conditional_generator_toward_each_code(tiny, tmp_path, run_of):
    cfg = tiny(
        generator={"conditional": True},
        method={"priors": {"target": 1.0}, "adversarial_weight": 0.0},
        generator_optim={"lr": 0.01},
        train={"batch_size": 64},
    )
    game = run_of(cfg, tmp_path).game

    @torch.no_grad()
    def hit_rate():
        z = game.sample_latent(500)
        return (game.teacher(game.generator(z)).argmax(1) == game.latents.targets(z)).float().mean()

    before = hit_rate()
    losses = [game.generator_step()[0]["prior_target"] for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    assert before < 0.3 and hit_rate() > 0.6  # the teacher sees the coded class (chance: 0.1)
    # the prior's only gradient is the generator's
    assert all(p.grad is None for p in game.student.parameters())


def test_target_prior_needs_a_conditional_generator(tiny, tmp_path, run_of):
    with pytest.raises(DfkdError, match="set generator.conditional=true"):
        tiny(method={"priors": {"target": 1.0}}).validate()


def test_input_kl_golden_value_and_zero_for_standardized_images():
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 2.0, (8, 2, 5, 5))
    v = x.var(axis=(0, 2, 3)) + 1e-5
    m = x.mean(axis=(0, 2, 3))
    expected = np.mean(0.5 * ((v + m**2) / (1 + 1e-5) - 1 + np.log((1 + 1e-5) / v)))
    got = PRIORS.get("input_kl")(torch.zeros(8, 3), images=torch.tensor(x))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    z = torch.randn(4096, 1, 4, 4)
    standardized = (z - z.mean()) / z.std(unbiased=False)
    assert PRIORS.get("input_kl")(z, images=standardized).item() == pytest.approx(0, abs=1e-4)


def test_input_kl_reaches_the_generator(tiny, tmp_path, run_of):
    game = run_of(tiny(method={"priors": {"input_kl": 1.0}, "adversarial_weight": 0.0}), tmp_path).game
    losses, _ = game.generator_step()
    assert losses["loss"] == losses["prior_input_kl"] > 0
    assert all(p.grad is not None for n, p in game.generator.named_parameters() if n.endswith("weight"))
    assert all(p.grad is None for p in game.student.parameters())


def test_bn_kl_without_a_batchnorm_teacher_names_itself(tiny, tmp_path, run_of):
    with pytest.raises(DfkdError, match=r"method.priors.bn_kl matches .* drop the bn_kl prior"):
        run_of(tiny(method={"priors": {"bn_kl": 1.0}}), tmp_path)
