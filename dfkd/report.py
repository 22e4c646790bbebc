"""What a run reports: evaluation against the teachers, sample grids, the summary, the student's file.

With labelled real images, accuracy is top-1 on them and ratios are against the best single
teacher. Without any, the run scores teacher-student agreement on synthetic images from held-out
latents (drawn once, never used in training), made by the current generator at each evaluation;
the summary then says that no real-data accuracy exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.utils import save_image

from dfkd.data import Split
from dfkd.errors import DfkdError
from dfkd.evaluate import accuracy, agreement, class_accuracies, predictions
from dfkd.latents import LatentSpace
from dfkd.pool import TeacherPool
from dfkd.spec import InputSpec
from dfkd.teachers import save_classifier

N_FIXED_SAMPLES = 64


@dataclass
class EvalSet:
    """Labelled real images to evaluate on (None: agreement on held-out synthetic images)."""

    split: Split | None
    source: str  # where the images come from, for the summary


class Report:
    def __init__(
        self,
        run_dir: Path,
        spec: InputSpec,
        pool: TeacherPool,
        evaluation: EvalSet,
        device: torch.device,
        latents: LatentSpace,
        seed: int,
        synthetic_holdout: int,
        min_teacher_margin: float = 0.0,
    ):
        self.run_dir, self.spec, self.pool, self.evaluation, self.device = (
            run_dir,
            spec,
            pool,
            evaluation,
            device,
        )
        # One fixed latent batch makes sample grids comparable over time.
        self.fixed_z = latents.draw(N_FIXED_SAMPLES, torch.Generator().manual_seed(seed + 1))
        self.best_acc = 0.0
        split = evaluation.split
        if split is None:
            rng = torch.Generator().manual_seed(seed + 3)
            self.holdout_z = latents.draw(synthetic_holdout, rng)
            self.teacher_preds, self.teacher_accs, self.teacher_acc = [], [], None
        else:
            self.teacher_preds = [predictions(t, split, device) for t in pool.models]
            self.teacher_accs = [agreement(p, split.labels) for p in self.teacher_preds]
            self.teacher_acc = max(self.teacher_accs)  # ratios are against the best single teacher
            check_teachers(
                self.teacher_accs,
                [meta["arch"] for meta in pool.metas],
                spec,
                evaluation.source,
                min_teacher_margin,
            )

    @property
    def real(self) -> bool:
        return self.evaluation.split is not None

    def teacher_metrics(self) -> dict[str, float]:
        if not self.real:
            return {}
        out = {"teacher/acc": self.teacher_acc}
        if len(self.pool) > 1:
            out.update({f"teacher/acc_{n}": a for n, a in zip(self.pool.names, self.teacher_accs)})
            out["teacher/ensemble_acc"] = accuracy(self.pool.ensemble(), self.evaluation.split, self.device)
        return out

    def synthetic_agreement(self, student: nn.Module, generator: nn.Module) -> float:
        """Without real images: the student's agreement with the teachers on held-out synthetic ones."""
        split = self.synthetic_split(generator)
        return agreement(predictions(student, split, self.device), split.labels)

    @torch.no_grad()
    def synthetic_split(self, generator: nn.Module) -> Split:
        was_training = generator.training
        generator.eval()  # eval BN: evaluation does not move the generator's running statistics
        images = torch.cat([generator(z.to(self.device)).float().cpu() for z in self.holdout_z.split(500)])
        generator.train(was_training)
        teacher = self.pool.models[0] if len(self.pool) == 1 else self.pool.ensemble()
        return Split(images, predictions(teacher, Split(images, torch.zeros(len(images))), self.device))

    def evaluate(
        self, student: nn.Module, raw_student: nn.Module | None, generator: nn.Module
    ) -> dict[str, float]:
        """Metrics of the deployed student (and of the live one, when the deployed is an average)."""
        if not self.real:
            acc = self.synthetic_agreement(student, generator)
            self.best_acc = max(self.best_acc, acc)
            return {"eval/synthetic_agreement": acc, "eval/best_synthetic_agreement": self.best_acc}
        split = self.evaluation.split
        preds = predictions(student, split, self.device)
        acc = agreement(preds, split.labels)
        self.best_acc = max(self.best_acc, acc)
        evals = {
            "eval/student_acc": acc,
            "eval/best_student_acc": self.best_acc,
            "eval/ratio": acc / self.teacher_acc,
        }
        if len(self.pool) > 1:  # how closely the student follows each teacher
            evals.update(
                {f"eval/agree_{n}": agreement(preds, p) for n, p in zip(self.pool.names, self.teacher_preds)}
            )
        if raw_student is not None:
            evals["eval/raw_student_acc"] = accuracy(raw_student, split, self.device)
        return evals

    def final_score(self, student: nn.Module, generator: nn.Module) -> tuple[float, dict | None]:
        """The student's accuracy on the real images and each class's accuracy, the student's and the
        best single teacher's, in class order (which classes the synthetic images fail to teach), from
        one pass; without real images, its synthetic agreement and None."""
        if not self.real:
            return self.synthetic_agreement(student, generator), None
        split, n = self.evaluation.split, self.spec.num_classes
        preds = predictions(student, split, self.device)
        best = self.teacher_preds[self.teacher_accs.index(self.teacher_acc)]
        per_class = {
            "student": class_accuracies(preds, split.labels, n),
            "teacher": class_accuracies(best, split.labels, n),
        }
        return agreement(preds, split.labels), per_class

    @torch.no_grad()
    def save_samples(self, generator: nn.Module, step: int) -> Path:
        path = self.run_dir / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        generator.eval()  # eval BN: the fixed batch does not shift the running statistics
        images = generator(self.fixed_z.to(self.device))
        generator.train()
        save_image(self.spec.denormalize(images).cpu(), path, nrow=8)
        return path

    def summary(
        self,
        acc: float,
        iterations: int,
        wall_s: float,
        images_per_iteration: int,
        teacher_archs: list[str],
        teacher_files: list,
    ) -> dict:
        self.best_acc = max(self.best_acc, acc)
        speed = {
            "iterations": iterations,
            "wall_s": round(wall_s, 2),
            "images_per_s": round(iterations * images_per_iteration / max(wall_s, 1e-9), 1),
        }
        teachers = {"teacher_archs": teacher_archs, "teachers": teacher_files}
        if not self.real:
            return {
                "teacher_acc": None,
                "student_acc": None,
                "ratio": None,
                "synthetic_agreement": acc,
                "best_synthetic_agreement": self.best_acc,
                "evaluated_on": f"no real evaluation data: agreement with the teacher on "
                f"{len(self.holdout_z)} synthetic images from held-out latents; no real-data accuracy exists",
                **speed,
                **teachers,
            }
        return {
            "teacher_acc": self.teacher_acc,
            "student_acc": acc,
            "best_student_acc": self.best_acc,
            "ratio": acc / self.teacher_acc,
            **speed,
            "teacher_accs": self.teacher_accs,
            **teachers,
        }

    def dashboard_summary(self, acc: float) -> dict:
        """The figures the W&B run summary shows."""
        if self.real:
            return {"best_student_acc": self.best_acc, "student_acc": acc, "teacher_acc": self.teacher_acc}
        return {"best_synthetic_agreement": self.best_acc, "synthetic_agreement": acc}

    def write(self, summary: dict, student: nn.Module, meta: dict) -> Path:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        path = self.run_dir / "student.pt"
        save_classifier(path, student, meta)
        return path


