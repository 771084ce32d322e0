"""A training run: build it, fit (the loop alone), finish. The task (train.tasks)
is asked once, at the start, and decides what differs; the loop reads as a
table of contents, and each policy (evaluation, checkpoints) owns its when
as well as its how."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mm_models.encoders import set_token_dropout
from mm_models.flops import flops_per_sample, sequence_lengths
from train import watchdog
from train.builders import (
    LogWindow,
    checked_loader,
    compile_engine,
    encoder_summary,
    seed_everything,
    seed_rank_streams,
    set_threads,
    zero_summary,
)
from train.checkpoint import TrainState, find_checkpoint, load_checkpoint, verify_checkpoint
from train.config import Config
from train.distributed import DistInfo, barrier
from train.engine import (
    build_deepspeed_config,
    build_engine,
    build_model,
    compute_dtype,
    contrastive_chunks,
    flat_gradients,
    parameter_total,
    start_deepspeed_comm,
)
from train.export import export
from train.policies import Checkpoints, Evaluation
from train.sample_log import log_samples
from train.signals import StopRequest, any_rank
from train.step import read_losses, train_step
from train.tasks import Setup, Task, task_for
from train.topology import keep_global_batch, partitioned, saved_topology, to_universal, warn_batch_change
from train.tracking import BestMetric, Tracker

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything fit() and finish() use, built once by build()."""

    cfg: Config
    task: Task
    setup: Setup
    info: DistInfo
    run_dir: Path
    engine: object
    loader: object
    batches: object
    ds_config: dict
    tracker: Tracker
    evaluation: Evaluation
    checkpoints: Checkpoints
    window: LogWindow
    state: TrainState
    resume_from: Path | None = None
    start_step: int = 0
    chunks: int = 1

    @property
    def accum(self) -> int:
        return self.ds_config["gradient_accumulation_steps"]


def train(cfg: Config, *, info: DistInfo, run_dir: Path, resolved: dict, stop: StopRequest | None = None) -> dict:
    """Trains, checkpoints and evaluates; returns the final held-out results
    (or, stopped by a signal, the step and checkpoint to resume from)."""
    run = build(cfg, info=info, run_dir=run_dir, resolved=resolved)
    stop = stop or StopRequest()
    stopped = fit(run, stop)
    stop.restore()
    if stopped is not None:
        return stopped
    return finish(run)


# -- build -------------------------------------------------------------------------------------


def build(cfg: Config, *, info: DistInfo, run_dir: Path, resolved: dict) -> Run:
    """The run: the task's config, data, the engine (resumed where a
    checkpoint is), the tracker and the policies. The config passed
    train.preflight.check_start before (the task, the batch arithmetic, the
    shard patterns, the vocabulary)."""
    t_cfg = cfg.trainer
    set_threads(t_cfg.threads, info)
    seed_everything(t_cfg.seed, deterministic=t_cfg.deterministic)
    if info.is_main and cfg.optimizer.warmup_steps >= t_cfg.max_steps:
        log.warning(
            "optimizer.warmup_steps=%d >= trainer.max_steps=%d: the learning rate never reaches optimizer.lr "
            "(set optimizer.warmup_steps to about a tenth of the steps)",
            cfg.optimizer.warmup_steps,
            t_cfg.max_steps,
        )
    task = task_for(cfg.task.name)
    setup = task.prepare(cfg, trust=t_cfg.trust_checkpoint)
    cfg = setup.cfg
    resolved.update(setup.resolved)
    loader, heldout_sizes = _data(setup, info=info, resolved=resolved)
    resume_from = find_checkpoint(t_cfg.resume, run_dir=run_dir)
    if resume_from is not None:
        # Before any engine or worker starts: a checkpoint that could run code is refused in one line.
        verify_checkpoint(resume_from, trust=t_cfg.trust_checkpoint)
    engine, ds_config, universal = _engine(
        task, setup, loader=loader, info=info, resume_from=resume_from, resolved=resolved
    )
    state = TrainState()
    if resume_from is not None:
        meta, loader_states = load_checkpoint(
            engine, resume_from, rank=info.rank, trust=t_cfg.trust_checkpoint, universal=universal
        )
        state = TrainState.from_meta(meta)
        if loader.resume(loader_states) and info.is_main:
            log.info("data: the epoch's unread samples are laid out anew over %d ranks", info.world_size)
        if info.is_main:
            log.info("resumed from %s at step %d", resume_from, state.step)
    tracker = Tracker(cfg.logger, run_dir=run_dir, config=resolved, is_main=info.is_main, run_id=state.wandb_run_id)
    batches = iter(loader)
    if t_cfg.log_samples:
        batches = log_samples(batches, loader=loader, path=run_dir / f"samples_rank{info.rank}.jsonl")
    batches = watchdog.watch_batches(batches)
    tracker.summary({"params": parameter_total(engine.module), "precision": _precision(ds_config)})
    dtype = compute_dtype(ds_config)
    evaluation = task.evaluation(
        setup,
        cfg=cfg,
        engine=engine,
        info=info,
        tracker=tracker,
        sizes=heldout_sizes,
        device=engine.device,
        dtype=dtype,
    )
    best_metric = task.best_metric if cfg.logger.best_metric == "auto" else cfg.logger.best_metric
    checkpoints = Checkpoints(
        engine=engine,
        loader=loader,
        tracker=tracker,
        evaluation=evaluation,
        best=BestMetric(best_metric, cfg.logger.best_mode, value=state.best_metric_value),
        run_dir=run_dir,
        rank=info.rank,
        resolved=resolved,
        keep_last=t_cfg.keep_last,
        every=t_cfg.checkpoint_every,
        last_step=t_cfg.max_steps,
    )
    # MFU counts what a step computes: with token dropout, the kept patches.
    window = LogWindow(
        global_batch=ds_config["train_batch_size"],
        flops_per_sample=flops_per_sample(cfg.model, token_dropout=True),
        tokens_per_sample=sum(sequence_lengths(cfg.model).values()),
        peak_flops=t_cfg.peak_flops_per_device,
        world_size=info.world_size,
    )
    chunks = contrastive_chunks(t_cfg, info.world_size, accum=ds_config["gradient_accumulation_steps"])
    return Run(cfg, task, setup, info, run_dir, engine, loader, batches, ds_config, tracker, evaluation,
               checkpoints, window, state, resume_from, state.step, chunks)  # fmt: skip


def _precision(ds_config: dict) -> str:
    return str(compute_dtype(ds_config)).removeprefix("torch.")


def _data(setup: Setup, *, info: DistInfo, resolved: dict):
    """(the training loader, the held-out shards' sizes). Data first: a bad
    shard pattern or tokenizer fails before any engine starts, the held-out
    set's too (not only when the first evaluation needs it)."""
    from data_pipeline.tokenizer import tokenizer_digest

    cfg, t_cfg = setup.cfg, setup.cfg.trainer
    common = dict(info=info, labels=setup.labels, modalities=setup.modalities)
    loader = checked_loader(cfg.data, "train", batch_size=t_cfg.micro_batch_size, **common)
    heldout = checked_loader(
        cfg.data, "heldout", batch_size=t_cfg.eval_batch_size, tokenizer=loader.tokenizer, **common
    )
    # Recorded with every checkpoint and the export: fine-tuning checks it (train.classify).
    resolved["tokenizer_sha256"] = tokenizer_digest(loader.tokenizer)
    # Read once at start (by rank 0), reused by every evaluation.
    return loader, {u: n for s in heldout.sources for u, n in zip(s.urls, s.sizes)}


