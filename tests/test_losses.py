import math

import numpy as np
import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.losses import LOSSES

S = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
T = [[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]]


def softmax(row, tau):
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]


def golden(name, tau):
    """The definitions written out element by element, independent of the library code."""
    pairs = list(zip(S, T))
    if name == "l1":
        return np.mean([abs(a - b) for s, t in pairs for a, b in zip(s, t)])
    if name == "mse":
        return np.mean([(a - b) ** 2 for s, t in pairs for a, b in zip(s, t)])
    total = 0.0
    for s, t in pairs:
        ps, pt = softmax(s, tau), softmax(t, tau)
        if name == "kl":
            total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
        else:
            m = [(a + b) / 2 for a, b in zip(ps, pt)]
            total += 0.5 * sum(a * math.log(a / c) for a, c in zip(ps, m))
            total += 0.5 * sum(b * math.log(b / c) for b, c in zip(pt, m))
    return total / len(pairs) * tau**2


@pytest.mark.parametrize("name", ["l1", "mse", "kl", "js"])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_golden_values(name, tau):
    value = LOSSES.get(name)(torch.tensor(S, dtype=torch.float64), torch.tensor(T, dtype=torch.float64), tau)
    assert value.item() == pytest.approx(golden(name, tau), rel=1e-9)


@pytest.mark.parametrize("name", LOSSES.names())
def test_differentiable_in_both_arguments_and_zero_at_agreement(name):
    s = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    LOSSES.get(name)(s, t, 2.0).backward()
    assert s.grad.abs().sum() > 0 and t.grad.abs().sum() > 0
    assert LOSSES.get(name)(t.detach(), t.detach(), 2.0).item() == pytest.approx(0.0, abs=1e-12)


def test_unknown_loss_lists_known_names():
    with pytest.raises(DfkdError, match=r"unknown loss 'l3'; known: js, kl, l1, mse"):
        LOSSES.get("l3")


def test_prior_golden_values():
    from dfkd.losses import PRIORS

    logits = torch.tensor(T, dtype=torch.float64)
    # onehot: mean over rows of -log softmax at the row's argmax
    expected = np.mean([-math.log(softmax(row, 1.0)[int(np.argmax(row))]) for row in T])
    assert PRIORS.get("onehot")(logits).item() == pytest.approx(expected, rel=1e-9)
    # balance: log K + sum p̄ log p̄, zero for a perfectly balanced batch
    mean = np.mean([softmax(row, 1.0) for row in T], axis=0)
    expected = math.log(3) + float(np.sum(mean * np.log(mean)))
    assert PRIORS.get("balance")(logits).item() == pytest.approx(expected, rel=1e-9)
    assert PRIORS.get("balance")(torch.eye(3) * 50).item() == pytest.approx(0.0, abs=1e-9)


def test_priors_enter_the_generator_loss_with_their_weights():
    from dfkd.config import MethodConfig
    from dfkd.methods import build_method

    s, t = torch.randn(5, 4), torch.randn(5, 4)
    plain = build_method(MethodConfig()).generator_losses(s, t)
    out = build_method(MethodConfig(priors={"onehot": 2.0, "balance": 0.5})).generator_losses(s, t)
    assert torch.allclose(out["loss"], plain["loss"] + 2.0 * out["prior_onehot"] + 0.5 * out["prior_balance"])
    with pytest.raises(DfkdError, match="unknown generator prior 'ohe'"):
        build_method(MethodConfig(priors={"ohe": 1.0}))


