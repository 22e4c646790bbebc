"""Metrics to `metrics.jsonl` and Weights & Biases.

The JSONL file is the record of truth; W&B is the dashboard. Any W&B failure is reported once
and W&B is switched off for the rest of the run: a tracker never stops training.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from dfkd.config import TrackingConfig

FLUSH_S = 2.0  # seconds between writes of a W&B run's .wandb file


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
    """A run's metrics.jsonl and its W&B runs.

    W&B keeps no value logged at a step below its run's current step, and a killed process loses what
    its W&B service had not written out yet; so a resume and a rollback start a new W&B run (id
    `<run_id>-<hex>`, the same name, group `<run_id>`) and replay into it the records metrics.jsonl
    keeps before logging goes on. The W&B record of a run is the latest W&B run of its group, whose
    history equals metrics.jsonl; its summary names the run it replaces (`dfkd/replaces`), and a run
    a rollback replaces is tagged `superseded`.
    """

    def __init__(
        self, run_dir: Path, cfg: TrackingConfig, config: dict, run_id: str, resume_step: int | None = None
    ):
        self.run_dir, self.cfg, self.config, self.run_id = run_dir, cfg, config, run_id
        self.metrics_path = run_dir / "metrics.jsonl"
        self.images: list[tuple[str, Path, int]] = []  # what log_image sent, replayed after a rollback
        kept = self._truncate(resume_step) if resume_step is not None else []
        self.mode = resolve_mode(cfg)
        self.run = None
        if self.mode == "disabled":
            return
        if resume_step is None:
            self._open(run_id)
        else:
            self._open(self._new_id(), replaces=self._latest_wandb_id(), replayed_to=resume_step)
            self._replay(kept)

    def _open(self, wandb_id: str, **marks: Any) -> None:
        """Start the W&B run `wandb_id`; online falls back to offline when the server does not answer."""
        if self.mode == "online":
            start = time.monotonic()
            try:
                self.run = self._init_wandb(wandb_id)
            except Exception as err:  # noqa: BLE001 - no network: keep the record locally
                import wandb

                wandb.teardown()  # the failed online run still holds its id
                waited = time.monotonic() - start
                warnings.warn(
                    f"{self._unreached(err, waited)}; logging offline, upload later with: "
                    f"wandb sync {self.run_dir / 'wandb'}/offline-run-*",
                    stacklevel=3,
                )
                self.mode = "offline"
        if self.run is None:
            self.run = self._call(self._init_wandb, wandb_id)
        marks = {f"dfkd/{key}": value for key, value in marks.items() if value is not None}
        if self.run is not None and marks:
            self._call(self.run.summary.update, marks)

    def _unreached(self, err: Exception, waited_s: float) -> str:
        """What the fallback warning says: the time really waited, which an error may cut short."""
        timeout, name = self.cfg.init_timeout, type(err).__name__
        if waited_s >= timeout:
            return f"W&B server not reached within {timeout:g} s (tracking.init_timeout; {name})"
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        return f"W&B server not reached: {name} after {waited_s:.1f} s" + (f": {reason}" if reason else "")

    def _init_wandb(self, wandb_id: str):
        import wandb

        # A hard kill loses what the service holds unwritten: it writes the .wandb file every
        # FLUSH_S seconds instead of every 15 s (wandb's default), where this wandb has the setting.
        fields = getattr(wandb.Settings, "model_fields", {})
        name = "x_transaction_log_flush_interval"
        flush = {name: FLUSH_S} if name in fields else {}
        cfg = self.cfg
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or self.run_dir.name,
            id=wandb_id,
            group=self.run_id,
            resume="allow",
            config=self.config,
            dir=str(self.run_dir),
            mode=self.mode,
            reinit="create_new",
            settings=wandb.Settings(init_timeout=cfg.init_timeout, console="off", silent=True, **flush),
        )

    def _new_id(self) -> str:
        return f"{self.run_id}-{uuid.uuid4().hex[:6]}"

    def _latest_wandb_id(self) -> str | None:
        """The id of the W&B run this process replaces: the last one W&B started in the run directory."""
        latest = self.run_dir / "wandb" / "latest-run"
        if not latest.exists():
            return None
        match = re.fullmatch(r"(?:offline-)?run-\d{8}_\d{6}-(.+)", latest.resolve().name)
        return match.group(1) if match else None

    def _call(self, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the dashboard is optional, training is not
            warnings.warn(f"W&B disabled for the rest of this run: {type(err).__name__}: {err}", stacklevel=2)
            self.run = None
            return None

    def _truncate(self, step: int) -> list[dict]:
        """Drop the records past `step` (they will be logged again) and return those kept. A line
        cut short by a hard kill is dropped too."""
        if not self.metrics_path.exists():
            return []
        kept, lines = [], []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(record)
                lines.append(line + "\n")
        self.metrics_path.write_text("".join(lines))
        return kept

    def rewind(self, step: int) -> None:
        """On a rollback to the checkpoint at `step`: drop the records past it and replace the W&B
        run with one that holds the records kept."""
        kept = self._truncate(step)
        self.images = [image for image in self.images if image[2] <= step]
        if self.run is None:
            return
        old, new_id = self.run, self._new_id()

        def supersede() -> bool:
            old.summary["dfkd/superseded_by"] = new_id
            old.tags = (*(old.tags or ()), "superseded")
            old.finish()
            return True

        if self._call(supersede):
            self.run = None
            self._open(new_id, replaces=old.id, replayed_to=step)
            self._replay(kept, self.images)

    def _replay(self, records: list[dict], images: list[tuple[str, Path, int]] = ()) -> None:
        """Log `records` and `images` again in step order: the metrics of a step before its images,
        as they came live."""
        if self.run is None:
            return
        events = [(r["step"], 0, {k: v for k, v in r.items() if k != "step"}) for r in records]
        events += [(step, 1, (key, path)) for key, path, step in images]

        def replay() -> None:
            import wandb

            for step, kind, item in sorted(events, key=lambda e: e[:2]):
                if kind == 0:
                    self.run.log(item, step=step)
                elif item[1].exists():
                    self.run.log({item[0]: wandb.Image(str(item[1]))}, step=step)

        self._call(replay)

    @property
    def url(self) -> str | None:
        if self.run is None:
            return None
        settings = getattr(self.run, "settings", None)
        return getattr(self.run, "url", None) or getattr(settings, "sync_dir", None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self._call(self.run.log, metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.images.append((key, path, step))
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