def _engine(task: Task, setup: Setup, *, loader, info: DistInfo, resume_from: Path | None, resolved: dict):
    """(the DeepSpeed engine around the task's model, its config, the
    checkpoint's universal form where the world size changed, else None)."""
    cfg, t_cfg = setup.cfg, setup.cfg.trainer
    saved = saved_topology(resume_from) if resume_from is not None else None
    reshaped = saved is not None and saved.world_size != info.world_size
    if reshaped:
        keep_global_batch(t_cfg, saved, info.world_size)  # the accumulation adapts
        resolved["trainer"].update(global_batch_size=t_cfg.global_batch_size, grad_accum_steps=1)
    ds_config = build_deepspeed_config(
        ds=cfg.deepspeed, trainer=t_cfg, optimizer=cfg.optimizer, world_size=info.world_size
    )
    accum = ds_config["gradient_accumulation_steps"]
    if saved is not None and not reshaped and info.is_main:  # same ranks: another micro batch is the user's
        warn_batch_change(saved, world_size=info.world_size, micro=t_cfg.micro_batch_size, accum=accum)
    # ZeRO-1/2's flat gradient path reduces through shared memory where it can.
    start_deepspeed_comm(is_main=info.is_main, shared_memory=flat_gradients(ds_config))
    universal = None
    if reshaped:
        if info.is_main:
            log.info(
                "resuming on %d ranks a run saved on %d: global batch %d = %d micro × %d accum × %d ranks",
                info.world_size, saved.world_size, ds_config["train_batch_size"], t_cfg.micro_batch_size, accum,
                info.world_size,
            )  # fmt: skip
        if partitioned(resume_from):
            universal = to_universal(resume_from, rank=info.rank)  # verified before: the converter unpickles it
            ds_config["checkpoint"] = {"load_universal": True}
    model, lr_scales = task.build_model(
        setup, loader=loader, info=info, ds_config=ds_config, build=lambda make: build_model(make, ds_config=ds_config)
    )
    engine = build_engine(
        model, ds_config=ds_config, optimizer=cfg.optimizer, total_steps=t_cfg.max_steps, lr_scales=lr_scales
    )
    if t_cfg.compile:
        compile_engine(engine)
    seed_rank_streams(t_cfg.seed, info.rank)  # a resumed run then restores each rank's own state
    if info.is_main:
        _banner(task, setup, model=model, ds_config=ds_config, info=info)
    return engine, ds_config, universal


def _banner(task: Task, setup: Setup, *, model, ds_config: dict, info: DistInfo) -> None:
    cfg, t_cfg = setup.cfg, setup.cfg.trainer
    log.info(
        "model %s (%s): %.2fM parameters | %s, %s | global batch %d = %d micro × %d accum × %d ranks",
        cfg.model.name, encoder_summary(cfg.model), parameter_total(model) / 1e6, zero_summary(ds_config),
        _precision(ds_config), ds_config["train_batch_size"], t_cfg.micro_batch_size,
        ds_config["gradient_accumulation_steps"], info.world_size,
    )  # fmt: skip
    line = task.describe(setup)
    if line:
        log.info("%s", line)
    chunks = contrastive_chunks(t_cfg, info.world_size, accum=ds_config["gradient_accumulation_steps"])
    if chunks > 1:
        log.info(
            "contrastive batch %d (gradient caching: %d micro batches per rank embedded, then run again)",
            t_cfg.contrastive_batch,
            chunks,
        )


# -- fit ---------------------------------------------------------------------------------------


def fit(run: Run, stop: StopRequest) -> dict | None:
    """Steps until trainer.max_steps; returns None, or what a stop by signal saved."""
    t_cfg = run.cfg.trainer
    if stop.requested and run.info.is_main:
        log.warning("%s arrived during start-up: stopping after the first step", stop.signal_name)
    # Token dropout until the final unmasked phase (a no-op without token
    # dropout); a run resumed inside that phase starts without it.
    unmask_at = t_cfg.max_steps - t_cfg.unmasked_steps
    set_token_dropout(run.engine.module, run.state.step < unmask_at)
    bad_steps = 0
    while run.state.step < t_cfg.max_steps:
        step = run.state.step
        watchdog.next_step(step + 1)
        if step == unmask_at and t_cfg.unmasked_steps:  # FLIP's final phase: whole inputs
            _unmask(run)
        losses, wait = train_step(
            run.engine, run.batches, accum=run.accum, device=run.engine.device,
            dtype=compute_dtype(run.ds_config), chunks=run.chunks,
        )  # fmt: skip
        run.window.data_wait += wait
        if losses is None:
            bad_steps = _bad_step(bad_steps + 1, step=step, limit=t_cfg.max_bad_steps)
            continue
        bad_steps = 0
        run.state.step = step = step + 1
        run.window.steps += 1
        if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
            _log_step(run, losses)
        if run.evaluation.due(step):
            run.evaluation(step)
        saved = run.checkpoints.maybe_save(step)
        if any_rank(stop.requested):
            # One save per step: saving this step again would rewrite, in place,
            # the directory `latest` already names (a SIGKILL then leaves nothing whole).
            ckpt = saved or run.checkpoints.save(step)
            run.tracker.finish()
            if run.info.is_main:
                log.warning(
                    "stopped by a signal after step %d; checkpoint %s (resume with the same command)", step, ckpt
                )
            return {"step": step, "checkpoint": str(ckpt), "stopped": True}
    return None


