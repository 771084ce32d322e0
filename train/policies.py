"""What `train()` does besides stepping: held-out evaluation and checkpoints.

Each is a small object that owns its state (the last evaluation, the best
metric so far) instead of closures over the loop's variables. The loop
decides when; these decide how.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_pipeline import build_loader
from train import classify as classify_mod
from train import watchdog
from train.checkpoint import save_checkpoint
from train.evaluate import eval_metrics, evaluate_heldout, results_table
from train.tables import retrieval_table
from train.tracking import BestMetric, Tracker

log = logging.getLogger(__name__)


class Evaluation:
    """Held-out evaluation of the engine's model: runs it on every rank,
    logs it (rank 0) and keeps the last result's step and flat metrics."""

    title = "held-out evaluation"

    def __init__(self, *, cfg, engine, info, tracker: Tracker, sizes: dict[str, int], device, dtype):
        self.cfg, self.engine, self.info, self.tracker = cfg, engine, info, tracker
        self.sizes, self.device, self.dtype = sizes, device, dtype
        self.last_step: int | None = None
        self.last_metrics: dict[str, float] = {}

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


class RetrievalEvaluation(Evaluation):
    """Pretraining: cross-modal retrieval (and the fused metrics) on the held-out shards."""

    title = "held-out retrieval"

    def _evaluate(self, step: int) -> dict:
        results = evaluate_heldout(
            self.engine,
            data=self.cfg.data,
            batch_size=self.cfg.trainer.eval_batch_size,
            device=self.device,
            dtype=self.dtype,
            keep_split=True,
            sizes=self.sizes,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        self._split = results.pop("split")
        return results

    def _log_extras(self, results: dict, step: int) -> None:
        if self.cfg.logger.table_rows > 0:
            table = retrieval_table(self._split, data=self.cfg.data, rows=self.cfg.logger.table_rows)
            self.tracker.log_table("eval/retrieval_samples", table, step=step)

    def metrics(self, results: dict, prefix: str) -> dict[str, float]:
        return eval_metrics(results, prefix)

    def table(self, results: dict) -> str:
        return results_table(results)


class ClassifyEvaluation(Evaluation):
    """Fine-tuning: classification metrics of the fused classifier on the held-out shards."""

    title = "held-out classification"

    def __init__(self, *, spec, **kw):
        super().__init__(**kw)
        self.spec = spec

    def _evaluate(self, step: int) -> dict:
        heldout = build_loader(
            self.cfg.data,
            split="heldout",
            batch_size=self.cfg.trainer.eval_batch_size,
            labels=self.spec,
            sizes=self.sizes,
            modalities=tuple(self.cfg.task.modalities),
        )
        split = classify_mod.predict_split(self.engine, heldout, device=self.device, dtype=self.dtype)
        results = classify_mod.classification_metrics(split, self.spec, threshold=self.cfg.task.threshold)
        if self.info.is_main and step != self.cfg.trainer.max_steps:
            log.info("held-out classification at step %d:\n%s", step, classify_mod.classify_table(results))
        return results

    def _log_extras(self, results: dict, step: int) -> None:
        classify_mod.log_to_wandb(self.tracker, results, step=step)

    def metrics(self, results: dict, prefix: str) -> dict[str, float]:
        return classify_mod.flat_metrics(results, prefix)

    def table(self, results: dict) -> str:
        return classify_mod.classify_table(results)


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
    ):
        self.engine, self.loader, self.tracker, self.evaluation, self.best = engine, loader, tracker, evaluation, best
        self.run_dir, self.rank, self.resolved, self.keep_last = run_dir, rank, resolved, keep_last

    def save(self, step: int, *, record: bool = True) -> Path:
        """Collective: saves the step; with record, logs it to W&B too."""
        watchdog.mark("checkpoint", step=step)
        is_best = record and self._improved(step)
        meta = {
            "wandb_run_id": self.tracker.run.id if self.tracker.run else None,
            "config": self.resolved,
            "best_metric_value": self.best.value,
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
