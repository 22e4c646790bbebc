"""The adversarial game on one process: three players and the rules of one iteration. No files.

Gradient routing (ARCHITECTURE.md, "Gradients"):
- The teachers are frozen once (eval, requires_grad False). Gradients still flow *through* them
  into the generator; only the student step runs a teacher under no_grad.
- Generator step: backward(inputs=generator params), so no time goes to student or teacher
  parameter gradients. The student stays in train mode, as in DFAD: the generator attacks the same
  function the student step trains (the student's BN layers, if any, see batch statistics).
- Student step: generator output made under no_grad (detached); teacher under no_grad.
- No host sync: losses stay tensors; the loop converts them once per log interval.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from dfkd import distributed
from dfkd.augment import random_rotate_scale, random_translate
from dfkd.batches import StudentBatches
from dfkd.config import ExperimentConfig
from dfkd.features import capture
from dfkd.latents import LatentSpace
from dfkd.losses import class_unevenness
from dfkd.meta import MetaStart
from dfkd.methods import Setting, build_method
from dfkd.optim import WeightAverage
from dfkd.perf import PhaseTimer, autocast, speed_up
from dfkd.player import Player
from dfkd.pool import TeacherPool
from dfkd.spec import InputSpec
from generators import build_generator


class Side(nn.Module):
    """A player's network with the modules its step also trains (the student's feature adapters,
    the generator's contrastive head), as one module so that DDP averages all of their gradients.
    Its forward is the network's."""

    def __init__(self, net: nn.Module, extras: list[nn.Module]):
        super().__init__()
        self.net, self.extras = net, nn.ModuleList(extras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def latents_for(cfg: ExperimentConfig, spec: InputSpec) -> LatentSpace:
    return LatentSpace(cfg.generator.latent_dim, spec.num_classes if cfg.generator.conditional else 0)


def generator_for(cfg: ExperimentConfig, spec: InputSpec) -> nn.Module:
    g = cfg.generator
    return build_generator(
        g.name, g.latent_dim, g.width, spec.channels, spec.size, g.output, spec.mean, spec.std
    )


def turns(k: int, iterations: int, n_generators: int) -> int:
    """The iterations generator k plays in a run of `iterations` (k, k + N, ...): the length of its
    learning-rate schedule, which steps on its turns only."""
    return max(len(range(k, iterations, n_generators)), 1)


class Game:
    """Generator against student over a pool of frozen teachers (and a discriminator in GAN-KD).
    The student must be built right before the game, from the run's seed (dfkd.assemble)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        spec: InputSpec,
        pool: TeacherPool,
        student: nn.Module,
        student_arch: str,
        device: torch.device,
    ):
        self.cfg, self.spec, self.pool, self.device = cfg, spec, pool, device
        self.phases = PhaseTimer(device)  # off unless `dfkd bench` reads it
        # The teacher this iteration plays against, and the pool member the feature term reads.
        self.teacher, self.feature_teacher = pool.models[0], next(iter(pool.strategy.feature_sources), None)
        self.student = student
        m = cfg.method
        self.latents = latents_for(cfg, spec)
        # the first from the run's random stream; the others each from a seed of their own
        self.generators = [generator_for(cfg, spec).to(device)] + [
            self._generator_from(cfg.train.seed + 104_729 * k).to(device) for k in range(1, m.n_generators)
        ]
        self.turn = 0  # the index of the generator playing this iteration
        self.generator = self.generators[0]  # the one playing it
        self.meta: MetaStart | None = None  # built once the generator's player is (below)
        self.student_average = (
            WeightAverage(student, cfg.train.student_ema) if cfg.train.student_ema > 0 else None
        )
        generator_average = WeightAverage(self.generator, m.generator_ema) if m.generator_ema > 0 else None
        self.method = build_method(m)
        archs = [meta["arch"] for meta in pool.metas]
        # Each process draws its own latents (rank 0, and a single process, from train.seed itself).
        self.latent_rng = torch.Generator().manual_seed(cfg.train.seed + 1000 * distributed.rank())
        self.method.prepare(
            Setting(
                student,
                student_arch,
                pool.models,
                archs,
                pool.strategy.feature_sources,
                cfg.pool.strategy,
                spec,
                device,
                cfg.discriminator,
                self.latent_rng,
            )
        )
        self.batches = StudentBatches(
            m, cfg.train.batch_size, self.latent_rng, self.synthesize, self.label, generator_average
        )
        for net in [*self.networks.values(), *pool.models]:
            speed_up(net, cfg.perf)
        fused, n = cfg.perf.fused_optimizers, cfg.train.iterations
        self.student_player = Player(
            Side(student, self.method.student_modules),
            cfg.student_optim,
            n,
            device,
            fused,
            self.phases,
            "backward (student step)",
        )
        self.student_player.average = self.student_average
        self.generator_players = [
            Player(
                Side(g, self.method.generator_modules),
                cfg.generator_optim,
                turns(k, n, m.n_generators),
                device,
                fused,
                self.phases,
                "backward (generator step)",
            )
            for k, g in enumerate(self.generators)
        ]
        self.generator_player = self.generator_players[0]
        disc = self.method.discriminator
        self.discriminator_player = Player(disc, cfg.discriminator_optim, n, device, fused) if disc else None
        self.meta = self._meta_start(fused) if m.meta_generator else None

    def _meta_start(self, fused: bool) -> MetaStart:
        """The generator's meta-learned start, stepped at the inner rate x the inner steps."""
        m, opt = self.cfg.method, self.cfg.generator_optim
        meta_cfg = dataclasses.replace(opt, lr=opt.lr * m.n_generator_steps)
        with torch.random.fork_rng(devices=[]):  # (its initial weights are overwritten)
            start = generator_for(self.cfg, self.spec).to(self.device)
        start.load_state_dict(self.generator.state_dict())
        player = Player(start, meta_cfg, self.cfg.train.iterations, self.device, fused)
        return MetaStart(m.meta_generator, player)

    # ---- what the run holds ---------------------------------------------------------------
    def schedule_length(self, player: Player, iterations: int) -> int:
        """The steps `player`'s learning-rate schedule spans in a run of `iterations`: a generator's
        schedule steps on its own turns only."""
        generators = self.generator_players
        if player not in generators:
            return iterations
        return turns(generators.index(player), iterations, len(generators))

    @property
    def players(self) -> dict[str, Player]:
        """Student (s), generator (g; g1, g2, ... for the ones taking turns with it), discriminator
        (d), the generator's meta start (m), by checkpoint key."""
        out = {"s": self.student_player, "g": self.generator_players[0]}
        out.update({f"g{k}": p for k, p in enumerate(self.generator_players[1:], 1)})
        if self.discriminator_player is not None:
            out["d"] = self.discriminator_player
        if self.meta is not None:
            out["m"] = self.meta.player
        return out

    @property
    def networks(self) -> dict[str, nn.Module]:
        """Every trained network of the run, by checkpoint key."""
        m = self.method
        adapters = getattr(m, "feature_adapters", None)
        nets = {
            "student": self.student,
            "generator": self.generators[0],
            **{f"generator_{k}": g for k, g in enumerate(self.generators[1:], 1)},
            "ema": self.student_average.model if self.student_average else None,
            "generator_ema": self.batches.generator_average.model if self.batches.generator_average else None,
            "discriminator": m.discriminator,
            "adapter": getattr(m, "adapter", None),
            "feature_adapters": adapters if adapters is not None and len(adapters) else None,
            "contrast": getattr(m, "contrast", None),
            "generator_meta": self.meta.module if self.meta is not None else None,
        }
        return {k: v for k, v in nets.items() if v is not None}

    @property
    def deployed_student(self) -> nn.Module:
        """What is evaluated and saved: the weight average when there is one, else the student."""
        return self.student_average.model if self.student_average is not None else self.student

    @property
    def images_per_iteration(self) -> int:
        """Synthetic images the student trains on per iteration, over all processes."""
        return self.cfg.method.n_student_steps * self.cfg.train.batch_size * distributed.world_size()

    def autocast(self):
        return autocast(self.cfg.perf, self.device)

    def _generator_from(self, seed: int) -> nn.Module:
        """A generator whose weights are drawn from `seed`, the run's own random streams untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return generator_for(self.cfg, self.spec)

    def reset_generator(self, index: int, seed: int) -> None:
        """Fresh weights for generator `index` (drawn from `seed`) and a fresh optimizer state; the
        module itself stays, so its wrappers stay valid."""
        fresh = self._generator_from(seed)
        self.generators[index].load_state_dict(fresh.state_dict())
        self.generator_players[index].optimizer.state.clear()
        if self.meta is not None:  # (a meta start, like an averaged generator, has one generator)
            self.meta.reset(fresh.state_dict())
        # nothing of the collapsed generator feeds the student
        self.batches.forget(fresh.state_dict(), owner=index)

    # ---- the steps ------------------------------------------------------------------------
    def sample_latent(self, n: int | None = None) -> torch.Tensor:
        z = self.latents.draw(n or self.cfg.train.batch_size, self.latent_rng)
        return z.to(self.device, non_blocking=True)

    @torch.no_grad()
    def synthesize(self, generator: nn.Module | None = None, n: int | None = None):
        """A detached synthetic batch (of `n` images from `generator`, by default a full batch from
        the live one) and the teacher's logits for it."""
        with self.autocast(), self.phases("generator forward"):
            x = (generator or self.generator)(self.sample_latent(n)).float()
        return x, self.label(x)

    @torch.no_grad()
    def label(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for `x` in float32, its forward at the game's precision."""
        with self.autocast(), self.phases("teacher forward"):
            return self.teacher(x).float()

    def jitter(self, x: torch.Tensor) -> torch.Tensor:
        """DeepInversion's jitter on a generator batch: each image shifted, then turned and scaled,
        by its own random amount (as method.generator_shift / _rotate / _scale allow)."""
        m = self.cfg.method
        if m.generator_shift:
            x = random_translate(x, m.generator_shift, self.latent_rng)
        if m.generator_rotate or m.generator_scale:
            x = random_rotate_scale(x, m.generator_rotate, m.generator_scale, self.latent_rng)
        return x

    def memory_classes(self, classes: int) -> torch.Tensor:
        """The share of the replay memory's images in each class the teacher reads (its top logit);
        an empty memory reads as even."""
        memory = self.batches.memory
        if not memory.size:
            return torch.full((classes,), 1.0 / classes, device=self.device)
        return top_class_counts(memory.logits[: memory.size]) / memory.size

    def generator_step(self) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """One ascent step; also returns its batch, detached, with the teacher's logits for reuse."""
        phase = self.phases
        with self.autocast():
            with phase("generator forward"):
                z = self.sample_latent()
                x = self.generator_player.forward(z)
                x = self.jitter(x)
            teacher_logits, taps = self.method.teacher_forward(self.teacher, x, phase)
            if self.latents.conditional:
                taps["targets"] = self.latents.targets(z)
            if "memory_classes" in self.method.taps:
                taps["memory_classes"] = self.memory_classes(teacher_logits.shape[1])
            with phase("student forward"):
                student_logits = self.student(x)
            with phase("losses"):
                # (losses in float32 whatever the forward's precision: perf.autocast)
                losses = self.method.generator_losses(student_logits.float(), teacher_logits.float(), **taps)
                if "memory_classes" in taps:
                    losses["memory_uneven"] = class_unevenness(taps["memory_classes"])
        self.generator_player.step(losses["loss"])
        return losses, (x.detach().float(), teacher_logits.detach().float())

    def generator_steps(self, n: int) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """`n` ascent steps; returns the last one's losses and batch. With a meta-learned start
        (Fast-DFKD), the steps begin from it and it moves once they are done."""
        if self.meta is not None:
            self.meta.begin(self.generator, self.generator_player)
        for _ in range(n):
            out = self.generator_step()
            if self.meta is not None:
                self.meta.observe(self.generator)
        if self.meta is not None:
            self.meta.end(self.generator)
        return out

    def student_step(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[dict, dict]:
        """Discriminator steps (when there is one) then one student step, on one batch. Returns
        the student's losses and the last discriminator step's (empty without one)."""
        pairs, phase, method = self.method.layer_pairs, self.phases, self.method
        with self.autocast():
            with capture(self.student, [s for s, _ in pairs]) as fs, phase("student forward"):
                logits = self.student_player.forward(x)
            ft = {}
            if pairs:
                teacher = self.pool.models[self.feature_teacher]
                with torch.no_grad(), capture(teacher, [t for _, t in pairs]) as ft, phase("teacher forward"):
                    teacher(x)
            feature_pairs = method.feature_pairs(fs, ft)
            d_losses, d_fake = {}, None
            if self.discriminator_player is not None:
                real, fake = method.discriminator_views(logits, teacher_logits, fs, ft)
                with phase("discriminator"):
                    for _ in range(method.discriminator_steps):
                        d_losses = self.discriminator_step(real, fake.detach())
                    d_fake = method.discriminator(fake)
            with phase("losses"):
                losses = method.student_losses(logits.float(), teacher_logits.float(), feature_pairs, d_fake)
        self.student_player.step(losses["loss"])  # never into the discriminator
        return losses, d_losses

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        player = self.discriminator_player
        losses = self.method.discriminator_losses(player.forward(real), player.forward(fake))
        player.step(losses["loss"])
        return losses

    def iteration(self, step: int) -> dict[str, torch.Tensor]:
        """Iteration `step` (0-based): generator step(s), then the student steps; returns its
        metrics as detached tensors."""
        m = self.cfg.method
        self.teacher, self.feature_teacher = self.pool.choose(step)
        self.turn = turn = step % m.n_generators
        self.generator, self.generator_player = self.generators[turn], self.generator_players[turn]
        g_losses, latest = self.generator_steps(m.n_generator_steps)
        self.batches.refresh(latest, owner=turn)
        for _ in range(m.n_student_steps):
            s_losses, d_losses = self.student_step(*self.batches.draw(latest))
        for player in self.players.values():
            if player is self.generator_player or player not in self.generator_players:
                player.schedule.step()
        return iteration_metrics(latest[1], g_losses, s_losses, d_losses)


def iteration_metrics(
    teacher_logits: torch.Tensor, generator_losses: dict, student_losses: dict, discriminator_losses: dict
) -> dict[str, torch.Tensor]:
    classes = top_class_counts(teacher_logits)
    # A generator collapsing onto few classes shows here first.
    out = {
        "train/loss_G": generator_losses["loss"],
        "train/loss_S": student_losses["loss"],
        "train/top_class_frac": classes.max() / classes.sum(),
    }
    out.update({f"train/{k}": v for k, v in generator_losses.items() if k != "loss"})
    out.update({f"train/loss_S_{k}": v for k, v in student_losses.items() if k != "loss"})
    if discriminator_losses:
        out.update({"train/loss_D": discriminator_losses["loss"], "train/acc_D": discriminator_losses["acc"]})
    return {k: v.detach() for k, v in out.items()}


def top_class_counts(logits: torch.Tensor) -> torch.Tensor:
    """How many rows each class tops, as floats. Not bincount: on CUDA it reads the largest label
    back to size its output, a host sync."""
    top = logits.argmax(1)
    ones = torch.ones_like(top, dtype=torch.float)
    return torch.zeros(logits.shape[1], device=top.device).index_add_(0, top, ones)