@pytest.mark.parametrize("name", ["l1", "kl"])
def test_the_agreed_only_adversarial_term_sums_the_agreed_rows_over_the_batch(name):
    """CMI's and Fast-DFKD's mask: rows whose top classes differ add nothing and get no gradient."""
    from dfkd.config import MethodConfig
    from dfkd.methods import build_method

    student = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [0.0, 1.0, 0.0]]
    teacher = [[1.5, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 3.0, 1.0]]  # top classes 0/0, 2/1, 1/1
    agreed = [0, 2]
    if name == "l1":  # the mean over all 3 x 3 entries, the disagreeing row's counted as zero
        expected = sum(abs(a - b) for i in agreed for a, b in zip(student[i], teacher[i])) / 9
    else:  # the mean over all 3 rows of KL(teacher || student), the disagreeing row's zero
        kl_rows = [
            sum(q * math.log(q / p) for p, q in zip(softmax(student[i], 1.0), softmax(teacher[i], 1.0)))
            for i in agreed
        ]
        expected = sum(kl_rows) / 3
    s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    method = build_method(MethodConfig(loss=name, adversarial_agreed_only=True, adversarial_weight=0.5))
    out = method.generator_losses(s, torch.tensor(teacher, dtype=torch.float64))
    assert out["discrepancy"].item() == pytest.approx(expected, rel=1e-12)
    assert out["loss"].item() == pytest.approx(-0.5 * expected, rel=1e-12)
    out["loss"].backward()
    assert s.grad[1].abs().sum() == 0 and s.grad[0].abs().sum() > 0 and s.grad[2].abs().sum() > 0


def test_bn_prior_golden_value_and_gradient():
    from dfkd.losses import PRIORS

    rng = np.random.default_rng(0)
    x4, x2 = rng.normal(size=(5, 3, 4, 4)), rng.normal(2.0, 3.0, size=(5, 6))
    stats = [
        (x4, rng.normal(size=3), rng.uniform(0.5, 2, size=3)),
        (x2, rng.normal(size=6), rng.uniform(0.5, 2, size=6)),
    ]
    expected = 0.0
    for x, rm, rv in stats:
        axes = (0, 2, 3) if x.ndim == 4 else (0,)
        expected += np.sqrt(((x.mean(axis=axes) - rm) ** 2).sum())
        expected += np.sqrt(((x.var(axis=axes) - rv) ** 2).sum())
    inputs = [
        (torch.tensor(x, requires_grad=True), torch.tensor(rm), torch.tensor(rv)) for x, rm, rv in stats
    ]
    got = PRIORS.get("bn")(torch.zeros(5, 10, dtype=torch.double), bn_inputs=inputs)
    assert got.item() == pytest.approx(expected, rel=1e-10)

    def prior(a, b):
        return PRIORS.get("bn")(a.new_zeros(1, 1), bn_inputs=[(a, *inputs[0][1:]), (b, *inputs[1][1:])])

    assert torch.autograd.gradcheck(prior, (inputs[0][0], inputs[1][0]))


def test_batch_moments_of_a_bf16_channels_last_tap_match_torch_in_float32():
    from dfkd.losses import batch_moments

    x = torch.randn(8, 3, 5, 5).mul(2).add(1).bfloat16().contiguous(memory_format=torch.channels_last)
    leaf = x.detach().requires_grad_(True)
    mean, var = batch_moments(leaf)
    assert mean.dtype == var.dtype == torch.float32  # a bf16 tap's statistics keep their digits
    wide = x.float().detach().requires_grad_(True)
    torch.testing.assert_close(mean, wide.mean((0, 2, 3)))
    torch.testing.assert_close(var, wide.var((0, 2, 3), unbiased=False))
    weights = torch.tensor([0.5, -1.0, 2.0])
    ((mean * weights).sum() + (var * weights.flip(0)).sum()).backward()
    reference = wide.mean((0, 2, 3)) * weights + wide.var((0, 2, 3), unbiased=False) * weights.flip(0)
    reference.sum().backward()
    assert leaf.grad.dtype == torch.bfloat16
    torch.testing.assert_close(leaf.grad.float(), wide.grad, rtol=1e-2, atol=1e-4)


def weight_grads(module):
    """The gradient of each weight matrix or kernel (biases feeding a BatchNorm get none by design)."""
    return {name: p.grad for name, p in module.named_parameters() if name.endswith("weight")}


def prior_alone(tiny, run_of, tmp_path, prior, **sections):
    """A generator step whose only gradient is the prior's (adversarial_weight 0), and its batch."""
    game = run_of(tiny(method={"priors": {prior: 1.0}, "adversarial_weight": 0.0}, **sections), tmp_path).game
    losses, (x, _) = game.generator_step()
    assert torch.equal(losses["loss"], losses[f"prior_{prior}"])
    found = weight_grads(game.generator)
    assert found and all(g is not None and g.abs().sum() > 0 for g in found.values()), found.keys()
    # the prior's tap keeps the images' graph: the term alone has a gradient in them
    leaf = x.clone().requires_grad_(True)
    teacher_logits, taps = game.method.teacher_forward(game.teacher, leaf, game.phases)
    term = game.method.generator_losses(game.student(leaf), teacher_logits, **taps)[f"prior_{prior}"]
    (image_grad,) = torch.autograd.grad(term, leaf)
    assert image_grad.abs().sum() > 0
    return game, losses, x


