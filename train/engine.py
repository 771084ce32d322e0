"""The DeepSpeed side: config JSON, optimizer, schedule, and the one call to
deepspeed.initialize."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from train.config import DeepSpeedConfig, OptimizerConfig, TrainerConfig

log = logging.getLogger(__name__)


def fast_bf16_available() -> bool:
    """True where bf16 matrix products beat fp32: CUDA with bf16 support, or a
    CPU with AMX / AVX512-BF16. Elsewhere the CPU falls back to a reference
    kernel tens of times slower than fp32 (see benchmarks/precision.py)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.cpu.get_cpu_capability() in ("AVX512_BF16", "AMX")


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16_available() else "fp32"


def build_deepspeed_config(
    *, ds: DeepSpeedConfig, trainer: TrainerConfig, optimizer: OptimizerConfig, world_size: int
) -> dict:
    """The DeepSpeed JSON, built from the Hydra groups in this one place.

    Global batch = micro batch × accumulation steps × world size.
    """
    precision = resolve_precision(ds.precision)
    zero: dict = {"stage": ds.stage}
    if ds.stage > 0:
        zero.update(
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
            overlap_comm=False,
            contiguous_gradients=True,
        )
    return {
        "train_batch_size": trainer.micro_batch_size * trainer.grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": trainer.micro_batch_size,
        "gradient_accumulation_steps": trainer.grad_accum_steps,
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # The optimizer is ours (AdamW with parameter groups); let ZeRO wrap it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases, embeddings, positions and the
    temperature get no weight decay."""
    decay, no_decay = [], []
    no_decay_modules = (nn.LayerNorm, nn.Embedding)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, no_decay_modules) or p.ndim < 2 or name in ("cls", "pos"):
                no_decay.append(p)
            else:
                decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(model: nn.Module, *, ds_config: dict, optimizer: OptimizerConfig, total_steps: int):
    """Wraps the model in a DeepSpeed engine with AdamW and warmup-cosine."""
    import deepspeed

    opt = torch.optim.AdamW(
        param_groups(model, optimizer.weight_decay),
        lr=optimizer.lr,
        betas=(optimizer.beta1, optimizer.beta2),
        eps=optimizer.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: warmup_cosine(
            s, warmup=optimizer.warmup_steps, total=total_steps, min_ratio=optimizer.min_lr_ratio
        ),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine
