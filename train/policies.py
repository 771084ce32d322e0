"""What `train()` does besides stepping: held-out evaluation and checkpoints.

Each is a small object that owns its state (the last evaluation, the best
metric so far) instead of closures over the loop's variables. The loop
decides when; these decide how.
"""

from __future__ import annotations

import logging
from pathlib import Path

from train import watchdog
from train.checkpoint import TrainState, save_checkpoint
from train.tracking import BestMetric, Tracker

log = logging.getLogger(__name__)


class Evaluation:
    """Held-out evaluation of the engine's model: runs it on every rank,
    logs it (rank 0) and keeps the last result's step and flat metrics.
    Each task has its own (train.tasks)."""

    title = "held-out evaluation"

    def __init__(self, *, cfg, engine, info, tracker: Tracker, sizes: dict[str, int], device, dtype):
        self.cfg, self.engine, self.info, self.tracker = cfg, engine, info, tracker
        self.every, self.last_step_of_run = cfg.trainer.eval_every, cfg.trainer.max_steps
        self.sizes, self.device, self.dtype = sizes, device, dtype
        self.last_step: int | None = None
        self.last_metrics: dict[str, float] = {}

    def due(self, step: int) -> bool:
        """Every trainer.eval_every steps; the last step's evaluation is the run's finish."""
        return bool(self.every) and step % self.every == 0 and step != self.last_step_of_run

    def __call__(self, step: int) -> dict:
        """Collective: evaluates at `step`, logs the metrics, returns the full results."""
        watchdog.mark("evaluation", step=step)
        results = self._evaluate(step)
        self.last_step, self.last_metrics = step, self.metrics(results, "eval")
        self.tracker.log(self.last_metrics, step=step)
        if self.tracker.run is not None:
            # Rank 0 only, and optional: a failure here must not stop the run
            # (or leave the other ranks waiting for rank 0).
            try:
                self._log_extras(results, step)
            except Exception as e:  # noqa: BLE001 - reported, then training goes on
                log.warning("W&B evaluation extras at step %d skipped: %s: %s", step, type(e).__name__, e)
        return results

    def _evaluate(self, step: int) -> dict:
        raise NotImplementedError

    def _log_extras(self, results: dict, step: int) -> None:
        """Tables and plots beyond the scalar metrics (rank 0, W&B)."""

    def metrics(self, results: dict, prefix: str) -> dict[str, float]:
        raise NotImplementedError

    def table(self, results: dict) -> str:
        raise NotImplementedError


class Checkpoints:
    """Saves checkpoints (every rank) and records them in W&B (rank 0), as
    "best" when the evaluation at the same step improved the best metric."""

    def __init__(
        self,
        *,
        engine,
        loader,
        tracker: Tracker,
        evaluation: Evaluation,
        best: BestMetric,
        run_dir: Path,
        rank: int,
        resolved: dict,
        keep_last: int,
        every: int = 0,
        last_step: int = 0,
    ):
        self.engine, self.loader, self.tracker, self.evaluation, self.best = engine, loader, tracker, evaluation, best
        self.run_dir, self.rank, self.resolved, self.keep_last = run_dir, rank, resolved, keep_last
        self.every, self.last_step = every, last_step

    def maybe_save(self, step: int) -> Path | None:
        """Collective: saves every trainer.checkpoint_every steps (the last
        step's checkpoint is the run's finish); returns the checkpoint or None."""
        if self.every and step % self.every == 0 and step != self.last_step:
            return self.save(step)
        return None

    def save(self, step: int, *, record: bool = True) -> Path:
        """Collective: saves the step; with record, logs it to W&B too."""
        watchdog.mark("checkpoint", step=step)
        is_best = record and self._improved(step)
        state = TrainState(
            step=step, wandb_run_id=self.tracker.run.id if self.tracker.run else None, best_metric_value=self.best.value
        )
        meta = {
            **state.state_dict(),
            "config": self.resolved,
            # What a resume on another world size needs (train.topology).
            "topology": {"world_size": self.engine.dp_world_size, "global_batch": self.engine.train_batch_size()},
        }
        path = save_checkpoint(
            self.engine,
            run_dir=self.run_dir,
            step=step,
            meta=meta,
            loader_state=self.loader.state_dict(),
            rank=self.rank,
            keep_last=self.keep_last,
        )
        if record:
            self._record(path, step, is_best=is_best)
        return path

    def record(self, path: Path, step: int) -> None:
        """Logs a checkpoint saved earlier without record (the final one,
        saved before its evaluation so that a failed evaluation loses nothing)."""
        self._record(path, step, is_best=self._improved(step))

    def _improved(self, step: int) -> bool:
        return self.evaluation.last_step == step and self.best.improved(self.evaluation.last_metrics)

    def _record(self, path: Path, step: int, *, is_best: bool) -> None:
        self.tracker.log_checkpoint(
            path,
            step=step,
            aliases=["latest", f"step_{step}"] + (["best"] if is_best else []),
            metadata={self.best.name: self.evaluation.last_metrics.get(self.best.name)} if is_best else None,
        )
