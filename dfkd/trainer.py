"""The training loop. It owns every gradient mechanic; methods only return losses.

Gradient routing (see DESIGN.md):
- The teacher is frozen once (eval, requires_grad False). Gradients still flow *through* it into
  the generator; only the student step runs it under no_grad.
- Generator step: backward(inputs=generator params), so no time goes to student or teacher
  parameter gradients. The student stays in train mode, as in DFAD: the generator attacks the same
  function the student step trains (the student zoo's BN layers, if any, see batch statistics).
- Student step: generator output made under no_grad (detached); teacher under no_grad.
- No host sync in the inner loop: losses accumulate as tensors, converted once per log interval.
"""
from __future__ import annotations

import copy
import json
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm.auto import tqdm

from dfkd import distributed
from dfkd.augment import random_hflip, random_mixup, random_translate
from dfkd.checkpoint import load_safe, load_weights, save_atomic
from dfkd.config import ExperimentConfig, GeneratorConfig, OptimizerConfig, config_to_dict
from dfkd.data import Dataset, DatasetInfo, load_dataset
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy, agreement, predictions
from dfkd.features import Adapter, capture, find_layers, layer_shapes
from dfkd.health import CollapseMonitor, first_non_finite
from dfkd.losses import FEATURE_LOSSES
from dfkd.methods import build_method
from dfkd.perf import PhaseTimer, autocast, check_perf, speed_up
from dfkd.models import build_classifier
from dfkd.replay import ReplayMemory
from dfkd.pool import load_pool
from dfkd.teachers import classifier_meta, save_classifier
from dfkd.tracking import NullTracker, Tracker
from discriminators import DISCRIMINATORS, build_discriminator
from generators import build_generator

N_FIXED_SAMPLES = 64


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DfkdError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    if name == "cuda" and distributed.world_size() > 1:
        return torch.device("cuda", distributed.local_rank())
    return torch.device(name)


def generator_from_config(cfg: GeneratorConfig, info: DatasetInfo, image_size: int) -> nn.Module:
    return build_generator(cfg.name, cfg.latent_dim, cfg.width, info.channels, image_size, cfg.output, info.mean, info.std)


def build_optimizer(params, cfg: OptimizerConfig, fused: bool = False) -> torch.optim.Optimizer:
    kernel = {"fused": True} if fused else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **kernel)
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **kernel)


def build_schedule(opt: torch.optim.Optimizer, cfg: OptimizerConfig, iterations: int):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    avg_p, p = list(average.parameters()), list(model.parameters())
    torch._foreach_lerp_(avg_p, p, 1.0 - decay)
    for a, b in zip(average.buffers(), model.buffers()):
        a.copy_(b)


