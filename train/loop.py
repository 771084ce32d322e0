"""The training loop, top to bottom. Setup lives in builders; a step is a function."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch

from data_pipeline import build_loader
from data_pipeline.decode import MODALITIES
from data_pipeline.loader import shard_size_table
from data_pipeline.tokenizer import tokenizer_digest
from mm_models import PretrainModel
from mm_models.classifier import ClassifierModel, attach_weights, classifier_config
from mm_models.encoders import set_token_dropout
from mm_models.flops import flops_per_sample, sequence_lengths
from train import classify as classify_mod
from train import watchdog
from train.checkpoint import find_checkpoint, load_checkpoint, verify_checkpoint
from train.config import Config
from train.distributed import DistInfo, all_reduce_mean, barrier, feature_gather, sum_counters
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
from train.policies import Checkpoints, ClassifyEvaluation, RetrievalEvaluation
from train.sample_log import log_samples
from train.signals import StopRequest, any_rank
from train.step import read_losses, train_step
from train.topology import keep_global_batch, partitioned, saved_topology, to_universal, warn_batch_change
from train.tracking import BestMetric, Tracker

log = logging.getLogger(__name__)


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; read when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def seed_rank_streams(seed: int, rank: int) -> None:
    """After the model is initialised (the same on every rank, from `seed`):
    each rank its own random streams, so masked-text positions, hard-negative
    draws and dropout differ across ranks instead of repeating one rank's
    choices W times. Derived from (seed, rank): a rerun draws the same."""
    derived = (seed * 1_000_003 + 7919 * (rank + 1)) % (2**31 - 1)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)  # every device too


def set_threads(threads: int, info: DistInfo) -> None:
    """Ranks on one node share its cores instead of each taking all of them."""
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 1) // info.local_world_size)
    torch.set_num_threads(threads)


def shared_size_table(data, split: str, info: DistInfo) -> dict[str, int]:
    """Rank 0 reads the shard index (or scans the shards) once and hands
    the sizes to every rank, instead of each rank downloading them. An
    error on rank 0 is raised on every rank."""
    if info.world_size <= 1 or not torch.distributed.is_initialized():
        return shard_size_table(data, split)
    box: list = [None]
    if info.is_main:
        try:
            box[0] = ("ok", shard_size_table(data, split))
        except (ValueError, OSError) as e:
            box[0] = ("error", f"{type(e).__name__}\t{e}")
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        name, _, message = value.partition("\t")
        raise (FileNotFoundError if name == "FileNotFoundError" else ValueError)(message)
    return value


def checked_loader(
    data, split: str, *, batch_size: int, info: DistInfo, tokenizer=None, labels=None, modalities=MODALITIES
):
    """build_loader, with an error that names the config key at fault."""
    try:
        sizes = shared_size_table(data, split, info)
        return build_loader(
            data,
            split=split,
            batch_size=batch_size,
            rank=info.rank,
            world_size=info.world_size,
            tokenizer=tokenizer,
            labels=labels,
            sizes=sizes,
            modalities=modalities,
        )
    except (ValueError, OSError) as e:
        key = "data.heldout" if split == "heldout" else ("data.sources" if data.sources else "data.train")
        value = data.heldout if split == "heldout" else (data.train if not data.sources else "...")
        if tokenizer is None and data.tokenizer != "byte" and "tokenizer" in str(e).lower():
            key, value = "data.tokenizer", data.tokenizer
        raise ValueError(f"{key}={value!r}: {e}") from None


def compile_engine(engine) -> None:
    """trainer.compile: the engine's module through torch.compile (inductor),
    as DeepSpeed's engine.compile() does it. Refused with the fix when the
    machine has no C++ compiler inductor could use on CPU."""
    import shutil

    if engine.device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise RuntimeError(
            "trainer.compile=true on CPU needs a C++ compiler for inductor: install one "
            "(apt-get install g++) or set trainer.compile=false"
        )
    engine.compile()

    def report(module, args, output) -> None:  # once, after the first (compiling) forward
        from torch._dynamo.utils import counters

        handle.remove()
        log.info("torch.compile: %d graph(s) compiled for the model", counters["stats"]["unique_graphs"])

    handle = engine.module.register_forward_hook(report)


def zero_summary(ds_config: dict) -> str:
    """'ZeRO-3, optimizer states and parameters offloaded to cpu' for the start-up banner."""
    zero = ds_config["zero_optimization"]
    offloaded = [
        what
        for key, what in (("offload_optimizer", "optimizer states"), ("offload_param", "parameters"))
        if key in zero
    ]
    devices = sorted({zero[key]["device"] for key in ("offload_optimizer", "offload_param") if key in zero})
    return f"ZeRO-{zero['stage']}" + (
        f", {' and '.join(offloaded)} offloaded to {'/'.join(devices)}" if offloaded else ""
    )


def encoder_summary(model_cfg) -> str:
    """'image cnn, audio transformer, text rnn (locked)' for the start-up banner."""
    from mm_models.encoders import arch_name

    return ", ".join(
        f"{m} {arch_name(model_cfg, m)}" + (" (locked)" if getattr(model_cfg, m).freeze else "")
        for m in ("image", "audio", "text")
    )


def perf_metrics(
    *, samples_per_s: float, flops_per_sample: float, tokens_per_sample: int, peak_flops: float, world_size: int
) -> dict[str, float]:
    """Throughput, model FLOP/s, MFU (if the device peak is known) and memory."""
    achieved = samples_per_s * flops_per_sample
    out = {
        "perf/samples_per_s": samples_per_s,
        "perf/tokens_per_s": samples_per_s * tokens_per_sample,
        "perf/model_tflops_per_device": achieved / world_size / 1e12,
        "perf/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if peak_flops > 0:
        out["perf/mfu"] = achieved / world_size / peak_flops
    if torch.cuda.is_available():
        out["perf/cuda_max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class LogWindow:
    """The steps between two log lines: their time, data wait and throughput."""

    def __init__(
        self, *, global_batch: int, flops_per_sample: float, tokens_per_sample: int, peak_flops: float, world_size: int
    ):
        self.global_batch, self.world_size = global_batch, world_size
        self.flops_per_sample, self.tokens_per_sample, self.peak_flops = flops_per_sample, tokens_per_sample, peak_flops
        self._reset()

    def _reset(self) -> None:
        self.start, self.data_wait, self.steps = time.perf_counter(), 0.0, 0

    def metrics(self, losses: dict[str, float], *, engine, skipped) -> dict[str, float]:
        """Collective (every rank calls it): the window's metrics, averaged
        over ranks; starts the next window."""
        elapsed = time.perf_counter() - self.start
        out = all_reduce_mean({f"train/{k}": v for k, v in losses.items()})
        out.update({f"data/skipped/{k}": v for k, v in sum_counters(skipped).items()})
        out["train/lr"] = engine.get_lr()[0]
        out["train/grad_norm"] = float(engine.get_global_grad_norm() or 0.0)
        out["perf/data_wait_frac"] = self.data_wait / elapsed
        out.update(
            perf_metrics(
                samples_per_s=self.steps * self.global_batch / elapsed,
                flops_per_sample=self.flops_per_sample,
                tokens_per_sample=self.tokens_per_sample,
                peak_flops=self.peak_flops,
                world_size=self.world_size,
            )
        )
        self._reset()
        return out


def train(cfg: Config, *, info: DistInfo, run_dir: Path, resolved: dict, stop: StopRequest | None = None) -> dict:
    """Trains, checkpoints and evaluates; returns the final held-out results."""
    t_cfg = cfg.trainer
    set_threads(t_cfg.threads, info)
    seed_everything(t_cfg.seed, deterministic=t_cfg.deterministic)

    classify = cfg.task.name == "classify"
    spec, init_state, pretrained = None, None, None
    if info.is_main and cfg.optimizer.warmup_steps >= t_cfg.max_steps:
        log.warning(
            "optimizer.warmup_steps=%d >= trainer.max_steps=%d: the learning rate never reaches optimizer.lr "
            "(set optimizer.warmup_steps to about a tenth of the steps)",
            cfg.optimizer.warmup_steps,
            t_cfg.max_steps,
        )
    # The config passed train.preflight.check_start (the task, the batch
    # arithmetic, the shard patterns, the vocabulary) before train() was called.
    if classify:
        spec = classify_mod.label_spec(cfg.task)
        if cfg.task.init not in ("", "none"):
            init_state, pretrained = classify_mod.read_init(cfg.task.init, trust=t_cfg.trust_checkpoint)
            classify_mod.adopt_pretrained_config(cfg, pretrained, init=cfg.task.init)
            resolved["model"] = dataclasses.asdict(cfg.model)  # what checkpoints and the export rebuild

    # Data first: a bad shard pattern or tokenizer fails before any engine
    # starts, the held-out set's too (not only when the first evaluation needs it).
    # A classifier's loaders decode only the modalities it reads.
    reads = tuple(cfg.task.modalities) if classify else MODALITIES
    loader = checked_loader(
        cfg.data, "train", batch_size=t_cfg.micro_batch_size, info=info, labels=spec, modalities=reads
    )
    heldout_check = checked_loader(
        cfg.data,
        "heldout",
        batch_size=t_cfg.eval_batch_size,
        info=info,
        tokenizer=loader.tokenizer,
        labels=spec,
        modalities=reads,
    )
    # Recorded with every checkpoint and the export: fine-tuning checks it (train.classify).
    resolved["tokenizer_sha256"] = tokenizer_digest(loader.tokenizer)
    # Read once at start (by rank 0), reused by every evaluation.
    heldout_sizes = {u: n for s in heldout_check.sources for u, n in zip(s.urls, s.sizes)}

    resume_from = find_checkpoint(t_cfg.resume, run_dir=run_dir)
    if resume_from is not None:
        # Before any engine or worker starts: a checkpoint that could run code is refused in one line.
        verify_checkpoint(resume_from, trust=t_cfg.trust_checkpoint)
    universal = None  # the checkpoint's universal form, when the world size changed
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
    chunks = contrastive_chunks(t_cfg, info.world_size, accum=accum)  # > 1: gradient caching
    # ZeRO-1/2's flat gradient path reduces through shared memory where it can.
    start_deepspeed_comm(is_main=info.is_main, shared_memory=flat_gradients(ds_config))
    if reshaped:
        if info.is_main:
            log.info(
                "resuming on %d ranks a run saved on %d: global batch %d = %d micro × %d accum × %d ranks",
                info.world_size,
                saved.world_size,
                ds_config["train_batch_size"],
                t_cfg.micro_batch_size,
                accum,
                info.world_size,
            )
        if partitioned(resume_from):
            verify_checkpoint(resume_from, trust=t_cfg.trust_checkpoint)  # the converter unpickles it
            universal = to_universal(resume_from, rank=info.rank)
            ds_config["checkpoint"] = {"load_universal": True}
    lr_scales = None
    if classify:
        class_weights = classify_mod.resolve_class_weights(cfg.task, loader, spec, is_main=info.is_main)
        classifier = classifier_config(dataclasses.asdict(cfg.task), class_weights=class_weights)

        def make_model():
            model = ClassifierModel(cfg.model, cfg.fusion, classifier)
            if init_state is not None:
                attach_weights(
                    model,
                    *classify_mod.init_weights_from(init_state, pretrained, fusion=cfg.fusion, init=cfg.task.init),
                )
            return model

        model = build_model(make_model, ds_config=ds_config)
        if cfg.task.freeze == "none" and cfg.task.lr_decay < 1.0:
            lr_scales = classify_mod.lr_scales(model, cfg.task.lr_decay)
        if init_state is not None and info.is_main:
            source = next(m.pretrained_weights[0] for m in model.modules() if hasattr(m, "pretrained_weights"))
            log.info(
                "initialised %d tensors from task.init=%s%s",
                len(source.loaded),
                cfg.task.init,
                f" ({len(source.missing)} kept fresh: {source.missing[:5]}...)" if source.missing else "",
            )
        init_state = None  # the model holds its copy now
    else:
        model = build_model(
            lambda: PretrainModel(cfg.model, cfg.fusion, cfg.objective, gather=feature_gather(info)),
            ds_config=ds_config,
        )
    engine = build_engine(
        model, ds_config=ds_config, optimizer=cfg.optimizer, total_steps=t_cfg.max_steps, lr_scales=lr_scales
    )
    if t_cfg.compile:
        compile_engine(engine)
    seed_rank_streams(t_cfg.seed, info.rank)  # a resumed run then restores each rank's own state
    device = engine.device
    dtype = compute_dtype(ds_config)
    precision = str(dtype).removeprefix("torch.")
    n_params = parameter_total(model)
    if info.is_main:
        log.info(
            "model %s (%s): %.2fM parameters | %s, %s | global batch %d = %d micro × %d accum × %d ranks",
            cfg.model.name,
            encoder_summary(cfg.model),
            n_params / 1e6,
            zero_summary(ds_config),
            precision,
            ds_config["train_batch_size"],
            t_cfg.micro_batch_size,
            accum,
            info.world_size,
        )
        if classify:
            log.info(
                "task classify: %d classes%s over %s, fusion %s, head %s, %s",
                spec.num_classes,
                " (multi-label)" if spec.multi_label else "",
                "+".join(cfg.task.modalities),
                cfg.fusion.name,
                cfg.task.head,
                "linear probe (encoders frozen)"
                if cfg.task.freeze == "encoders"
                else f"full fine-tuning (lr_decay {cfg.task.lr_decay})",
            )
        if chunks > 1:
            log.info(
                "contrastive batch %d (gradient caching: %d micro batches per rank embedded, then run again)",
                t_cfg.contrastive_batch,
                chunks,
            )
    resumed: dict = {}  # the checkpoint's meta.json, if resuming
    if resume_from is not None:
        resumed, loader_states = load_checkpoint(
            engine, resume_from, rank=info.rank, trust=t_cfg.trust_checkpoint, universal=universal
        )
        if loader.resume(loader_states) and info.is_main:
            log.info("data: the epoch's unread samples are laid out anew over %d ranks", info.world_size)
    start_step = int(resumed.get("step", 0))
    if resume_from is not None and info.is_main:
        log.info("resumed from %s at step %d", resume_from, start_step)
    tracker = Tracker(
        cfg.logger, run_dir=run_dir, config=resolved, is_main=info.is_main, run_id=resumed.get("wandb_run_id")
    )
    batches = iter(loader)
    if t_cfg.log_samples:
        batches = log_samples(batches, loader=loader, path=run_dir / f"samples_rank{info.rank}.jsonl")
    batches = watchdog.watch_batches(batches)
    tracker.summary({"params": n_params, "precision": precision})

    best_metric = cfg.logger.best_metric
    if best_metric == "auto":
        best_metric = "eval/macro_f1" if classify else "eval/image_text/R@1"
    common = dict(cfg=cfg, engine=engine, info=info, tracker=tracker, sizes=heldout_sizes, device=device, dtype=dtype)
    evaluate = ClassifyEvaluation(spec=spec, **common) if classify else RetrievalEvaluation(**common)
    checkpoints = Checkpoints(
        engine=engine,
        loader=loader,
        tracker=tracker,
        evaluation=evaluate,
        best=BestMetric(best_metric, cfg.logger.best_mode, value=resumed.get("best_metric_value")),
        run_dir=run_dir,
        rank=info.rank,
        resolved=resolved,
        keep_last=t_cfg.keep_last,
    )

    token_dropout = any(getattr(cfg.model, m).token_dropout > 0 for m in ("image", "audio"))
    # MFU counts what a step computes: with token dropout, the kept patches.
    window = LogWindow(
        global_batch=ds_config["train_batch_size"],
        flops_per_sample=flops_per_sample(cfg.model, token_dropout=True),
        tokens_per_sample=sum(sequence_lengths(cfg.model).values()),
        peak_flops=t_cfg.peak_flops_per_device,
        world_size=info.world_size,
    )
    stop = stop or StopRequest()
    if stop.requested and info.is_main:
        log.warning("%s arrived during start-up: stopping after the first step", stop.signal_name)
    bad_steps = 0
    step = start_step
    # Token dropout until the final unmasked phase (a no-op without token
    # dropout); a run resumed inside that phase starts without it.
    unmask_at = t_cfg.max_steps - t_cfg.unmasked_steps
    set_token_dropout(engine.module, start_step < unmask_at)
    while step < t_cfg.max_steps:
        watchdog.next_step(step + 1)
        if step == unmask_at and t_cfg.unmasked_steps:  # FLIP's final phase: whole inputs
            set_token_dropout(engine.module, False)
            if token_dropout and info.is_main:
                log.info("step %d: token dropout off for the final %d steps", step + 1, t_cfg.unmasked_steps)
        losses, wait = train_step(engine, batches, accum=accum, device=device, dtype=dtype, chunks=chunks)
        window.data_wait += wait
        if losses is None:
            bad_steps += 1
            log.warning("non-finite loss on some rank: step skipped on all ranks (%d in a row)", bad_steps)
            if bad_steps >= t_cfg.max_bad_steps:
                raise RuntimeError(
                    f"{bad_steps} steps in a row had a non-finite loss (trainer.max_bad_steps="
                    f"{t_cfg.max_bad_steps}); last good step {step}. Check the data and the learning rate."
                )
            continue
        bad_steps = 0
        step += 1
        window.steps += 1
        if step % t_cfg.log_every == 0 or step == t_cfg.max_steps:
            metrics = window.metrics(read_losses(losses), engine=engine, skipped=loader.skipped)
            tracker.log(metrics, step=step)
            if info.is_main:
                skips = {k.removeprefix("data/skipped/"): int(v) for k, v in metrics.items() if "/skipped/" in k}
                log.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.0f samples/s  data wait %.0f%%%s",
                    step,
                    t_cfg.max_steps,
                    metrics["train/loss"],
                    metrics["train/lr"],
                    metrics["perf/samples_per_s"],
                    100 * metrics["perf/data_wait_frac"],
                    f"  skipped so far: {', '.join(f'{k} {v}' for k, v in sorted(skips.items()))}" if skips else "",
                )
        if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step != t_cfg.max_steps:
            evaluate(step)
        ckpt = None
        if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and step != t_cfg.max_steps:
            ckpt = checkpoints.save(step)
        if any_rank(stop.requested):
            # One save per step: saving this step again would rewrite, in place,
            # the directory `latest` already names (a SIGKILL then leaves nothing whole).
            ckpt = ckpt or checkpoints.save(step)
            tracker.finish()
            stop.restore()
            if info.is_main:
                log.warning(
                    "stopped by a signal after step %d; checkpoint %s (resume with the same command)", step, ckpt
                )
            return {"step": step, "checkpoint": str(ckpt), "stopped": True}
    stop.restore()

    # Saved before the final evaluation: a failure there never loses the training.
    # A run resumed at its last step has nothing new to save (and saving the
    # same step again on another world size would mix two runs' rank files).
    ckpt = resume_from if resume_from and step == start_step else checkpoints.save(t_cfg.max_steps, record=False)
    results = evaluate(t_cfg.max_steps)
    checkpoints.record(ckpt, t_cfg.max_steps)
    tracker.summary({f"final/{k}": v for k, v in evaluate.metrics(results, "heldout").items()})
    tracker.summary({"checkpoint": str(ckpt)})
    # Every rank is done with collectives. What follows is rank 0's alone and
    # may take long (export, artifact upload): the others leave now instead of
    # waiting, and the stall watchdog no longer times rank 0 (it is not stuck).
    barrier()
    watchdog.mark_idle()
    if info.is_main and t_cfg.export:
        # The checkpoint is saved; an export that fails (disk full, say) is
        # reported and can be redone with `python -m train.export`.
        try:
            # This run's own checkpoint, just written: nothing to verify.
            weights, config_file, _ = export(ckpt, run_dir / "export" / "model.safetensors", trust=True)
        except Exception as e:  # noqa: BLE001
            log.error(
                "export failed (%s: %s); run: python -m train.export checkpoint=%s out=model.safetensors",
                type(e).__name__,
                e,
                ckpt,
            )
            if t_cfg.fail_on_export_error:
                tracker.finish()
                raise
        else:
            tracker.log_export([weights, config_file], step=t_cfg.max_steps, upload=cfg.logger.upload_export)
            tracker.summary({"export": str(weights)})
            log.info("exported %s", weights)
    wandb_dir = tracker.run_dir
    tracker.finish()
    if info.is_main:
        log.info("checkpoint: %s", ckpt)
        if wandb_dir:
            log.info("W&B run: %s  (inspect: wandb leet inspect --summary %s)", wandb_dir, wandb_dir)
        log.info("%s after %d steps:\n%s", evaluate.title, t_cfg.max_steps, evaluate.table(results))
    if classify:
        return {"step": t_cfg.max_steps, "checkpoint": str(ckpt), "task": "classify", "heldout": results}
    return {"step": t_cfg.max_steps, "checkpoint": str(ckpt), "heldout": results}
