"""Structured configs for every Hydra group, registered in the ConfigStore.

The schema is the first entry of conf/config.yaml's defaults, so a typo in a
key or a wrong type fails at start with the key's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, List

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data_pipeline.config import DataConfig
from mm_models.config import FusionConfig, ModelConfig, ObjectiveConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


# The choices of a key are an Enum: OmegaConf refuses any other value when the
# config is composed, naming the key and the choices. Members compare equal to
# their strings ("bf16"), so code and YAML use plain strings.
class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    auto = "auto"


class OffloadDevice(StrEnum):
    none = "none"
    cpu = "cpu"


class LoggerMode(StrEnum):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


class BestMode(StrEnum):
    max = "max"
    min = "min"


class OptimizerName(StrEnum):
    adamw = "adamw"


class TaskName(StrEnum):
    pretrain = "pretrain"
    classify = "classify"


class Head(StrEnum):
    linear = "linear"
    mlp = "mlp"


class Freeze(StrEnum):
    none = "none"
    encoders = "encoders"


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch_size: int = 32  # per rank, per micro step
    grad_accum_steps: int = 1
    # Samples per optimizer step over all ranks. 0: micro × accumulation × ranks.
    # Set it to fix the global batch whatever the world size; the accumulation
    # steps are then derived (see train.engine.batch_sizes).
    global_batch_size: int = 0
    # Samples over all ranks that the contrastive losses (InfoNCE, SigLIP) see
    # together, by gradient caching: each group of contrastive_batch /
    # (micro × ranks) micro batches is embedded without activations, its loss
    # and embedding gradients are computed over the whole group, and each
    # micro batch is run again (same random state) to backpropagate them.
    # 0: the micro batch × ranks, as without caching. The global batch is a
    # multiple of it (with neither global_batch_size nor grad_accum_steps set,
    # it is the global batch).
    contrastive_batch: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 0  # 0: checkpoint at the end only
    eval_batch_size: int = 128
    seed: int = 0
    keep_last: int = 3  # checkpoints kept; older ones are deleted (0 keeps all)
    # Steps in a row with a non-finite loss (skipped on all ranks) before the run stops.
    max_bad_steps: int = 10
    # Per-device peak FLOP/s for MFU (e.g. 989e12 for an H100 in bf16); 0: MFU not logged.
    peak_flops_per_device: float = 0.0
    # auto: continue from the newest complete checkpoint in the run directory;
    # none: start fresh; or a checkpoint path.
    resume: str = "auto"
    threads: int = 0  # torch intra-op threads per rank; 0 = cores / local ranks
    # Seconds a rank may go without progress in a training step, checkpoint or
    # evaluation (e.g. waiting on a stalled rank) before every rank exits,
    # naming the rank that is behind and what it was doing (train.watchdog).
    collective_timeout: int = 1800
    # Append each rank's consumed sample keys to samples_rank{r}.jsonl (an audit of
    # exactly-once reading across stops, restarts and requeues).
    log_samples: bool = False
    # FLIP's final phase: the last this-many steps train without token dropout
    # (model.<modality>.token_dropout), so the model meets whole inputs before
    # evaluation. 0: token dropout until the end.
    unmasked_steps: int = 0
    # At the end, write OUT/export/model.safetensors (+ .json), as train.export does.
    export: bool = True
    # An export that fails is logged (and can be redone with train.export);
    # with this, it fails the run (tests, pipelines that need the export).
    fail_on_export_error: bool = False
    # Checkpoints (trainer.resume, task.init) are verified to hold only
    # tensors and DeepSpeed's plain state before DeepSpeed unpickles them
    # (a crafted file could otherwise run code); true skips the check.
    trust_checkpoint: bool = False
    # Deterministic kernels only (torch.use_deterministic_algorithms): with
    # it, a resumed or restarted run repeats the uninterrupted one bit for bit.
    deterministic: bool = False
    # Compile the model with torch.compile through DeepSpeed's engine.compile()
    # (inductor; on CPU it needs a C++ compiler, e.g. Debian's g++). The first
    # steps pay the compilation.
    compile: bool = False


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    stage: int = 2  # ZeRO stage 0-3
    # "auto" picks bf16 where the hardware computes it fast (CUDA with bf16,
    # CPUs with AMX or AVX512-BF16) and fp32 elsewhere. fp16 (CUDA only) uses
    # dynamic loss scaling unless loss_scale is set.
    precision: Precision = Precision.auto
    # ZeRO-Offload: keep optimizer states (any stage >= 1) or parameters
    # (stage 3) in CPU memory; the optimizer then runs on the CPU.
    offload_optimizer: OffloadDevice = OffloadDevice.none
    offload_param: OffloadDevice = OffloadDevice.none
    # fp16 loss scaling: 0 = dynamic, starting at 2**initial_scale_power,
    # halved on overflow, doubled after loss_scale_window clean steps.
    loss_scale: float = 0.0
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    hysteresis: int = 2
    min_loss_scale: float = 1.0
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    # ZeRO-1/2 in fp32 or bf16 without optimizer offload: reduce each
    # gradient bucket straight into a flat buffer laid out as this rank's
    # optimizer partition, take the gradient norm of that buffer in one
    # pass, and on CPU reduce through shared memory where every rank is on
    # one machine (train/zero_fastpath.py); false runs DeepSpeed's own path.
    flat_gradients: bool = True


@dataclass
class LoggerConfig:
    # auto: online when WANDB_API_KEY is set, offline otherwise.
    mode: LoggerMode = LoggerMode.auto
    project: str = "mmpretrain"
    entity: str | None = None
    name: str | None = None
    tags: List[str] = field(default_factory=list)
    # Each checkpoint is logged as a W&B artifact of type "model" (a reference
    # to its directory) with the aliases "latest" and, when the eval metric
    # best_metric improves on every earlier checkpoint's, "best".
    # auto: eval/image_text/R@1 (pretrain), eval/macro_f1 (classify).
    best_metric: str = "auto"
    best_mode: BestMode = BestMode.max
    # Rows of the held-out retrieval table logged at each evaluation (0: none).
    table_rows: int = 8
    # The end-of-run export: uploaded with the run (true) or a reference to the file.
    upload_export: bool = True


@dataclass
class TaskConfig:
    # pretrain: contrastive (+ fused) pretraining on image-audio-text tuples.
    # classify: a fused classifier trained on the labels in each sample's
    # .json (data.label_key, or a class name under data.class_key).
    name: TaskName = TaskName.pretrain
    # classify: where the encoders start: an exported model.safetensors, a
    # training checkpoint (run directory, checkpoints/ or a step directory), or
    # none (random initialisation, for comparison). The model config comes
    # with the weights.
    init: str = "none"
    modalities: List[str] = field(default_factory=lambda: ["image", "audio", "text"])
    # The classes: num_classes, or the names in index order (then a label may
    # also be a class name); with both, their lengths must agree.
    num_classes: int = 0
    classes: List[str] = field(default_factory=list)
    # A list of labels per sample, a sigmoid per class, binary cross-entropy.
    multi_label: bool = False
    head: Head = Head.linear  # linear, or mlp (head_hidden sizes, GELU, head_dropout)
    head_hidden: List[int] = field(default_factory=lambda: [256])
    head_dropout: float = 0.1
    # none: full fine-tuning; encoders: a linear probe (only fusion and head train).
    freeze: Freeze = Freeze.none
    # Full fine-tuning: each encoder layer gets lr × lr_decay^(layers above it)
    # (1.0: one learning rate everywhere; 0.65-0.75 is usual for ViTs).
    lr_decay: float = 1.0
    # none; auto: inversely proportional to each class's frequency in the
    # training shards (multi-label: negatives/positives), read once at start;
    # or a list with one weight per class.
    class_weights: Any = "none"
    label_smoothing: float = 0.0
    # Multi-label: a class is predicted where its probability exceeds this.
    threshold: float = 0.5


@dataclass
class Config:
    model: ModelConfig = MISSING
    fusion: FusionConfig = MISSING
    objective: ObjectiveConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    data: DataConfig = MISSING
    deepspeed: DeepSpeedConfig = MISSING
    logger: LoggerConfig = MISSING
    task: TaskConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


# Hydra config groups: an override "model=small" picks a file, it is not a key.
GROUPS = ("model", "fusion", "objective", "optimizer", "data", "deepspeed", "logger", "task", "experiment")


def schema_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key the structured config defines ("trainer.max_steps", ...)."""
    import dataclasses

    cls = cls or Config
    keys = []
    hints = __import__("typing").get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        if dataclasses.is_dataclass(hints.get(f.name)):
            keys += schema_keys(hints[f.name], f"{key}.")
    return keys