def test_bn_prior_alone_reaches_the_generator_through_a_batchnorm_teacher(tiny, tmp_path, run_of):
    from dfkd.features import batchnorm_layers, capture

    game, losses, x = prior_alone(tiny, run_of, tmp_path, "bn", teacher={"arch": "resnet8"})
    assert losses["prior_bn"] > 0
    # golden value: the teacher's BatchNorm inputs on the step's batch against its running statistics
    layers = batchnorm_layers(game.teacher)
    with torch.no_grad(), game.autocast(), capture(game.teacher, list(layers), inputs=True) as inputs:
        game.teacher(x)
    expected = 0.0
    for path, bn in layers.items():
        a = inputs[path].double().numpy()
        axes = (0, 2, 3) if a.ndim == 4 else (0,)
        expected += np.linalg.norm(a.mean(axis=axes) - bn.running_mean.double().numpy())
        expected += np.linalg.norm(a.var(axis=axes) - bn.running_var.double().numpy())
    assert len(layers) > 1 and losses["prior_bn"].item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(DfkdError, match=r"no teacher has BatchNorm layers \(lenet5\); drop the bn prior"):
        run_of(tiny(method={"priors": {"bn": 1.0}}), tmp_path)


def test_activation_prior_golden_value_and_run(tiny, tmp_path, run_of):
    from dfkd.losses import PRIORS

    act = torch.tensor([[1.0, -2.0], [0.5, 0.0]], requires_grad=True)
    got = PRIORS.get("activation")(torch.zeros(2, 3), activation=act)
    assert got.item() == pytest.approx(-(1 + 2 + 0.5 + 0) / 4)
    got.backward()
    assert torch.equal(act.grad, torch.tensor([[-0.25, 0.25], [-0.25, 0.0]]))
    method = {"priors": {"activation": 0.1}, "activation_layer": "classifier.1"}
    game = run_of(tiny(method=method), tmp_path).game
    losses, _ = game.generator_step()
    assert losses["prior_activation"] < 0
    with pytest.raises(DfkdError, match="set method.activation_layer"):
        run_of(tiny(method={"priors": {"activation": 0.1}}), tmp_path)


def test_total_variation_prior_golden_value_and_run(tiny, tmp_path, run_of):
    from dfkd.losses import PRIORS

    image = [[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]  # horizontal steps 1, 2, 0, 0; vertical 2, 1, 1
    x = torch.tensor([[image]], dtype=torch.double, requires_grad=True)
    got = PRIORS.get("tv")(torch.zeros(1, 3), images=x)
    assert got.item() == pytest.approx(((1 + 2 + 0 + 0) / 4 + (2 + 1 + 1) / 3) / 2)
    uneven = x + 0.1 * torch.arange(6.0).view(1, 1, 2, 3)
    assert torch.autograd.gradcheck(lambda a: PRIORS.get("tv")(a.new_zeros(1, 1), images=a), (uneven,))
    _, losses, x = prior_alone(tiny, run_of, tmp_path, "tv")
    assert losses["prior_tv"] > 0
    a = x.double().numpy()
    expected = (np.abs(np.diff(a, axis=-1)).mean() + np.abs(np.diff(a, axis=-2)).mean()) / 2
    assert losses["prior_tv"].item() == pytest.approx(expected, rel=1e-5)


def test_box_blur_averages_each_window_inside_the_image():
    from dfkd.augment import box_blur

    x = torch.tensor([[[[0.0, 3.0, 6.0], [9.0, 0.0, 0.0]]]])
    # each 3×3 window, cut to the pixels inside the 2×3 image
    expected = [[(0 + 3 + 9 + 0) / 4, (0 + 3 + 6 + 9) / 6, (3 + 6 + 0 + 0) / 4]] * 2
    assert torch.allclose(box_blur(x), torch.tensor([[expected]]))


def test_blur_prior_golden_value_and_run(tiny, tmp_path, run_of):
    from dfkd.augment import box_blur
    from dfkd.losses import PRIORS

    sharp = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=torch.double)
    blurred = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.double, requires_grad=True)
    got = PRIORS.get("blur")(sharp, blurred=blurred)
    # the blurred readings' cross-entropy to the sharp readings' classes (0 and 2)
    expected = ((math.log(2 + math.e) - 0) + (math.log(2 + math.e) - 1)) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)
    got.backward()
    assert blurred.grad.abs().sum() > 0
    game, losses, x = prior_alone(tiny, run_of, tmp_path, "blur", teacher={"arch": "resnet8"})
    # the tap is the teacher's reading of the step's batch blurred, against its reading of the batch
    with torch.no_grad(), game.autocast():
        sharp, blurred = game.teacher(x).float(), game.teacher(box_blur(x)).float()
    expected = torch.nn.functional.cross_entropy(blurred, sharp.argmax(1))
    assert losses["prior_blur"].item() == pytest.approx(expected.item(), rel=1e-3)


