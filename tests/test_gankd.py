"""The GAN-KD variant: its objective, its discriminators, and who gets which gradient."""
import json
import math

import pytest
import torch

from dfkd.config import MethodConfig
from dfkd.errors import DfkdError
from dfkd.methods import build_method
from dfkd.features import Adapter
from dfkd.trainer import Trainer
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


def test_beta_zero_is_exactly_ce_plus_alpha_kl(tiny, tmp_path):
    s, t = torch.randn(6, 10, dtype=torch.double), torch.randn(6, 10, dtype=torch.double)
    method = build_method(MethodConfig(name="gankd", alpha=0.7, beta=0.0))
    losses = method.student_losses(s, t)
    assert set(losses) == {"loss", "ce", "kl"}
    assert losses["loss"].item() == pytest.approx(golden_ce_plus_kl(s, t, 0.7), rel=1e-12)
    # in a run, beta 0 builds no discriminator and the student step minimizes just that
    trainer = Trainer(tiny(method={**GANKD, "beta": 0.0}), tmp_path, progress=False)
    assert trainer.discriminator is None
    x, t = trainer.synthesize()
    with torch.no_grad():
        expected = golden_ce_plus_kl(trainer.student(x).double(), t.double(), 0.7)
    losses, d_losses = trainer.student_step(x, t)
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


@pytest.mark.parametrize("disc", [{}, FEATURE_D], ids=["outputs", "features"])
def test_discriminator_learns_to_tell_a_frozen_student_from_the_teacher(tiny, tmp_path, disc):
    trainer = Trainer(tiny(method=GANKD, discriminator=disc, discriminator_optim={"lr": 1e-3}), tmp_path, progress=False)
    x, t = trainer.synthesize()
    fs, ft = {}, {}
    if disc:
        from dfkd.features import capture

        with torch.no_grad(), capture(trainer.student, ["features.5"]) as fs:
            logits = trainer.student(x)
        with torch.no_grad(), capture(trainer.pool.models[0], ["features.5"]) as ft:
            trainer.teacher(x)
    else:
        with torch.no_grad():
            logits = trainer.student(x)
    with torch.no_grad():
        real, fake = trainer._discriminator_views(logits, t, fs, ft)
    student_before = [p.clone() for p in trainer.student_params]
    accs = [trainer.discriminator_step(real, fake)["acc"].item() for _ in range(150)]
    assert max(accs[:3]) < 0.9 and sum(accs[-10:]) / 10 > 0.9, accs[::15]
    # the discriminator step changed only the discriminator
    assert all(torch.equal(a, b) for a, b in zip(student_before, trainer.student_params))
    assert all(g is None for g in grads(trainer.student)) and all(g is None for g in grads(trainer.generator))


@pytest.mark.parametrize("disc", [{}, FEATURE_D], ids=["outputs", "features"])
def test_the_gan_term_trains_the_student_and_never_the_discriminator(tiny, tmp_path, disc):
    trainer = Trainer(tiny(method=GANKD, discriminator=disc), tmp_path, progress=False)
    assert (trainer.adapter is not None) == bool(disc)  # lenet5_half has half the teacher's channels
    x, t = trainer.synthesize()
    trainer.discriminator_step = lambda real, fake: {}  # isolate the student's own step
    d_before = [p.clone() for p in trainer.discriminator.parameters()]
    losses, _ = trainer.student_step(x, t)
    assert set(losses) == {"loss", "ce", "kl", "gan"}
    assert all(g is None for g in grads(trainer.discriminator)), "the student step must not fill D gradients"
    assert all(torch.equal(a, b) for a, b in zip(d_before, trainer.discriminator.parameters()))
    assert all(g is not None for g in grads(trainer.student))
    # the GAN term on its own sends a gradient into the student's side
    from dfkd.features import capture

    with capture(trainer.student, ["features.5"]) as fs:
        logits = trainer.student(x)
    ft = {}
    if disc:
        with torch.no_grad(), capture(trainer.pool.models[0], ["features.5"]) as ft:
            trainer.teacher(x)
    _, fake = trainer._discriminator_views(logits, t, fs, ft)
    gan = trainer.method.gan.student(trainer.discriminator(fake))
    g = torch.autograd.grad(gan, trainer.student_params, allow_unused=True)
    assert any(v is not None and v.abs().sum() > 0 for v in g)


def test_gankd_run_logs_every_term_and_resumes_exactly(tiny, tmp_path):
    cfg = tiny(method=GANKD, discriminator=FEATURE_D, train={"iterations": 6, "checkpoint_every": 3})
    full = Trainer(cfg, tmp_path / "full", progress=False)
    full.fit()
    Trainer(cfg, tmp_path / "split", progress=False).fit(stop_at=3)
    resumed = Trainer(cfg, tmp_path / "split", progress=False)
    resumed.load_checkpoint(resumed.checkpoint_path)
    resumed.fit()
    for name in ("student", "discriminator", "adapter", "generator"):
        a, b = full.networks[name].state_dict(), resumed.networks[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert full.opt_d.state_dict()["state"].keys() == resumed.opt_d.state_dict()["state"].keys()
    keys = {k for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {"train/loss_D", "train/acc_D", "train/loss_S_ce", "train/loss_S_kl", "train/loss_S_gan"} <= keys


@pytest.mark.parametrize("disc, message", [
    ({"name": "conv"}, "discriminator.name=conv reads feature maps: set discriminator.layers"),
    ({"name": "mlp", "layers": ["features.5", "features.5"]}, "discriminator.name=mlp reads class probabilities"),
    ({"name": "conv", "layers": ["features.5", "features.99"]}, "teacher lenet5 has no layer 'features.99'"),
    ({"name": "critic"}, "unknown discriminator 'critic'; known: conv, feature_mlp, mlp"),
])  # fmt: skip
def test_discriminator_misconfigurations_are_one_line_errors(tiny, tmp_path, disc, message):
    with pytest.raises(DfkdError, match=message):
        Trainer(tiny(method=GANKD, discriminator=disc), tmp_path, progress=False)