def _unmask(run: Run) -> None:
    set_token_dropout(run.engine.module, False)
    if any(getattr(run.cfg.model, m).token_dropout > 0 for m in ("image", "audio")) and run.info.is_main:
        t_cfg = run.cfg.trainer
        log.info("step %d: token dropout off for the final %d steps", run.state.step + 1, t_cfg.unmasked_steps)


def _bad_step(bad_steps: int, *, step: int, limit: int) -> int:
    log.warning("non-finite loss on some rank: step skipped on all ranks (%d in a row)", bad_steps)
    if bad_steps >= limit:
        raise RuntimeError(
            f"{bad_steps} steps in a row had a non-finite loss (trainer.max_bad_steps="
            f"{limit}); last good step {step}. Check the data and the learning rate."
        )
    return bad_steps


def _log_step(run: Run, losses) -> None:
    step, t_cfg = run.state.step, run.cfg.trainer
    metrics = run.window.metrics(read_losses(losses), engine=run.engine, skipped=run.loader.skipped)
    run.tracker.log(metrics, step=step)
    if run.info.is_main:
        skips = {k.removeprefix("data/skipped/"): int(v) for k, v in metrics.items() if "/skipped/" in k}
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f samples/s  data wait %.0f%%%s",
            step, t_cfg.max_steps, metrics["train/loss"], metrics["train/lr"], metrics["perf/samples_per_s"],
            100 * metrics["perf/data_wait_frac"],
            f"  skipped so far: {', '.join(f'{k} {v}' for k, v in sorted(skips.items()))}" if skips else "",
        )  # fmt: skip


# -- finish ------------------------------------------------------------------------------------


def finish(run: Run) -> dict:
    """The final checkpoint, evaluation and export; returns the final held-out results."""
    t_cfg, info, tracker, evaluation = run.cfg.trainer, run.info, run.tracker, run.evaluation
    last = t_cfg.max_steps
    # Saved before the final evaluation: a failure there never loses the training.
    # A run resumed at its last step has nothing new to save (and saving the
    # same step again on another world size would mix two runs' rank files).
    resumed_at_end = run.resume_from is not None and run.state.step == run.start_step
    ckpt = run.resume_from if resumed_at_end else run.checkpoints.save(last, record=False)
    results = evaluation(last)
    run.checkpoints.record(ckpt, last)
    tracker.summary({f"final/{k}": v for k, v in evaluation.metrics(results, "heldout").items()})
    tracker.summary({"checkpoint": str(ckpt)})
    # Every rank is done with collectives. What follows is rank 0's alone and
    # may take long (export, artifact upload): the others leave now instead of
    # waiting, and the stall watchdog no longer times rank 0 (it is not stuck).
    barrier()
    watchdog.mark_idle()
    if info.is_main and t_cfg.export:
        _export(run, ckpt)
    wandb_dir = tracker.run_dir
    tracker.finish()
    if info.is_main:
        log.info("checkpoint: %s", ckpt)
        if wandb_dir:
            log.info("W&B run: %s  (inspect: wandb leet inspect --summary %s)", wandb_dir, wandb_dir)
        log.info("%s after %d steps:\n%s", evaluation.title, last, evaluation.table(results))
    return {"step": last, "checkpoint": str(ckpt), **run.task.result(results)}


def _export(run: Run, ckpt: Path) -> None:
    """The checkpoint is saved; an export that fails (disk full, say) is
    reported and can be redone with `python -m train.export`."""
    try:
        # This run's own checkpoint, just written: nothing to verify.
        weights, config_file, _ = export(ckpt, run.run_dir / "export" / "model.safetensors", trust=True)
    except Exception as e:  # noqa: BLE001
        log.error(
            "export failed (%s: %s); run: python -m train.export checkpoint=%s out=model.safetensors",
            type(e).__name__,
            e,
            ckpt,
        )
        if run.cfg.trainer.fail_on_export_error:
            run.tracker.finish()
            raise
        return
    run.tracker.log_export([weights, config_file], step=run.cfg.trainer.max_steps, upload=run.cfg.logger.upload_export)
    run.tracker.summary({"export": str(weights)})
    log.info("exported %s", weights)
