"""Metrics out of the process: W&B (rank 0, imported lazily), a console line
and a local metrics.jsonl in the run directory."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from train.config import LoggerConfig
from train.secrets import redact, redact_text

log = logging.getLogger(__name__)


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    """Does nothing on ranks other than 0."""

    def __init__(self, cfg: LoggerConfig, *, run_dir: Path, config: dict, is_main: bool, run_id: str | None = None):
        """run_id: continue this W&B run (a resumed training run)."""
        self.run = None
        self.jsonl = None
        if not is_main:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        mode = resolve_mode(cfg.mode)
        if mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            # Free text a user typed may carry a credential (a pasted URL) too.
            name=None if cfg.name is None else redact_text(cfg.name),
            tags=[redact_text(t) for t in cfg.tags],
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow" if run_id else None,
            config=redact(config),
            settings=wandb.Settings(quiet=True, console="off"),
        )
        log.info("W&B run %s (%s) in %s", self.run.id, mode, self.run.dir)

    @property
    def run_dir(self) -> str | None:
        """The W&B run directory (holds the .wandb log), if any."""
        return str(Path(self.run.dir).parent) if self.run is not None else None

    def log(self, metrics: dict[str, float], *, step: int) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, name: str, table, *, step: int) -> None:
        self.log_media({name: table}, step=step)

    def log_media(self, values: dict, *, step: int) -> None:
        """W&B tables and plots (not written to metrics.jsonl)."""
        if self.run is not None:
            self.run.log(values, step=step)

    def log_checkpoint(self, path: Path, *, step: int, aliases: list[str], metadata: dict | None = None) -> None:
        """A W&B artifact of type model that references the checkpoint directory."""
        if self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(
            f"checkpoint-{self.run.id}", type="model", metadata={"step": step, **(metadata or {})}
        )
        artifact.add_reference(Path(path).resolve().as_uri(), checksum=False)
        self.run.log_artifact(artifact, aliases=aliases)

    def log_export(self, files: list[Path], *, step: int, upload: bool) -> None:
        """The exported weights and config as a W&B artifact of type model."""
        if self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(
            f"model-{self.run.id}", type="model", metadata={"step": step, "format": "safetensors"}
        )
        for f in files:
            if upload:
                artifact.add_file(str(f))
            else:
                artifact.add_reference(Path(f).resolve().as_uri(), checksum=False)
        self.run.log_artifact(artifact, aliases=["latest", f"step_{step}"])

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None


class BestMetric:
    """Whether an eval metric improved on every earlier checkpoint's value
    (the W&B alias "best"). The value travels in checkpoint metadata, so a
    resumed run keeps comparing against it."""

    def __init__(self, name: str, mode: str, value: float | None = None):
        self.name, self.mode, self.value = name, mode, value
        self._warned = False

    def improved(self, metrics: dict[str, float]) -> bool:
        if self.name not in metrics:
            if not self._warned:
                log.warning(
                    "logger.best_metric=%r is not among the eval metrics; no checkpoint is marked best", self.name
                )
                self._warned = True
            return False
        value = float(metrics[self.name])
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value = value
        return better