def check_teachers(accs: list[float], archs: list[str], spec: InputSpec, source: str, margin: float) -> None:
    """A teacher near chance on labelled images is almost always loaded wrongly; stop before training."""
    chance = 100.0 / spec.num_classes
    floor = chance + margin * (100.0 - chance)
    for acc, arch in zip(accs, archs):
        if margin > 0 and acc < floor:
            raise DfkdError(
                f"teacher {arch} scores {acc:.1f} % on {source} (chance is {chance:.1f} %): "
                "check input.mean/std "
                "(its normalization), the architecture (teacher.arch) and eval.classes; "
                "eval.min_teacher_margin=0 skips this check"
            )


def student_meta(
    arch: str, dataset: str, spec: InputSpec, acc: float | None, teacher_acc: float | None, kwargs: dict
) -> dict:
    """The student checkpoint's meta (the schema of dfkd.classifier_files), in the key order dfkd writes;
    `kwargs` (what the student's arch was called with) only when there are any."""
    return {
        "arch": arch,
        "dataset": dataset,
        "num_classes": spec.num_classes,
        "in_channels": spec.channels,
        "image_size": spec.size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "test_acc": acc,
        "teacher_acc": teacher_acc,
        "distilled": True,
        **({"kwargs": kwargs} if kwargs else {}),
    }