def closest_key(key: str, known: set[str]) -> str | None:
    """The key a typo most likely meant: a sibling the typed name starts or
    ends (max_step -> max_steps, patch -> patch_size), else the closest by
    spelling, among siblings first."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    for name, full in sorted(siblings.items()):
        if name.startswith(leaf) or leaf.startswith(name):
            return full
    close = difflib.get_close_matches(leaf, sorted(siblings), n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def check_override_keys(overrides: list[str]) -> None:
    """Refuses an override of a key the schema does not define, with or
    without Hydra's '+' (which would otherwise add it unused to the saved
    config), naming the closest key: "did you mean trainer.max_steps?"."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    known = set(schema_keys())
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return  # malformed: Hydra reports it with its own message
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra" or (key in GROUPS and "." not in key):
            continue
        if override.is_delete() or key in known:
            continue
        if any(
            key.startswith(k + ".")
            for k in known
            if k in ("data.sources", "data.prompts", "data.require", "logger.tags")
        ):
            continue
        guess = closest_key(key, known)
        hint = f"; did you mean {guess}?" if guess else " (see conf/ and train/config.py for the keys)"
        raise ValueError(f"unknown config key {key!r} in override {override.input_line!r}{hint}")


def compose(overrides: list[str], *, hydra_keys: bool = False):
    """The training config `python -m train OVERRIDES` would run with, as a
    DictConfig, composed outside a Hydra app (launchers, benchmarks, tests).
    hydra_keys: also compose the hydra.* section, so overrides of it are checked."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    check_override_keys(overrides)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides, return_hydra_config=hydra_keys)


def _tokenizer_vocab(directory: str) -> int | None:
    """Token count of a save_pretrained tokenizer directory, as the loader
    will read it; None where it has no tokenizer.json (the loader names that)."""
    from data_pipeline.tokenizer import load_tokenizer

    try:
        return load_tokenizer(directory).vocab_size
    except FileNotFoundError:
        return None


def validate(cfg: Config) -> None:
    """Checks that types alone cannot express; each error names the key."""
    if cfg.deepspeed.stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.stage={cfg.deepspeed.stage}; choose 0, 1, 2 or 3")
    if cfg.deepspeed.offload_optimizer != "none" and cfg.deepspeed.stage == 0:
        raise ValueError("deepspeed.offload_optimizer needs deepspeed.stage 1, 2 or 3")
    if cfg.deepspeed.offload_param != "none" and cfg.deepspeed.stage != 3:
        raise ValueError("deepspeed.offload_param needs deepspeed.stage=3")
    for key in (
        "max_steps",
        "micro_batch_size",
        "grad_accum_steps",
        "log_every",
        "eval_batch_size",
        "collective_timeout",
    ):
        if getattr(cfg.trainer, key) < 1:
            raise ValueError(f"trainer.{key} must be at least 1, got {getattr(cfg.trainer, key)}")
    if not 0 <= cfg.trainer.unmasked_steps <= cfg.trainer.max_steps:
        raise ValueError(
            f"trainer.unmasked_steps={cfg.trainer.unmasked_steps}: give 0 to "
            f"trainer.max_steps ({cfg.trainer.max_steps})"
        )
    if cfg.trainer.contrastive_batch < 0:
        raise ValueError(f"trainer.contrastive_batch={cfg.trainer.contrastive_batch}: give 0 (off) or a sample count")
    if cfg.trainer.contrastive_batch and cfg.trainer.compile:
        # train.gradcache replays each micro batch's recorded random state in its
        # second pass; that equality is proven in eager mode only (a compiled
        # forward draws its dropout and token-dropout masks its own way).
        raise ValueError(
            f"trainer.compile=true with trainer.contrastive_batch={cfg.trainer.contrastive_batch}: gradient caching "
            "needs each micro batch's second pass to draw the first pass's dropout and token-dropout masks, which "
            "holds in eager mode only; set trainer.compile=false or trainer.contrastive_batch=0"
        )
    from mm_models.encoders import check_token_dropout

    for modality in ("image", "audio", "text"):
        check_token_dropout(cfg.model, modality)
    from mm_models.encoders import arch_name

    for modality in ("image", "audio", "text"):
        arch = arch_name(cfg.model, modality)  # an unknown arch names the choices
        pretrained = getattr(cfg.model, modality).pretrained
        if arch == "hf" and not pretrained:
            raise ValueError(
                f"model.{modality}.arch=hf needs model.{modality}.pretrained=DIR (a local save_pretrained directory)"
            )
        if arch == "hf" and not Path(pretrained, "config.json").is_file():
            raise ValueError(
                f"model.{modality}.pretrained={pretrained}: no config.json there "
                "(expected a directory written by save_pretrained)"
            )
    pretrained_tokenizer = Path(cfg.data.tokenizer).is_dir()
    if arch_name(cfg.model, "text") == "hf":
        if not pretrained_tokenizer:
            raise ValueError(
                f"model.text.arch=hf reads its own token ids, but data.tokenizer={cfg.data.tokenizer!r}; "
                f"set data.tokenizer={cfg.model.text.pretrained} (the backbone's tokenizer)"
            )
        backbone_vocab = json.loads(Path(cfg.model.text.pretrained, "config.json").read_text()).get("vocab_size")
        tokenizer_vocab = _tokenizer_vocab(cfg.data.tokenizer)
        if backbone_vocab and tokenizer_vocab and tokenizer_vocab > backbone_vocab:
            raise ValueError(
                f"data.tokenizer={cfg.data.tokenizer} has {tokenizer_vocab} tokens, the text backbone "
                f"model.text.pretrained={cfg.model.text.pretrained} only {backbone_vocab}: "
                "use the backbone's own tokenizer"
            )
    if pretrained_tokenizer and cfg.objective.masked_text_weight > 0:
        raise ValueError(
            "objective.masked_text_weight > 0 needs our own text tokenizer (its MASK and first "
            f"text ids); data.tokenizer={cfg.data.tokenizer} is a pretrained model's"
        )
    from data_pipeline.config import worker_count

    worker_count(cfg.data.num_workers)  # "auto" or an integer >= 0, else an error naming the key
    if cfg.data.cache_dir and not cfg.data.cache_max_gb > 0:
        raise ValueError(f"data.cache_max_gb must be positive with data.cache_dir set, got {cfg.data.cache_max_gb}")
    if cfg.trainer.global_batch_size < 0:
        raise ValueError(
            f"trainer.global_batch_size must be 0 (derived) or positive, got {cfg.trainer.global_batch_size}"
        )
