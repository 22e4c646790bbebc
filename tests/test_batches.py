"""The student's batch pipeline (dfkd.batches): source, the averaged generator's share, augmentations."""

import torch
import torch.nn as nn

from dfkd.augment import random_elastic, random_pen_width
from dfkd.batches import StudentBatches
from dfkd.config import MethodConfig
from dfkd.optim import WeightAverage

BATCH = 8


class Synthesizer:
    """Stands in for Game.synthesize: batch number k is all k, its logits 10·k; counts its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, generator=None, n=None):
        k = float(len(self.calls) + 1)
        self.calls.append((generator, n))
        n = n or BATCH
        return torch.full((n, 1, 4, 4), k), torch.full((n, 3), 10 * k)


class Teacher(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :3] * 100


def latest(value=-1.0):
    return torch.full((BATCH, 1, 4, 4), value), torch.full((BATCH, 3), 10 * value)


def pipeline(seed=0, average=None, **method):
    synth = Synthesizer()
    rng = torch.Generator().manual_seed(seed)
    return StudentBatches(MethodConfig(**method), BATCH, rng, synth, Teacher(), average), synth


def test_reused_samples_are_the_generator_steps_own_batch():
    batches, synth = pipeline(reuse_samples=True)
    newest = latest()
    batches.refresh(newest)
    for _ in range(3):
        x, t = batches.draw(newest)
        assert torch.equal(x, newest[0]) and torch.equal(t, newest[1])
    assert synth.calls == [], "no extra generator or teacher forward"


def test_without_reuse_each_draw_is_a_fresh_batch_from_the_live_generator():
    batches, synth = pipeline(reuse_samples=False)
    newest = latest()
    batches.refresh(newest)
    drawn = [batches.draw(newest)[0] for _ in range(3)]
    assert [float(x[0, 0, 0, 0]) for x in drawn] == [1.0, 2.0, 3.0]
    assert synth.calls == [(None, None)] * 3


def test_replay_draws_from_the_memory_with_the_runs_generator():
    batches, _ = pipeline(seed=3, replay_size=20)
    for value in (1.0, 2.0, 3.0):  # the memory keeps the newest 20 of these 24 images
        batches.refresh(latest(value))
    x, t = batches.draw(latest(3.0))
    assert x.shape == (BATCH, 1, 4, 4)
    assert torch.equal(t[:, 0], 10 * x[:, 0, 0, 0]), "images keep their logits"
    assert set(x[:, 0, 0, 0].tolist()) <= {1.0, 2.0, 3.0}
    # the same draw again from a copy of the memory and the same generator state
    again, _ = pipeline(seed=3, replay_size=20)
    again.load_state_dict(batches.state_dict())
    rng = torch.Generator().manual_seed(3)
    expected = batches.memory.sample(BATCH, rng)
    assert torch.equal(again.draw(latest(3.0))[0], expected[0])


def test_the_averaged_generator_supplies_its_share_of_every_batch():
    generator = nn.Linear(2, 2)
    average = WeightAverage(generator, 0.5)
    batches, synth = pipeline(average=average, generator_ema_mix=0.25)
    before = [p.clone() for p in generator.parameters()]
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(1.0)
    newest = latest()
    batches.refresh(newest)
    # the average moved halfway, and drew its share once for the whole iteration
    for avg, old in zip(average.model.parameters(), before):
        assert torch.allclose(avg, old + 0.5)
    assert synth.calls == [(average.model, 2)]  # round(0.25 · 8)
    for _ in range(2):
        x, t = batches.draw(newest)
        share = batches.average_batch
        assert len(x) == BATCH and torch.equal(x[:6], newest[0][:6]) and torch.equal(x[6:], share[0])
        assert torch.equal(t[6:], share[1]) and torch.equal(t[:6], newest[1][:6])
    assert len(synth.calls) == 1


def test_augmented_images_are_relabelled_by_the_teacher():
    batches, _ = pipeline(student_shift=1, student_flip=True, student_mixup=0.5)
    newest = torch.randn(BATCH, 1, 4, 4), torch.zeros(BATCH, 3)
    batches.refresh(newest)
    x, t = batches.draw(newest)
    assert x.shape == newest[0].shape and not torch.equal(x, newest[0])
    assert torch.equal(t, Teacher()(x))


def test_augmentations_draw_from_the_runs_generator():
    """Same seed, same draws: a resumed run (which restores the generator) augments alike."""
    first, _ = pipeline(seed=1, student_shift=2, student_flip=True)
    second, _ = pipeline(seed=1, student_shift=2, student_flip=True)
    other, _ = pipeline(seed=2, student_shift=2, student_flip=True)
    newest = torch.randn(BATCH, 1, 4, 4), torch.zeros(BATCH, 3)
    a, b, c = (p.draw(newest)[0] for p in (first, second, other))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_memory_keeps_each_batch_and_its_twin_drawn_with_another_pen():
    batches, _ = pipeline(seed=0, replay_size=64, replay_pen_width=1.0)
    newest = torch.randn(BATCH, 1, 4, 4), torch.zeros(BATCH, 3)
    batches.refresh(newest, owner=1)
    memory = batches.memory
    assert memory.size == 2 * BATCH and bool((memory.owners[: 2 * BATCH] == 1).all())
    assert torch.equal(memory.images[:BATCH], newest[0]) and torch.equal(memory.logits[:BATCH], newest[1])
    twin, labels = memory.images[BATCH : 2 * BATCH], memory.logits[BATCH : 2 * BATCH]
    assert not torch.equal(twin, newest[0])
    assert torch.equal(labels, Teacher()(twin)), "the teacher labels the twin"
    plain, _ = pipeline(seed=0, replay_size=64)
    plain.refresh(newest)
    assert plain.memory.size == BATCH, "no twin unless asked"


def test_the_twin_is_also_drawn_by_another_hand_when_asked():
    newest = torch.randn(BATCH, 1, 8, 8), torch.zeros(BATCH, 3)
    batches, _ = pipeline(seed=0, replay_size=64, replay_elastic=34.0)
    batches.refresh(newest)
    twin, labels = batches.memory.images[BATCH : 2 * BATCH], batches.memory.logits[BATCH : 2 * BATCH]
    expected = random_elastic(newest[0], 34.0, torch.Generator().manual_seed(0))
    assert torch.equal(twin, expected) and torch.equal(labels, Teacher()(twin))
    both, _ = pipeline(seed=0, replay_size=64, replay_pen_width=1.0, replay_elastic=34.0)
    both.refresh(newest)
    rng = torch.Generator().manual_seed(0)
    pen_then_hand = random_elastic(random_pen_width(newest[0], 1.0, rng), 34.0, rng)
    assert torch.equal(both.memory.images[BATCH : 2 * BATCH], pen_then_hand)