def batchnorm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers (with running statistics) of a model, by path."""
    return {p: m for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def scale_lr(opt: torch.optim.Optimizer, sched, factor: float) -> None:
    """Multiply the current and scheduled learning rates by `factor`."""
    for group in opt.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    sched.base_lrs = [lr * factor for lr in sched.base_lrs]


def warn(message: str) -> None:
    tqdm.write(f"dfkd: warning: {message}", file=sys.stderr)


def _every(step: int, interval: int, last: int) -> bool:
    return step % interval == 0 or step == last


class StudentSide(nn.Module):
    """The student with the adapters its features pass through: everything the student step trains,
    as one module so that DDP averages all of its gradients. Its forward is the student's."""

    def __init__(self, student: nn.Module, adapters: list[nn.Module]):
        super().__init__()
        self.student, self.adapters = student, nn.ModuleList(adapters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.student(x)


class Trainer:
    """Data-free adversarial distillation of a teacher (or a pool of them) into one student, in `run_dir`.
    Under torchrun each process runs this with its own synthetic batches; rank 0 writes the files."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, dataset: Dataset | None = None, progress: bool = True):
        self.main = distributed.is_main()
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress and self.main
        self.device = resolve_device(cfg.train.device)
        check_perf(cfg.perf, self.device)
        self.phases = PhaseTimer(self.device)  # off unless `dfkd bench` reads it
        self.dataset = dataset or load_dataset(cfg.data)
        with distributed.main_first():  # one process trains and caches a missing teacher
            self.pool = load_pool(cfg, self.dataset, self.device, self.progress)
        # The teacher this iteration plays against, and the pool member the feature term reads.
        self.teacher, self.feature_teacher = self.pool.models[0], next(iter(self.pool.strategy.feature_sources), None)
        torch.manual_seed(cfg.train.seed)
        info = self.dataset.info
        self.student = build_classifier(cfg.student.arch, info.channels, info.num_classes, cfg.data.image_size).to(self.device)
        self.generator = generator_from_config(cfg.generator, info, cfg.data.image_size).to(self.device)
        self.ema = copy.deepcopy(self.student).requires_grad_(False) if cfg.train.student_ema > 0 else None
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False) if cfg.method.generator_ema > 0 else None
        self.ema_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.method = build_method(cfg.method)
        self.memory = ReplayMemory(cfg.method.replay_size) if cfg.method.replay_size else None
        self._check_prior_taps()
        self._check_feature_layers()
        self.discriminator, self.adapter = self._build_discriminator()
        self.feature_adapters = self._build_feature_adapters()
        for net in [*self.networks.values(), *self.pool.models]:
            speed_up(net, cfg.perf)
        self.student_side = StudentSide(self.student, [self.feature_adapters, *([self.adapter] if self.adapter else [])])
        self.student_params = list(self.student_side.parameters())
        # The forward passes that train a network go through these: DDP wrappers under torchrun.
        self.train_student = distributed.wrap(self.student_side, self.device)
        self.train_generator = distributed.wrap(self.generator, self.device)
        self.train_discriminator = distributed.wrap(self.discriminator, self.device) if self.discriminator else None
        fused = cfg.perf.fused_optimizers
        self.opt_s = build_optimizer(self.student_params, cfg.student_optim, fused)
        self.opt_g = build_optimizer(self.generator.parameters(), cfg.generator_optim, fused)
        self.sched_s = build_schedule(self.opt_s, cfg.student_optim, cfg.train.iterations)
        self.sched_g = build_schedule(self.opt_g, cfg.generator_optim, cfg.train.iterations)
        if self.discriminator is not None:
            self.opt_d = build_optimizer(self.discriminator.parameters(), cfg.discriminator_optim, fused)
            self.sched_d = build_schedule(self.opt_d, cfg.discriminator_optim, cfg.train.iterations)
        # Each process draws its own latents (rank 0, and a single process, from train.seed itself).
        self.latent_rng = torch.Generator().manual_seed(cfg.train.seed + 1000 * distributed.rank())
        # One fixed latent batch makes sample grids comparable over time.
        self.fixed_z = torch.randn(N_FIXED_SAMPLES, cfg.generator.latent_dim, generator=torch.Generator().manual_seed(cfg.train.seed + 1))
        self.step = 0
        self.wall_s = 0.0
        self.best_acc = 0.0
        self.rollbacks = 0
        self.collapse = CollapseMonitor(cfg.train.collapse_threshold, cfg.train.collapse_patience)
        self.run_id = uuid.uuid4().hex[:8]
        self.teacher_preds = [predictions(t, self.dataset.test, self.device) for t in self.pool.models]
        self.teacher_accs = [agreement(p, self.dataset.test.labels) for p in self.teacher_preds]
        self.teacher_acc = max(self.teacher_accs)  # ratios are against the best single teacher

    # ---- the game -------------------------------------------------------------------------
    def sample_latent(self, n: int | None = None) -> torch.Tensor:
        z = torch.randn(n or self.cfg.train.batch_size, self.cfg.generator.latent_dim, generator=self.latent_rng)
        return z.to(self.device, non_blocking=True)

    def generator_step(self) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """One ascent step; also returns its batch, detached, with the teacher's logits for reuse."""
        phase = self.phases
        with self.autocast():
            with phase("generator forward"):
                x = self.train_generator(self.sample_latent())
            teacher_logits, taps = self._teacher_with_taps(x)
            with phase("student forward"):
                student_logits = self.student(x)
            with phase("losses"):
                # (losses in float32 whatever the forward's precision: perf.autocast)
                losses = self.method.generator_losses(student_logits.float(), teacher_logits.float(), **taps)
        with phase("optimizer"):
            self.opt_g.zero_grad(set_to_none=True)
        with phase("backward (generator step)"):
            losses["loss"].backward(inputs=list(self.generator.parameters()))
        with phase("optimizer"):
            self._clip(self.generator.parameters(), self.cfg.generator_optim)
            self.opt_g.step()
        return losses, (x.detach().float(), teacher_logits.detach().float())

    def autocast(self):
        return autocast(self.cfg.perf, self.device)

    def _teacher_with_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The teacher's logits, and what the generator's priors read inside it on the way."""
        wanted = self.method.taps
        bn_layers = batchnorm_layers(self.teacher) if "bn_inputs" in wanted else {}
        act = [self.cfg.method.activation_layer] if "activation" in wanted else []
        with capture(self.teacher, list(bn_layers), inputs=True) as bn_in, capture(self.teacher, act) as acts, \
                self.phases("teacher forward"):  # fmt: skip
            logits = self.teacher(x)
        taps = {"bn_inputs": [(bn_in[p], m.running_mean, m.running_var) for p, m in bn_layers.items()]} if bn_layers else {}
        if act:
            taps["activation"] = acts[act[0]]
        if "images" in wanted:
            taps["images"] = x
        return logits, taps

    @torch.no_grad()
    def synthesize(self, generator: nn.Module | None = None, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A detached synthetic batch (of `n` images from `generator`, by default a full batch from
        the live one) and the teacher's logits for it."""
        with self.autocast():
            with self.phases("generator forward"):
                x = (generator or self.generator)(self.sample_latent(n))
            with self.phases("teacher forward"):
                return x.float(), self.teacher(x).float()

    @property
    def layer_pairs(self) -> list[list[str]]:
        """[student layer, teacher layer] pairs read this run: feature terms, then the discriminator's."""
        d = self.cfg.discriminator.layers if self.method.uses_discriminator else []
        return [*self.cfg.method.features, *([d] if d else [])]

    def _check_prior_taps(self) -> None:
        archs = ", ".join(meta["arch"] for meta in self.pool.metas)
        if "bn_inputs" in self.method.taps and not any(batchnorm_layers(m) for m in self.pool.models):
            raise DfkdError(f"method.priors.bn matches the teacher's BatchNorm statistics, but no teacher has "
                            f"BatchNorm layers ({archs}); drop the bn prior or use a teacher with BatchNorm")  # fmt: skip
        if "activation" in self.method.taps:
            layer = self.cfg.method.activation_layer
            if not layer:
                raise DfkdError("method.priors.activation reads a teacher layer: set method.activation_layer "
                                "(the penultimate one in DAFL; dfkd layers ARCH lists them)")  # fmt: skip
            self._need_one_teacher_per_iteration("method.priors.activation")
            for model, meta in zip(self.pool.models, self.pool.metas):
                find_layers(model, [layer], f"teacher {meta['arch']}")

    def _check_feature_layers(self) -> None:
        pairs = self.layer_pairs
        if not pairs:
            return
        self._need_one_teacher_per_iteration("feature layers")
        find_layers(self.student, [s for s, _ in pairs], f"student {self.cfg.student.arch}")
        for i in self.pool.strategy.feature_sources:
            find_layers(self.pool.models[i], [t for _, t in pairs], f"teacher {self.pool.metas[i]['arch']}")

    def _need_one_teacher_per_iteration(self, what: str) -> None:
        if not self.pool.strategy.feature_sources:
            raise DfkdError(f"{what} read one teacher's layers per iteration; pool.strategy="
                            f"{self.cfg.pool.strategy} mixes several: use random, round_robin or split")  # fmt: skip

    def _build_discriminator(self) -> tuple[nn.Module | None, nn.Module | None]:
        """The discriminator (None unless the method uses one), and the student's feature adapter
        when the discriminator reads a student layer whose shape differs from the teacher's."""
        if not self.method.uses_discriminator:
            return None, None
        d, info = self.cfg.discriminator, self.dataset.info
        reads = DISCRIMINATORS.get(d.name).reads
        if reads == "features" and not d.layers:
            raise DfkdError(f"discriminator.name={d.name} reads feature maps: set discriminator.layers "
                            "[student_layer, teacher_layer], or use discriminator.name=mlp on outputs")  # fmt: skip
        if reads == "outputs" and d.layers:
            raise DfkdError(f"discriminator.name={d.name} reads class probabilities; for discriminator.layers "
                            "use conv or feature_mlp")  # fmt: skip
        if not d.layers:
            return build_discriminator(d.name, info.num_classes, d.width, d.spectral_norm).to(self.device), None
        s_shape, t_shape = self._pair_shapes(*d.layers)
        adapter = None if s_shape == t_shape else Adapter(s_shape, t_shape).to(self.device)
        return build_discriminator(d.name, t_shape[0], d.width, d.spectral_norm).to(self.device), adapter

    def _build_feature_adapters(self) -> nn.ModuleList:
        """One adapter per method.features pair, for terms that compare same-shaped features
        (an identity where the shapes already match)."""
        m = self.cfg.method
        term = FEATURE_LOSSES.get(m.feature_loss)
        shapes = [self._pair_shapes(s, t) for s, t in m.features]
        for (s, t), (a, b) in zip(m.features, shapes):
            if getattr(term, "needs_maps", False) and (len(a) != 3 or len(b) != 3):
                raise DfkdError(f"method.feature_loss={m.feature_loss} compares spatial maps, but {s!r} gives "
                                f"{a} and {t!r} gives {b}; pick convolutional layers (dfkd layers ARCH)")  # fmt: skip
        if not getattr(term, "needs_adapter", False):
            return nn.ModuleList(nn.Identity() for _ in shapes)
        return nn.ModuleList(nn.Identity() if a == b else Adapter(a, b) for a, b in shapes).to(self.device)

    def _pair_shapes(self, s_path: str, t_path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Output shapes (without the batch) of a student layer and of the teacher layer it meets."""
        size = self.cfg.data.image_size
        shape = (self.dataset.info.channels, size, size)
        s_shape = dict((p, sh) for p, _, sh in layer_shapes(self.student, shape))[s_path]
        t_shapes = {dict((p, sh) for p, _, sh in layer_shapes(self.pool.models[i], shape))[t_path]
                    for i in self.pool.strategy.feature_sources}  # fmt: skip
        if len(t_shapes) > 1:
            raise DfkdError(f"teacher layer {t_path!r} differs in shape across the pool ({sorted(t_shapes)}); "
                            "use pool.strategy=split to read one teacher")  # fmt: skip
        return s_shape, t_shapes.pop()

    def student_step(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[dict, dict]:
        """Discriminator steps (when there is one) then one student step, on one batch. Returns
        the student's losses and the last discriminator step's (empty without one)."""
        pairs, phase = self.layer_pairs, self.phases
        with self.autocast():
            with capture(self.student, [s for s, _ in pairs]) as fs, phase("student forward"):
                logits = self.train_student(x)
            ft = {}
            if pairs:
                i = self.feature_teacher
                with torch.no_grad(), capture(self.pool.models[i], [t for _, t in pairs]) as ft, phase("teacher forward"):
                    self.pool.models[i](x)
            feature_pairs = [(adapt(fs[s]), ft[t]) for adapt, (s, t) in zip(self.feature_adapters, self.cfg.method.features)]
            d_losses, d_fake = {}, None
            if self.discriminator is not None:
                real, fake = self._discriminator_views(logits, teacher_logits, fs, ft)
                with phase("discriminator"):
                    for _ in range(self.cfg.discriminator.steps):
                        d_losses = self.discriminator_step(real, fake.detach())
                    d_fake = self.discriminator(fake)
            with phase("losses"):
                losses = self.method.student_losses(logits.float(), teacher_logits.float(), feature_pairs, d_fake)
        with phase("optimizer"):
            self.opt_s.zero_grad(set_to_none=True)
        with phase("backward (student step)"):
            losses["loss"].backward(inputs=self.student_params)  # never into the discriminator
        with phase("optimizer"):
            self._clip(self.student_params, self.cfg.student_optim)
            self.opt_s.step()
            if self.ema is not None:
                ema_update(self.ema, self.student, self.cfg.train.student_ema)
        return losses, d_losses

    def _discriminator_views(self, logits, teacher_logits, fs, ft) -> tuple[torch.Tensor, torch.Tensor]:
        """What the discriminator compares: the teacher's (real) and the student's (fake)
        temperature-softened probabilities, or their feature maps at discriminator.layers."""
        layers = self.cfg.discriminator.layers
        if not layers:
            tau = self.cfg.method.temperature
            return F.softmax(teacher_logits / tau, dim=1), F.softmax(logits / tau, dim=1)
        s_path, t_path = layers
        return ft[t_path], fs[s_path] if self.adapter is None else self.adapter(fs[s_path])

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.train_discriminator
        losses = self.method.discriminator_losses(d(real), d(fake))
        self.opt_d.zero_grad(set_to_none=True)
        losses["loss"].backward(inputs=list(self.discriminator.parameters()))
        self._clip(self.discriminator.parameters(), self.cfg.discriminator_optim)
        self.opt_d.step()
        return losses

    def student_batch(self, latest: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory is not None:
            batch = self.memory.sample(self.cfg.train.batch_size, self.latent_rng)
        else:
            batch = latest if self.cfg.method.reuse_samples else self.synthesize()
        m = self.cfg.method
        if self.ema_batch is not None:  # the averaged generator's share of the batch
            keep = len(batch[0]) - len(self.ema_batch[0])
            batch = tuple(torch.cat([a[:keep], b]) for a, b in zip(batch, self.ema_batch))
        if m.student_shift or m.student_flip or m.student_mixup:
            with torch.no_grad():
                x, rng = batch[0], self.latent_rng
                x = random_translate(x, m.student_shift, rng) if m.student_shift else x
                x = random_hflip(x, rng) if m.student_flip else x
                x = random_mixup(x, m.student_mixup, rng) if m.student_mixup else x
                batch = (x, self.teacher(x))
        return batch

    def iteration(self) -> dict[str, torch.Tensor]:
        m = self.cfg.method
        self.teacher, self.feature_teacher = self.pool.choose(self.step)
        for _ in range(m.n_generator_steps):
            g, latest = self.generator_step()
        if self.memory is not None:
            self.memory.add(*latest)
        if self.generator_ema is not None:
            ema_update(self.generator_ema, self.generator, m.generator_ema)
            self.ema_batch = self.synthesize(self.generator_ema, max(1, round(m.generator_ema_mix * self.cfg.train.batch_size)))
        for _ in range(m.n_student_steps):
            s, d = self.student_step(*self.student_batch(latest))
        for _, sched in self.optimizers.values():
            sched.step()
        top = latest[1].argmax(1)
        # (not bincount: on CUDA it reads the largest label back to size its output, a host sync)
        classes = torch.zeros(latest[1].shape[1], device=top.device).index_add_(0, top, torch.ones_like(top, dtype=torch.float))
        # A generator collapsing onto few classes shows here first.
        out = {"train/loss_G": g["loss"], "train/loss_S": s["loss"], "train/top_class_frac": classes.max() / classes.sum()}
        out.update({f"train/{k}": v for k, v in g.items() if k != "loss"})
        out.update({f"train/loss_S_{k}": v for k, v in s.items() if k != "loss"})
        if d:
            out.update({"train/loss_D": d["loss"], "train/acc_D": d["acc"]})
        return {k: v.detach() for k, v in out.items()}

    @staticmethod
    def _clip(params, cfg: OptimizerConfig) -> None:
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)

    # ---- the loop -------------------------------------------------------------------------
    @property
    def deployed_student(self) -> nn.Module:
        """What is evaluated and saved: the weight average when EMA is on, else the student."""
        return self.ema if self.ema is not None else self.student

    @property
    def images_per_iteration(self) -> int:
        """Synthetic images the student trains on per iteration, over all processes."""
        return self.cfg.method.n_student_steps * self.cfg.train.batch_size * distributed.world_size()

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    def fit(self, stop_at: int | None = None) -> dict | None:
        """Train to train.iterations and return the summary; or pause after step `stop_at`, with a
        checkpoint, and return None (resume with load_checkpoint and fit again)."""
        cfg = self.cfg.train
        stop = min(stop_at or cfg.iterations, cfg.iterations)
        tracker = self._open_tracker()
        if self.step == 0:
            tracker.log(self.teacher_metrics(), step=0)
            self.save_checkpoint()  # the state a divergence before the first checkpoint rolls back to
        bar = tqdm(total=cfg.iterations, initial=self.step, desc="distill", disable=not self.progress, unit="it")
        start = time.perf_counter() - self.wall_s
        try:
            self._loop(stop, tracker, bar, start)
        except BaseException as err:
            bar.close()
            interrupted = isinstance(err, KeyboardInterrupt)  # Ctrl-C or SIGTERM: keep the work done so far
            if interrupted and self.non_finite({}) is None:
                self.wall_s = time.perf_counter() - start
                self.save_checkpoint()
            tracker.finish(exit_code=getattr(err, "exit_code", 130) if interrupted else 1)
            raise
        bar.close()
        if self.step < cfg.iterations:
            self.save_checkpoint()
            tracker.finish()
            return None
        summary = self.finish(tracker)
        tracker.finish()
        return summary

    def _open_tracker(self) -> Tracker | NullTracker:
        """The run's record (rank 0's alone under torchrun): config.yaml, metrics.jsonl and W&B."""
        if not self.main:
            return NullTracker()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(_yaml_dump(config_to_dict(self.cfg)))
        return Tracker(self.run_dir, self.cfg.tracking, config_to_dict(self.cfg), self.run_id,
                       resume_step=self.step if self.step else None)  # fmt: skip

    def _loop(self, stop: int, tracker: Tracker, bar, start: float) -> None:
        cfg = self.cfg.train
        sums: dict[str, torch.Tensor] = {}
        count = 0
        last_log = time.perf_counter()
        while self.step < stop:
            for k, v in self.iteration().items():
                sums[k] = sums[k] + v if k in sums else v
            count += 1
            self.step += 1
            bar.update(1)
            step, last = self.step, cfg.iterations
            log_now, checkpoint_now = _every(step, cfg.log_every, last), _every(step, cfg.checkpoint_every, last)
            # A checkpoint is only ever written from a healthy state.
            if log_now or checkpoint_now:
                cause = self.non_finite(sums)
                if cause is not None:
                    self.roll_back(cause, tracker)
                    bar.n = self.step
                    bar.refresh()
                    sums, count, last_log = {}, 0, time.perf_counter()
                    continue
            if log_now:
                now = time.perf_counter()
                metrics = {k: v / count for k, v in zip(sums, torch.stack(list(sums.values())).tolist())}
                metrics["perf/student_images_per_s"] = count * self.images_per_iteration / max(now - last_log, 1e-9)
                metrics["train/lr_S"] = self.opt_s.param_groups[0]["lr"]
                metrics["health/collapse"] = self._check_collapse(metrics["train/top_class_frac"])
                if len(self.pool) > 1:
                    metrics.update({f"pool/uses_{n}": u for n, u in zip(self.pool.names, self.pool.uses)})
                tracker.log(metrics, step)
                bar.set_postfix(loss_S=f"{metrics['train/loss_S']:.3f}", best=f"{self.best_acc:.1f}")
                sums, count, last_log = {}, 0, now
            if _every(step, cfg.eval_every, last) and self.main:
                evals = self.evaluate()
                tracker.log(evals, step)
                bar.set_postfix(acc=f"{evals['eval/student_acc']:.1f}", best=f"{self.best_acc:.1f}")
            if _every(step, cfg.sample_every, last) and self.main:
                path = self.save_samples()
                tracker.log_image("train/samples", path, step)
            self.wall_s = time.perf_counter() - start
            if checkpoint_now:
                self.save_checkpoint()

    @property
    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, object]]:
        """Each player's optimizer and schedule: student (s), generator (g), discriminator (d)."""
        players = {"s": (self.opt_s, self.sched_s), "g": (self.opt_g, self.sched_g)}
        if self.discriminator is not None:
            players["d"] = (self.opt_d, self.sched_d)
        return players

    def non_finite(self, losses: dict[str, torch.Tensor]) -> str | None:
        """What is NaN or Inf, if anything; under torchrun every rank gets an answer when any finds one."""
        cause = first_non_finite(losses, {k: m for k, m in self.networks.items() if k not in ("ema", "generator_ema")})
        if distributed.any_rank(cause is not None) and cause is None:
            cause = "value on another process"
        return cause

    def roll_back(self, cause: str, tracker: Tracker) -> None:
        """Reload the last good checkpoint with lowered learning rates; stop after max_rollbacks."""
        cfg = self.cfg.train
        detected_at, rollbacks = self.step, self.rollbacks + 1
        if rollbacks > cfg.max_rollbacks:
            raise DfkdError(
                f"training diverged: non-finite {cause} at step {detected_at}, after {self.rollbacks} rollback(s); "
                "lower student_optim.lr and generator_optim.lr or set student_optim.grad_clip"
            )
        self.load_checkpoint(self.checkpoint_path)
        self.rollbacks = rollbacks
        for opt, sched in self.optimizers.values():
            scale_lr(opt, sched, cfg.rollback_lr_factor)
        tracker.rewind(self.step)
        tracker.log({"health/rollbacks": rollbacks, "health/diverged_at": detected_at}, self.step)
        warn(f"non-finite {cause} at step {detected_at}: rolled back to step {self.step} with learning rates "
             f"x{cfg.rollback_lr_factor} ({rollbacks}/{cfg.max_rollbacks})")  # fmt: skip

    def _check_collapse(self, top_class_frac: float) -> float:
        was = self.collapse.streak >= self.collapse.patience
        collapsed = self.collapse.update(top_class_frac)
        if collapsed and not was:
            warn(f"generator collapse? the teacher puts {top_class_frac:.0%} of synthetic images in one class "
                 f"(over {self.collapse.patience} log intervals); see samples/ and consider method.priors")  # fmt: skip
        return float(collapsed)

    def teacher_metrics(self) -> dict[str, float]:
        out = {"teacher/acc": self.teacher_acc}
        if len(self.pool) > 1:
            out.update({f"teacher/acc_{n}": a for n, a in zip(self.pool.names, self.teacher_accs)})
            out["teacher/ensemble_acc"] = accuracy(self.pool.ensemble(), self.dataset.test, self.device)
        return out

    def evaluate(self) -> dict[str, float]:
        preds = predictions(self.deployed_student, self.dataset.test, self.device)
        acc = agreement(preds, self.dataset.test.labels)
        self.best_acc = max(self.best_acc, acc)
        evals = {"eval/student_acc": acc, "eval/best_student_acc": self.best_acc, "eval/ratio": acc / self.teacher_acc}
        if len(self.pool) > 1:  # how closely the student follows each teacher
            evals.update({f"eval/agree_{n}": agreement(preds, p) for n, p in zip(self.pool.names, self.teacher_preds)})
        if self.ema is not None:
            evals["eval/raw_student_acc"] = accuracy(self.student, self.dataset.test, self.device)
        return evals

    @torch.no_grad()
    def save_samples(self) -> Path:
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.generator.eval()  # eval BN: the fixed batch does not shift the running statistics
        images = self.generator(self.fixed_z.to(self.device))
        self.generator.train()
        save_image(self.dataset.denormalize(images).cpu(), path, nrow=8)
        return path

    def finish(self, tracker: Tracker) -> dict:
        acc = accuracy(self.deployed_student, self.dataset.test, self.device)
        self.best_acc = max(self.best_acc, acc)
        cfg = self.cfg.train
        summary = {
            "teacher_acc": self.teacher_acc,
            "student_acc": acc,
            "best_student_acc": self.best_acc,
            "ratio": acc / self.teacher_acc,
            "iterations": self.step,
            "wall_s": round(self.wall_s, 2),
            "images_per_s": round(self.step * self.images_per_iteration / max(self.wall_s, 1e-9), 1),
            "teacher_accs": self.teacher_accs,
            "teacher_archs": [meta["arch"] for meta in self.pool.metas],
            "teachers": [meta.get("path") or r.checkpoint for meta, r in zip(self.pool.metas, self.cfg.teacher_recipes)],
        }
        if not self.main:
            return summary
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        student_path = self.run_dir / "student.pt"
        meta = classifier_meta(self.cfg.student.arch, self.dataset, acc, teacher_acc=self.teacher_acc, distilled=True)
        save_classifier(student_path, self.deployed_student, meta)
        tracker.summarize({"best_student_acc": self.best_acc, "student_acc": acc, "teacher_acc": self.teacher_acc})
        tracker.log_model(student_path, f"student-{self.run_id}", meta)
        return summary

    # ---- checkpoints ----------------------------------------------------------------------
    @property
    def networks(self) -> dict[str, nn.Module]:
        """Every trained network of the run, by checkpoint key."""
        nets = {"student": self.student, "generator": self.generator, "ema": self.ema, "generator_ema": self.generator_ema,
                "discriminator": self.discriminator, "adapter": self.adapter,
                "feature_adapters": self.feature_adapters if len(self.feature_adapters) else None}  # fmt: skip
        return {k: m for k, m in nets.items() if m is not None}

    def state_dict(self) -> dict:
        state = {
            "step": self.step,
            "wall_s": self.wall_s,
            "best_acc": self.best_acc,
            "run_id": self.run_id,
            "rollbacks": self.rollbacks,
            "collapse_streak": self.collapse.streak,
            "config": config_to_dict(self.cfg),
            "latent_rngs": distributed.gather(self.latent_rng.get_state()),  # one per process (torchrun)
            "torch_rng": torch.get_rng_state(),
            "pool": self.pool.state_dict(),
        }
        state.update({name: net.state_dict() for name, net in self.networks.items()})
        for player, (opt, sched) in self.optimizers.items():
            state[f"opt_{player}"], state[f"sched_{player}"] = opt.state_dict(), sched.state_dict()
        if self.memory is not None:
            state["memory"] = self.memory.state_dict()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def save_checkpoint(self) -> Path:
        state = self.state_dict()  # on every rank: it gathers each one's latent generator
        if self.main:
            save_atomic(state, self.checkpoint_path)
        distributed.barrier()  # a rollback on any rank must find the file written
        return self.checkpoint_path

    def load_checkpoint(self, path: Path) -> None:
        state = load_safe(path)
        saved = state.get("config", {})
        mine = config_to_dict(self.cfg)
        saved_train = {**saved.get("train", {}), "iterations": None}
        mine_train = {**mine["train"], "iterations": None}
        diffs = [k for k in mine if k not in ("train", "perf") and saved.get(k) != mine[k]]  # perf: same algorithm
        diffs += [f"train.{k}" for k in mine_train if saved_train.get(k) != mine_train[k]]
        if diffs:
            raise DfkdError(f"cannot resume {path}: config differs from the saved run in {', '.join(diffs)}")
        for name, net in self.networks.items():
            load_weights(net, state[name], f"{name} in {path}")
        for player, (opt, sched) in self.optimizers.items():
            opt.load_state_dict(state[f"opt_{player}"])
            sched.load_state_dict(state[f"sched_{player}"])
        if self.memory is not None:
            self.memory.load_state_dict(state["memory"])
        rngs = state["latent_rngs"] if "latent_rngs" in state else [state["latent_rng"]]  # older checkpoints
        if distributed.rank() < len(rngs):  # else: a process the saved run did not have keeps its fresh seed
            self.latent_rng.set_state(rngs[distributed.rank()])
        self.pool.load_state_dict(state["pool"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.wall_s, self.best_acc, self.run_id = state["step"], state["wall_s"], state["best_acc"], state["run_id"]
        self.rollbacks, self.collapse.streak = state["rollbacks"], state["collapse_streak"]


def _yaml_dump(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
