"""The GAN-KD variant: its objective, its discriminators, and who gets which gradient."""

import json
import math

import pytest
import torch

from dfkd.config import MethodConfig
from dfkd.errors import DfkdError
from dfkd.features import Adapter, capture
from dfkd.methods import build_method
from discriminators import DISCRIMINATORS, build_discriminator

GANKD = {"name": "gankd", "alpha": 0.7, "beta": 0.5}
FEATURE_D = {"name": "conv", "width": 8, "layers": ["features.5", "features.5"]}


def grads(module):
    return [p.grad for p in module.parameters()]


def golden_ce_plus_kl(s, t, alpha):
    """CE to the teacher's argmax plus alpha * KL(teacher || student), element by element."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        log_zs = math.log(sum(math.exp(v) for v in srow))
        log_zt = math.log(sum(math.exp(v) for v in trow))
        ce = log_zs - srow[trow.index(max(trow))]
        kl = sum(math.exp(b - log_zt) * ((b - log_zt) - (a - log_zs)) for a, b in zip(srow, trow))
        total += ce + alpha * kl
    return total / len(s)


def test_beta_zero_is_exactly_ce_plus_alpha_kl(tiny, tmp_path, run_of):
    s, t = torch.randn(6, 10, dtype=torch.double), torch.randn(6, 10, dtype=torch.double)
    method = build_method(MethodConfig(name="gankd", alpha=0.7, beta=0.0))
    losses = method.student_losses(s, t)
    assert set(losses) == {"loss", "ce", "kl"}
    assert losses["loss"].item() == pytest.approx(golden_ce_plus_kl(s, t, 0.7), rel=1e-12)
    # in a run, beta 0 builds no discriminator and the student step minimizes just that
    game = run_of(tiny(method={**GANKD, "beta": 0.0}), tmp_path).game
    assert game.method.discriminator is None and "d" not in game.players
    x, t = game.synthesize()
    with torch.no_grad(), game.autocast():  # the step's forward, at the step's precision
        expected = golden_ce_plus_kl(game.student(x).double(), t.double(), 0.7)
    losses, d_losses = game.student_step(x, t)
    assert d_losses == {} and losses["loss"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", DISCRIMINATORS.names())
@pytest.mark.parametrize("spectral_norm", [False, True])
def test_every_discriminator_runs_forward_and_backward(name, spectral_norm):
    d = build_discriminator(name, 6, 16, spectral_norm)
    x = torch.randn(4, 6) if name == "mlp" else torch.randn(4, 6, 5, 5)
    out = d(x)
    assert out.shape == (4,)
    out.sum().backward()
    assert all(p.grad is not None for p in d.parameters())


def test_adapter_maps_student_features_to_the_teacher_shape():
    assert Adapter((3, 28, 28), (6, 14, 14))(torch.randn(2, 3, 28, 28)).shape == (2, 6, 14, 14)
    assert Adapter((3, 5, 5), (6, 10, 10))(torch.randn(2, 3, 5, 5)).shape == (2, 6, 10, 10)
    assert Adapter((42,), (84,))(torch.randn(2, 42)).shape == (2, 84)


def views(game, x, t, disc, grad=False):
    """The student's logits and what the discriminator compares on batch `x` (teacher logits `t`)."""
    layers = ["features.5"] if disc else []
    with torch.set_grad_enabled(grad), capture(game.student, layers) as fs:
        logits = game.student(x)
    with torch.no_grad(), capture(game.pool.models[0], layers) as ft:
        game.teacher(x)
    with torch.set_grad_enabled(grad):
        return logits, game.method.discriminator_views(logits, t, fs, ft)


