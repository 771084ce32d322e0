"""The DeepSpeed side: config JSON, optimizer, schedule, and the one call to
deepspeed.initialize."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from mm_models.model import finish_init, init_module
from train.config import DeepSpeedConfig, OptimizerConfig, TrainerConfig

log = logging.getLogger(__name__)


def quiet_deepspeed_startup() -> None:
    """Before DeepSpeed is first imported: where there is no GPU, name the
    CPU accelerator (else every rank warns that it "fell back" to CPU), and
    keep setuptools' compiler probes (DeepSpeed checks for libaio on import)
    out of the run's log."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    for name in ("compilers.C.base", "distutils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _extension_built(name: str) -> bool:
    """Whether torch's extension cache already holds a JIT-built op."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return os.path.isfile(os.path.join(_get_build_directory(name, verbose=False), f"{name}.so"))
    except Exception:  # a private torch helper: when it moves, just say nothing
        return True


def start_deepspeed_comm(*, is_main: bool, shared_memory: bool = False) -> None:
    """DeepSpeed's communication layer, started once before the model is
    built. On CPU it JIT-compiles a shared-memory op on first use (about a
    minute, silently): say so once instead of pausing without a word, and
    drop the "built successfully" line each rank prints. With shared_memory
    (the ZeRO-1/2 flat gradient path), that op reduces the path's gradients
    and gathers its weights where every rank is on this host
    (train/shm_comm.py)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from train import shm_comm, zero_fastpath

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if (
        builder is not None
        and deepspeed.ops.__compatible_ops__.get(builder.NAME, False)
        and not _extension_built(builder.name)
        and is_main
    ):
        log.info("building DeepSpeed's CPU communication op (first use only; about a minute) ...")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            # adopts our process group; the shared-memory reduce serves only the fast path's patches
            shm_comm.start_comm(shared_memory=shared_memory and zero_fastpath.apply())
    finally:
        rest = [line for line in captured.getvalue().splitlines() if "built successfully" not in line]
        if rest:
            print("\n".join(rest), file=sys.stdout, flush=True)


# CPU flags (as /proc/cpuinfo names them) of native bf16 matrix instructions.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags; empty where /proc/cpuinfo is not readable (not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def cpu_has_fast_bf16(flags: set[str]) -> bool:
    """True for a CPU with AVX512-BF16 or AMX-BF16 among its flags. torch's
    get_cpu_capability() says "AVX512" for these as for plain AVX512, so the
    flags decide."""
    return any(f in flags for f in BF16_CPU_FLAGS)


def fast_bf16_available() -> bool:
    """True where bf16 matrix products beat fp32: CUDA with bf16 support, or a
    CPU with AMX / AVX512-BF16 (measured there: 429 against 189 GFLOP/s).
    Elsewhere the CPU falls back to a reference kernel tens of times slower
    than fp32 (see benchmarks/precision.py)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16(cpu_flags())


def check_precision(precision: str, *, cuda: bool) -> None:
    """deepspeed.precision is one this machine (with CUDA GPUs or not) can compute."""
    if precision == "fp16" and not cuda:
        raise ValueError(
            "deepspeed.precision=fp16 needs a CUDA GPU: DeepSpeed computes fp16 on GPUs only. "
            "Use deepspeed.precision=bf16 or fp32 (or auto) on this machine."
        )


def resolve_precision(precision: str) -> str:
    """fp32, bf16 or fp16 for deepspeed.precision (auto included)."""
    check_precision(precision, cuda=torch.cuda.is_available())
    if precision != "auto":
        return precision
    return "bf16" if fast_bf16_available() else "fp32"


def compute_dtype(ds_config: dict) -> torch.dtype:
    """The dtype the engine's parameters and inputs use."""
    if ds_config["bf16"]["enabled"]:
        return torch.bfloat16
    if ds_config["fp16"]["enabled"]:
        return torch.float16
    return torch.float32


def batch_sizes(trainer: TrainerConfig, world_size: int) -> tuple[int, int, int]:
    """(micro, accumulation steps, global): global = micro × accum × world size.

    The one place the three are related. With trainer.global_batch_size set,
    the accumulation steps are derived from it; otherwise the global batch is
    (and with trainer.contrastive_batch set and no accumulation asked for, the
    global batch is one contrastive batch). The global batch is checked to be
    a whole number of contrastive batches (see contrastive_chunks).
    """
    micro, accum = trainer.micro_batch_size, trainer.grad_accum_steps
    if trainer.global_batch_size <= 0:
        if trainer.contrastive_batch > 0 and accum == 1:
            accum = contrastive_chunks(trainer, world_size, accum=None)  # one contrastive batch
        else:
            contrastive_chunks(trainer, world_size, accum=accum)
        return micro, accum, micro * accum * world_size
    per_step = micro * world_size
    derived, remainder = divmod(trainer.global_batch_size, per_step)
    if remainder or derived < 1:
        raise ValueError(
            f"trainer.global_batch_size={trainer.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size={micro} × {world_size} ranks = {per_step}"
        )
    if accum not in (1, derived):
        raise ValueError(
            f"trainer.global_batch_size={trainer.global_batch_size} with trainer.micro_batch_size={micro} on "
            f"{world_size} ranks needs {derived} accumulation steps, but trainer.grad_accum_steps={accum}; "
            "set one of the two"
        )
    contrastive_chunks(trainer, world_size, accum=derived)
    return micro, derived, trainer.global_batch_size


