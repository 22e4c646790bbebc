"""Metrics to `metrics.jsonl` and Weights & Biases.

The JSONL file is the record of truth; W&B is the dashboard. Any W&B failure is reported once
and W&B is switched off for the rest of the run: a tracker never stops training.
"""
from __future__ import annotations

import json
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from dfkd.config import TrackingConfig


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: TrackingConfig) -> str:
    """WANDB_MODE overrides the config; online without credentials becomes offline."""
    mode = os.environ.get("WANDB_MODE") or cfg.mode
    if mode in ("online", "run") and not has_wandb_credentials():
        return "offline"
    return mode if mode in ("online", "offline", "disabled") else "offline"


class Tracker:
    def __init__(self, run_dir: Path, cfg: TrackingConfig, config: dict, run_id: str, resume_step: int | None = None):
        self.metrics_path = run_dir / "metrics.jsonl"
        if resume_step is not None:
            self.rewind(resume_step)
        self.mode = resolve_mode(cfg)
        self.run = None
        if self.mode == "online":
            try:
                self.run = self._init_wandb(run_dir, cfg, config, run_id)
                return
            except Exception as err:  # noqa: BLE001 - no network: keep the record locally
                import wandb

                wandb.teardown()  # the failed online run still holds its id
                warnings.warn(f"W&B server not reached within {cfg.init_timeout:g} s ({type(err).__name__}); "
                              f"logging offline, upload later with: wandb sync {run_dir / 'wandb'}/offline-run-*",
                              stacklevel=2)  # fmt: skip
                self.mode = "offline"
        if self.mode != "disabled":
            self.run = self._call(self._init_wandb, run_dir, cfg, config, run_id)

    def _init_wandb(self, run_dir: Path, cfg: TrackingConfig, config: dict, run_id: str):
        import wandb

        return wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.run_name or run_dir.name, id=run_id,
            resume="allow", config=config, dir=str(run_dir), mode=self.mode, reinit="create_new",
            settings=wandb.Settings(init_timeout=cfg.init_timeout, console="off", silent=True),
        )  # fmt: skip

    def _call(self, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the dashboard is optional, training is not
            warnings.warn(f"W&B disabled for the rest of this run: {type(err).__name__}: {err}", stacklevel=2)
            self.run = None
            return None

    def rewind(self, step: int) -> None:
        """On resume or rollback, drop records past the checkpoint: they will be logged again.
        A line cut short by a hard kill is dropped too."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line + "\n")
            except json.JSONDecodeError:
                pass
        self.metrics_path.write_text("".join(kept))

    @property
    def url(self) -> str | None:
        if self.run is None:
            return None
        return getattr(self.run, "url", None) or getattr(getattr(self.run, "settings", None), "sync_dir", None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self._call(self.run.log, metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.run is not None:
            import wandb

            self._call(lambda: self.run.log({key: wandb.Image(str(path))}, step=step))

    def summarize(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            self._call(self.run.summary.update, summary)

    def log_model(self, path: Path, name: str, metadata: dict) -> None:
        if self.run is not None:
            import wandb

            def log():
                artifact = wandb.Artifact(name, type="model", metadata=metadata)
                artifact.add_file(str(path))
                self.run.log_artifact(artifact)

            self._call(log)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self._call(self.run.finish, exit_code=exit_code)
            self.run = None


class NullTracker:
    """What processes other than rank 0 log to under torchrun: nothing."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, key: str, path: Path, step: int) -> None: ...
    def summarize(self, summary: dict[str, Any]) -> None: ...
    def log_model(self, path: Path, name: str, metadata: dict) -> None: ...
    def rewind(self, step: int) -> None: ...
    def finish(self, exit_code: int = 0) -> None: ...