@pytest.mark.parametrize("disc", [{}, FEATURE_D], ids=["outputs", "features"])
def test_discriminator_learns_to_tell_a_frozen_student_from_the_teacher(tiny, tmp_path, run_of, disc):
    game = run_of(tiny(method=GANKD, discriminator=disc, discriminator_optim={"lr": 1e-3}), tmp_path).game
    x, t = game.synthesize()
    _, (real, fake) = views(game, x, t, disc)
    student_before = [p.clone() for p in game.student_player.params]
    accs = [game.discriminator_step(real, fake)["acc"].item() for _ in range(150)]
    assert max(accs[:3]) < 0.9 and sum(accs[-10:]) / 10 > 0.9, accs[::15]
    # the discriminator step changed only the discriminator
    assert all(torch.equal(a, b) for a, b in zip(student_before, game.student_player.params))
    assert all(g is None for g in grads(game.student)) and all(g is None for g in grads(game.generator))


@pytest.mark.parametrize("disc", [{}, FEATURE_D], ids=["outputs", "features"])
def test_the_gan_term_trains_the_student_and_never_the_discriminator(tiny, tmp_path, run_of, disc):
    game = run_of(tiny(method=GANKD, discriminator=disc), tmp_path).game
    discriminator = game.method.discriminator
    assert (game.method.adapter is not None) == bool(disc)  # lenet5_half has half the teacher's channels
    x, t = game.synthesize()
    game.discriminator_step = lambda real, fake: {}  # isolate the student's own step
    d_before = [p.clone() for p in discriminator.parameters()]
    losses, _ = game.student_step(x, t)
    assert set(losses) == {"loss", "ce", "kl", "gan"}
    assert all(g is None for g in grads(discriminator)), "the student step must not fill D gradients"
    assert all(torch.equal(a, b) for a, b in zip(d_before, discriminator.parameters()))
    assert all(g is not None for g in grads(game.student))
    # The GAN term on its own sends a gradient into the student's side (the adapter too, when the
    # discriminator reads features), and into the discriminator: only the student step's
    # backward(inputs=...) keeps the latter out.
    _, (_, fake) = views(game, x, t, disc, grad=True)
    gan = game.method.gan.student(discriminator(fake))

    def reached(params):
        found = torch.autograd.grad(gan, list(params), retain_graph=True, allow_unused=True)
        return [g is not None and bool(g.abs().sum() > 0) for g in found]

    assert any(reached(game.student_player.params)) and any(reached(game.student.parameters()))
    if disc:
        assert all(reached(game.method.adapter.parameters()))
    assert any(reached(discriminator.parameters()))
    assert not any(reached(game.generator.parameters()))


def test_gankd_run_logs_every_term_and_resumes_exactly(tiny, tmp_path, run_of):
    cfg = tiny(method=GANKD, discriminator=FEATURE_D, train={"iterations": 6, "checkpoint_every": 3})
    full = run_of(cfg, tmp_path / "full")
    full.fit()
    run_of(cfg, tmp_path / "split").fit(stop_at=3)
    resumed = run_of(cfg, tmp_path / "split")
    resumed.resume(resumed.checkpoint_path)
    resumed.fit()
    for name in ("student", "discriminator", "adapter", "generator"):
        a, b = full.game.networks[name].state_dict(), resumed.game.networks[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    full_d, resumed_d = (r.game.players["d"].optimizer.state_dict()["state"] for r in (full, resumed))
    assert full_d.keys() == resumed_d.keys()
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    keys = {k for line in lines for k in json.loads(line)}
    assert {"train/loss_D", "train/acc_D", "train/loss_S_ce", "train/loss_S_kl", "train/loss_S_gan"} <= keys


@pytest.mark.parametrize(
    "disc, message",
    [
        ({"name": "conv"}, "discriminator.name=conv reads feature maps: set discriminator.layers"),
        (
            {"name": "mlp", "layers": ["features.5", "features.5"]},
            "discriminator.name=mlp reads class probabilities",
        ),
        (
            {"name": "conv", "layers": ["features.5", "features.99"]},
            "teacher lenet5 has no layer 'features.99'",
        ),
        ({"name": "critic"}, "unknown discriminator 'critic'; known: conv, feature_mlp, mlp"),
    ],
)
def test_discriminator_misconfigurations_are_one_line_errors(tiny, tmp_path, run_of, disc, message):
    with pytest.raises(DfkdError, match=message):
        run_of(tiny(method=GANKD, discriminator=disc), tmp_path)