def contrastive_chunks(trainer: TrainerConfig, world_size: int, *, accum: int | None) -> int:
    """Micro batches per rank in one contrastive batch (1: no gradient
    caching). Raises ValueError, naming the numbers and a fix, when
    trainer.contrastive_batch is not a whole number of micro batches × ranks,
    or (given the accumulation steps) the global batch not a whole number of
    contrastive batches."""
    micro, wanted = trainer.micro_batch_size, trainer.contrastive_batch
    if wanted <= 0:
        return 1
    per_step = micro * world_size
    chunks, remainder = divmod(wanted, per_step)
    if remainder or chunks < 1:
        fits = max(per_step, wanted // per_step * per_step)
        raise ValueError(
            f"trainer.contrastive_batch={wanted} is not a multiple of trainer.micro_batch_size={micro} × "
            f"{world_size} ranks = {per_step}; use trainer.contrastive_batch={fits}"
        )
    if accum is not None and accum % chunks:
        raise ValueError(
            f"the global batch {micro * accum * world_size} (trainer.micro_batch_size={micro} × {accum} "
            f"accumulation steps × {world_size} ranks) is not a multiple of trainer.contrastive_batch={wanted}; "
            f"set trainer.global_batch_size to a multiple of {wanted}"
        )
    return chunks


def _loss_scaling(ds: DeepSpeedConfig) -> dict:
    return {
        "loss_scale": ds.loss_scale,
        "initial_scale_power": ds.initial_scale_power,
        "loss_scale_window": ds.loss_scale_window,
        "hysteresis": ds.hysteresis,
        "min_loss_scale": ds.min_loss_scale,
    }


def build_deepspeed_config(
    *, ds: DeepSpeedConfig, trainer: TrainerConfig, optimizer: OptimizerConfig, world_size: int
) -> dict:
    """The DeepSpeed JSON, built from the Hydra groups in this one place."""
    precision = resolve_precision(ds.precision)
    micro, accum, global_batch = batch_sizes(trainer, world_size)
    zero: dict = {"stage": ds.stage}
    if ds.stage > 0:
        zero.update(
            reduce_bucket_size=ds.reduce_bucket_size,
            allgather_bucket_size=ds.allgather_bucket_size,
            overlap_comm=False,
            contiguous_gradients=True,
        )
    if ds.stage in (1, 2) and ds.flat_gradients and ds.offload_optimizer == "none" and precision != "fp16":
        # One all-reduce per bucket, added into the flat partition buffer (train/zero_fastpath.py).
        zero["reduce_scatter"] = False
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", **(_loss_scaling(ds) if precision == "fp16" else {})},
        # The optimizer is ours (AdamW with parameter groups); let ZeRO wrap it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def offloads_optimizer(ds_config: dict) -> bool:
    return "offload_optimizer" in ds_config["zero_optimization"]


def flat_gradients(ds_config: dict) -> bool:
    """Whether the DeepSpeed JSON asks for the ZeRO-1/2 flat gradient path
    (build_deepspeed_config sets reduce_scatter false for it)."""
    return ds_config["zero_optimization"].get("reduce_scatter") is False


def build_model(build, *, ds_config: dict):
    """Calls build() to construct the model and initialises its weights.

    Under ZeRO-3 the model is constructed inside deepspeed.zero.Init: each
    module's parameters are partitioned as soon as the module exists, so no
    rank ever holds the whole model. init_weights then runs one module at a
    time, gathering only that module's own parameters.
    """
    if ds_config["zero_optimization"]["stage"] != 3:
        model = build()
        model.init_weights()
        return model
    import deepspeed

    deepspeed.init_distributed()  # adopts the existing process group; zero.Init sizes partitions by it
    # zero.Init patches torch.Tensor.__new__ while active; torch._dynamo, when
    # first imported then (transformers imports it), refuses the patched
    # signature. Imported here, before, it is left alone.
    import torch._dynamo  # noqa: F401

    # The dtype comes from the config (passing one explicitly is ignored on CPU).
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = build()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            # Every rank runs the same seeded init (RNG streams stay in step);
            # rank 0's values are the ones kept.
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                init_module(module)
        else:
            init_module(module)  # buffers only: they are not partitioned
    finish_init(model)
    return model


def parameter_total(model: nn.Module) -> int:
    """All parameters, counted whole even when ZeRO-3 holds a shard."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def param_groups(
    model: nn.Module, weight_decay: float, *, lr: float | None = None, lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """Decay matrices only: norms, biases, embeddings, positions and the
    temperature get no weight decay. With lr_scales (parameter name ->
    multiplier of lr; layer-wise decay), one group per distinct multiplier."""
    no_decay_modules = (nn.LayerNorm, nn.Embedding)
    groups: dict[tuple[bool, float], list] = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            # ds_shape: the full shape of a parameter ZeRO-3 has partitioned.
            ndim = len(getattr(p, "ds_shape", p.shape))
            decay = not (isinstance(module, no_decay_modules) or ndim < 2 or name in ("cls", "pos"))
            full = f"{module_name}.{name}" if module_name else name
            scale = (lr_scales or {}).get(full, 1.0)
            groups.setdefault((decay, scale), []).append(p)
    out = []
    for (decay, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if lr_scales is not None and lr is not None:
            group["lr"] = lr * scale
        out.append(group)
    return out


def warmup_cosine(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(
    model: nn.Module,
    *,
    ds_config: dict,
    optimizer: OptimizerConfig,
    total_steps: int,
    lr_scales: dict[str, float] | None = None,
):
    """Wraps the model in a DeepSpeed engine with AdamW and warmup-cosine."""
    import deepspeed

    from train import zero_fastpath

    flat = flat_gradients(ds_config)
    if flat and not zero_fastpath.apply():  # another DeepSpeed release: its own path, as it ships
        del ds_config["zero_optimization"]["reduce_scatter"]
        flat = False
    if flat:  # where the comm layer is not started yet (train.run starts it before the model)
        start_deepspeed_comm(is_main=not dist.is_initialized() or dist.get_rank() == 0, shared_memory=True)
    opt = build_optimizer(model, optimizer, cpu_offload=offloads_optimizer(ds_config), lr_scales=lr_scales)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=build_schedule(opt, optimizer, total_steps), config=ds_config
    )
    if flat:
        zero_fastpath.share_fp32_master(engine.optimizer)  # fp32: no second copy of the weights
    clip_with_torch(engine)
    if engine.dp_world_size == 1 and ds_config["zero_optimization"]["stage"] == 0:
        # One data-parallel rank: the post-backward gradient all-reduce would
        # only copy every gradient into a bucket and back (about 14% of a step).
        engine.enable_backward_allreduce = False
    return engine


def clip_with_torch(engine) -> bool:
    """ZeRO-0 in fp32 (the one case where the DeepSpeed engine clips the
    model's gradients itself): clip with torch's clip_grad_norm_ instead of
    DeepSpeed's, and keep the norm for get_global_grad_norm().

    DeepSpeed's version takes a norm and a multiply per parameter in Python
    plus an all-reduce of the norm (which averages MoE experts' norms across
    ranks), about 5% of a step of model=small, and drops the norm it found,
    so train/grad_norm was logged as 0. torch's fused version makes two
    passes over all gradients. The same norm where there is no MoE and no
    model parallelism (every rank holds the same averaged gradients by then);
    elsewhere DeepSpeed's stays."""
    if (
        engine.zero_optimization_stage() != 0
        or engine.fp16_enabled()
        or engine.bfloat16_enabled()
        or engine.gradient_clipping() <= 0.0
        or engine.mpu is not None
        or engine.has_moe_layers
    ):
        return False
    params = [p for p in engine.module.parameters() if p.requires_grad]
    max_norm = engine.gradient_clipping()

    def clip_fp32_gradients() -> None:
        engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    engine.clip_fp32_gradients = clip_fp32_gradients
    return True


def build_optimizer(
    model: nn.Module,
    optimizer: OptimizerConfig,
    *,
    cpu_offload: bool = False,
    lr_scales: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    """AdamW over param_groups.

    Normally torch AdamW with the fused kernel: one pass over each tensor
    instead of a dozen; on CPU it steps several times faster, most of all on
    the large flat partitions ZeRO-1/2 hand it. With ZeRO-Offload the step
    runs on CPU copies of the parameters: DeepSpeed's vectorised CPU AdamW
    (compiled on first use) in decoupled-decay mode.
    """
    groups = param_groups(model, optimizer.weight_decay, lr=optimizer.lr, lr_scales=lr_scales)
    kw = dict(lr=optimizer.lr, betas=(optimizer.beta1, optimizer.beta2), eps=optimizer.eps)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=True, **kw)


def build_schedule(opt: torch.optim.Optimizer, optimizer: OptimizerConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: warmup_cosine(s, warmup=optimizer.warmup_steps, total=total_steps, min_ratio=optimizer.min_lr_ratio),
    )
