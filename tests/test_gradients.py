"""Gradient routing: which parameters each loss term reaches, and whose gradients each step fills."""

import torch


def grads(module):
    return [p.grad for p in module.parameters()]


def reaches(term, params) -> bool:
    """Whether `term` sends a non-zero gradient into any of `params` (its graph is kept)."""
    if not term.requires_grad:
        return False
    found = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return any(g is not None and bool(g.abs().sum() > 0) for g in found)


def grad_copies(params):
    return [None if p.grad is None else p.grad.clone() for p in params]


def same_grads(a, b) -> bool:
    return all((x is None) == (y is None) and (x is None or torch.equal(x, y)) for x, y in zip(a, b))


class Routes:
    """Spies on a game's players. Before each player's real step: which players' parameters each
    term of the loss it is given reaches (g, s, d, as in `game.players`); around the step: whose
    gradients the step changed. `calls[player]` holds one {"terms", "changed"} per step."""

    LOSSES = {"g": "generator_losses", "s": "student_losses", "d": "discriminator_losses"}

    def __init__(self, game):
        self.groups = {name: player.params for name, player in game.players.items()}
        self.calls = {name: [] for name in self.groups}
        self.last = {}
        for name, player in game.players.items():
            losses = getattr(game.method, self.LOSSES[name])
            setattr(game.method, self.LOSSES[name], self._keep(name, losses))
            player.step = self._spy(name, player.step)

    def _keep(self, name, losses):
        def kept(*args, **kwargs):
            self.last[name] = out = losses(*args, **kwargs)
            return out

        return kept

    def _spy(self, name, step):
        def spied(loss):
            terms = self.last.pop(name)
            assert terms["loss"] is loss, "the player steps on the loss its method returned"
            groups = self.groups.items()
            routes = {k: {g for g, params in groups if reaches(v, params)} for k, v in terms.items()}
            before = {g: grad_copies(params) for g, params in groups}
            step(loss)
            changed = {g for g, params in groups if not same_grads(before[g], grad_copies(params))}
            self.calls[name].append({"terms": routes, "changed": changed})

        return spied


def test_teacher_is_frozen_once(tiny, tmp_path, run_of):
    game = run_of(tiny(), tmp_path).game
    assert not game.teacher.training
    assert not any(p.requires_grad for p in game.teacher.parameters())


def test_generator_step_updates_only_the_generator(tiny, tmp_path, run_of):
    # the plain game: no prior in the generator's loss
    game = run_of(tiny(method={"adapt_to_teacher": False}), tmp_path).game
    routes = Routes(game)
    student_before = [p.clone() for p in game.student.parameters()]
    gen_before = [p.clone() for p in game.generator.parameters()]
    losses, (x, t) = game.generator_step()
    assert all(g is not None and g.abs().sum() > 0 for g in grads(game.generator))
    assert all(g is None for g in grads(game.student)), "the generator step must not fill student gradients"
    # ...although its loss reaches the student: a plain backward would have filled them.
    (call,) = routes.calls["g"]
    assert call["terms"]["loss"] == {"g", "s"} and call["terms"]["discrepancy"] == {"g", "s"}
    assert call["changed"] == {"g"}
    assert all(torch.equal(a, b) for a, b in zip(student_before, game.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, game.generator.parameters()))
    # the generator ascends the discrepancy, so its loss is the negated discrepancy
    assert torch.allclose(losses["loss"], -losses["discrepancy"])
    assert not x.requires_grad and not t.requires_grad


def test_a_plain_backward_of_the_generator_loss_would_fill_the_student_gradients(tiny, tmp_path, run_of):
    """What `backward(inputs=generator params)` saves: the same loss, backpropagated in full."""
    game = run_of(tiny(), tmp_path).game
    x = game.generator_player.forward(game.sample_latent())
    teacher_logits, taps = game.method.teacher_forward(game.teacher, x, game.phases)
    losses = game.method.generator_losses(game.student(x), teacher_logits, **taps)
    losses["loss"].backward()
    filled = grads(game.student)
    assert all(g is not None for g in filled) and any(g.abs().sum() > 0 for g in filled)


def test_gradients_flow_through_the_frozen_teacher(tiny, tmp_path, run_of):
    """With the student's term removed, the generator still gets a gradient: through the teacher."""
    game = run_of(tiny(), tmp_path).game
    x = game.generator(game.sample_latent())
    game.teacher(x).logsumexp(1).mean().backward(inputs=list(game.generator.parameters()))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(game.generator))


def test_student_step_updates_only_the_student(tiny, tmp_path, run_of):
    game = run_of(tiny(), tmp_path).game
    routes = Routes(game)
    gen_before = {k: v.clone() for k, v in game.generator.state_dict().items()}
    x, t = game.synthesize()
    assert not x.requires_grad and not t.requires_grad
    game.student_step(x, t)
    assert all(g is not None for g in grads(game.student))
    assert all(g is None for g in grads(game.generator)), "the student step must not fill generator gradients"
    # its loss reaches the student and nothing else: the batch is detached from the generator
    (call,) = routes.calls["s"]
    assert call["terms"] == {"loss": {"s"}} and call["changed"] == {"s"}
    params = dict(game.generator.named_parameters())
    assert all(torch.equal(gen_before[k], v) for k, v in params.items())