def test_memory_balance_prior_golden_value_and_gradient():
    from dfkd.losses import PRIORS, UNEVEN_AT_FULL_WEIGHT, class_unevenness

    prior, balance = PRIORS.get("memory_balance"), PRIORS.get("balance")
    crowded, slight = [0.5, 0.3, 0.2], [0.4, 0.3, 0.3]
    kl = {name: sum(p * math.log(3 * p) for p in s) for name, s in (("crowded", crowded), ("slight", slight))}
    assert kl["crowded"] > UNEVEN_AT_FULL_WEIGHT > kl["slight"] > 0
    for name, shares in (("crowded", crowded), ("slight", slight)):
        shares = torch.tensor(shares, dtype=torch.float64)
        assert class_unevenness(shares).item() == pytest.approx(kl[name], rel=1e-9)
        logits = torch.tensor(T, dtype=torch.float64, requires_grad=True)
        gate = min(1.0, kl[name] / UNEVEN_AT_FULL_WEIGHT)
        got = prior(logits, memory_classes=shares)
        assert got.item() == pytest.approx(gate * balance(logits).item(), rel=1e-9)
        (grad,) = torch.autograd.grad(got, logits)
        (full,) = torch.autograd.grad(balance(logits), logits)
        assert torch.allclose(grad, gate * full)
    even = torch.full((3,), 1 / 3, dtype=torch.float64)
    off = prior(torch.tensor(T, dtype=torch.float64), memory_classes=even)
    assert off.item() == pytest.approx(0, abs=1e-12)
    assert class_unevenness(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(math.log(3))


def test_memory_balance_prior_reads_the_replay_memory_of_the_run(tiny, tmp_path, run_of):
    from dfkd.losses import PRIORS, UNEVEN_AT_FULL_WEIGHT

    method = {"priors": {"memory_balance": 1.0}, "replay_size": 64}
    game = run_of(tiny(method=method), tmp_path).game
    losses, _ = game.generator_step()  # an empty memory reads as even: the term is off
    assert losses["memory_uneven"].item() == pytest.approx(0, abs=1e-7)
    assert losses["prior_memory_balance"] == 0
    metrics = game.iteration(0)
    assert "train/memory_uneven" in metrics and "train/prior_memory_balance" in metrics
    losses, (_, teacher_logits) = game.generator_step()
    memory = game.batches.memory
    top = memory.logits[: memory.size].argmax(1).numpy()
    shares = np.bincount(top, minlength=teacher_logits.shape[1]) / memory.size
    uneven = float(np.sum([p * math.log(p * len(shares)) for p in shares if p > 0]))
    assert memory.size > 0 and losses["memory_uneven"].item() == pytest.approx(uneven, rel=1e-5)
    gate = min(1.0, uneven / UNEVEN_AT_FULL_WEIGHT)
    expected = gate * PRIORS.get("balance")(teacher_logits).item()
    assert losses["prior_memory_balance"].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    with pytest.raises(DfkdError, match="method.priors.memory_balance .* method.replay_size is 0"):
        run_of(tiny(method={"priors": {"memory_balance": 1.0}}), tmp_path)
