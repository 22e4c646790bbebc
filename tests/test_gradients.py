"""Gradient routing: who receives gradients in each step of the game."""
import torch

from dfkd.trainer import Trainer


def grads(module):
    return [p.grad for p in module.parameters()]


def test_teacher_is_frozen_once(tiny, tmp_path):
    trainer = Trainer(tiny(), tmp_path, progress=False)
    assert not trainer.teacher.training
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_generator_step_updates_only_the_generator(tiny, tmp_path):
    trainer = Trainer(tiny(), tmp_path, progress=False)
    student_before = [p.clone() for p in trainer.student.parameters()]
    gen_before = [p.clone() for p in trainer.generator.parameters()]
    losses, (x, t) = trainer.generator_step()
    assert all(g is not None and g.abs().sum() > 0 for g in grads(trainer.generator))
    assert all(g is None for g in grads(trainer.student)), "the generator step must not fill student gradients"
    assert all(g is None for g in grads(trainer.teacher))
    assert all(torch.equal(a, b) for a, b in zip(student_before, trainer.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, trainer.generator.parameters()))
    # the generator ascends the discrepancy, so its loss is the negated discrepancy
    assert torch.allclose(losses["loss"], -losses["discrepancy"])
    assert not x.requires_grad and not t.requires_grad


def test_gradients_flow_through_the_frozen_teacher(tiny, tmp_path):
    """With the student's term removed, the generator still gets a gradient: through the teacher."""
    trainer = Trainer(tiny(), tmp_path, progress=False)
    x = trainer.generator(trainer.sample_latent())
    trainer.teacher(x).logsumexp(1).mean().backward(inputs=list(trainer.generator.parameters()))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(trainer.generator))


def test_student_step_updates_only_the_student(tiny, tmp_path):
    trainer = Trainer(tiny(), tmp_path, progress=False)
    gen_before = {k: v.clone() for k, v in trainer.generator.state_dict().items()}
    x, t = trainer.synthesize()
    assert not x.requires_grad and not t.requires_grad
    trainer.student_step(x, t)
    assert all(g is not None for g in grads(trainer.student))
    assert all(g is None for g in grads(trainer.generator)), "the student step must not fill generator gradients"
    assert all(g is None for g in grads(trainer.teacher))
    params = dict(trainer.generator.named_parameters())
    assert all(torch.equal(gen_before[k], v) for k, v in params.items())


def test_full_iteration_routes_each_loss_to_its_player(tiny, tmp_path):
    for method in ({"reuse_samples": False}, {"reuse_samples": True}, {"replay_size": 64, "student_shift": 2, "student_flip": True, "student_mixup": 0.5},
                   {"generator_ema": 0.5, "generator_ema_mix": 0.25}):  # fmt: skip
        trainer = Trainer(tiny(method=method), tmp_path, progress=False)
        out = trainer.iteration()
        assert set(out) >= {"train/loss_G", "train/loss_S", "train/discrepancy"}
        assert all(not v.requires_grad for v in out.values())
        assert all(g is None for g in grads(trainer.teacher))


def test_the_averaged_generator_supplies_its_share_of_each_student_batch(tiny, tmp_path):
    trainer = Trainer(tiny(method={"generator_ema": 0.5, "generator_ema_mix": 0.25}), tmp_path, progress=False)
    before = [p.clone() for p in trainer.generator.parameters()]
    trainer.iteration()
    after = list(trainer.generator.parameters())
    # the average moved halfway from the old weights towards the new ones
    for avg, old, new in zip(trainer.generator_ema.parameters(), before, after):
        assert torch.allclose(avg, 0.5 * old + 0.5 * new.detach(), atol=1e-6)
    latest = trainer.synthesize()
    x, t = trainer.student_batch(latest)
    assert len(x) == 16 and torch.equal(x[:12], latest[0][:12]) and torch.equal(x[12:], trainer.ema_batch[0])
    assert torch.equal(t[12:], trainer.ema_batch[1])


def test_pixel_output_generator_draws_images_in_the_datasets_pixel_range(tiny, tmp_path):
    trainer = Trainer(tiny(generator={"output": "pixels"}), tmp_path, progress=False)
    _, (x, _) = trainer.generator_step()
    info = trainer.dataset.info
    pixels = x * info.std[0] + info.mean[0]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert all(p.grad is not None for p in trainer.generator.parameters())