def test_full_iteration_routes_each_loss_to_its_player(tiny, tmp_path, run_of):
    for method in (
        {"reuse_samples": False},
        {"reuse_samples": True},
        {"replay_size": 64, "student_shift": 2, "student_flip": True, "student_mixup": 0.5},
        {"generator_ema": 0.5, "generator_ema_mix": 0.25},
        {"generator_shift": 2, "generator_rotate": 15.0, "generator_scale": 0.1},
        {"adversarial_agreed_only": True},
    ):
        run = run_of(tiny(method={**method, "n_student_steps": 2}), tmp_path)
        routes = Routes(run.game)
        for _ in range(2):  # the second iteration starts with the first one's gradients in place
            out = run.step()
        assert set(out) >= {"train/loss_G", "train/loss_S", "train/discrepancy"}
        assert all(not v.requires_grad for v in out.values())
        assert len(routes.calls["g"]) == 2 and len(routes.calls["s"]) == 4, method
        # an untrained student may agree with the teacher on no image: then the masked term
        # reaches only the generator (through the priors)
        reached = {"g"} if method.get("adversarial_agreed_only") else {"g", "s"}
        for call in routes.calls["g"]:
            assert reached <= call["terms"]["loss"] <= {"g", "s"} and call["changed"] == {"g"}, method
        for call in routes.calls["s"]:
            assert call["terms"] == {"loss": {"s"}} and call["changed"] == {"s"}, method


def test_the_generator_step_shows_the_teacher_each_image_shifted_by_its_own_offset(tiny, tmp_path, run_of):
    game = run_of(tiny(method={"generator_shift": 2}), tmp_path).game
    state = game.latent_rng.get_state()
    with torch.no_grad(), game.autocast():
        raw = game.generator(game.sample_latent()).float()
    game.latent_rng.set_state(state)
    _, (x, t) = game.generator_step()
    pad = torch.nn.functional.pad(raw, (2, 2, 2, 2), mode="replicate")
    h, w = raw.shape[-2:]
    offsets = []
    for image, padded in zip(x, pad):
        found = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.allclose(image, padded[:, 2 - dy : 2 - dy + h, 2 - dx : 2 - dx + w], atol=1e-6)
        ]
        assert found, "each image is the generator's own image moved by at most 2 pixels"
        offsets.append(found[0])
    assert len(set(offsets)) > 1, "the offsets differ between the images of a batch"
    with torch.no_grad(), game.autocast():
        relabelled = game.teacher(x).float()
    assert torch.allclose(t, relabelled, atol=1e-5), "the teacher's logits are for the shifted images"


def test_the_generator_step_shows_the_teacher_each_image_turned_and_scaled(tiny, tmp_path, run_of):
    from dfkd.augment import random_rotate_scale

    method = {"generator_rotate": 15.0, "generator_scale": 0.1, "adapt_to_teacher": False}  # no shift
    game = run_of(tiny(method=method), tmp_path).game
    state = game.latent_rng.get_state()
    with torch.no_grad(), game.autocast():
        raw = game.generator(game.sample_latent()).float()
    expected = random_rotate_scale(raw, 15.0, 0.1, game.latent_rng)  # the draws after the latent's
    game.latent_rng.set_state(state)
    _, (x, t) = game.generator_step()
    assert torch.allclose(x, expected, atol=1e-5), "the step's images are the generator's, turned and scaled"
    assert (x - raw).abs().max() > 0.5
    with torch.no_grad(), game.autocast():
        relabelled = game.teacher(x).float()
    assert torch.allclose(t, relabelled, atol=1e-5), "the teacher's logits are for the turned images"


def test_the_averaged_generator_supplies_its_share_of_each_student_batch(tiny, tmp_path, run_of):
    game = run_of(tiny(method={"generator_ema": 0.5, "generator_ema_mix": 0.25}), tmp_path).game
    before = [p.clone() for p in game.generator.parameters()]
    game.iteration(0)
    after = list(game.generator.parameters())
    # the average moved halfway from the old weights towards the new ones
    for avg, old, new in zip(game.batches.generator_average.model.parameters(), before, after):
        assert torch.allclose(avg, 0.5 * old + 0.5 * new.detach(), atol=1e-6)
    latest = game.synthesize()
    x, t = game.batches.draw(latest)
    share = game.batches.average_batch
    assert len(x) == 16 and torch.equal(x[:12], latest[0][:12]) and torch.equal(x[12:], share[0])
    assert torch.equal(t[12:], share[1])


def test_pixel_output_generator_draws_images_in_the_datasets_pixel_range(tiny, tmp_path, run_of):
    run = run_of(tiny(generator={"output": "pixels"}), tmp_path)
    _, (x, _) = run.game.generator_step()
    spec = run.parts.spec
    pixels = x * spec.std[0] + spec.mean[0]
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    # every weight of the generator learns through the pixel-range output layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in run.game.generator.parameters())
