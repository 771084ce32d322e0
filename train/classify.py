"""task=classify's library: labels, class weights, where the encoders start
(task.init) and layer-wise learning-rate decay. Its metrics are
train.classify_metrics; the task the run asks is train.tasks.classify."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.labels import LabelError, LabelSpec
from mm_models.classifier import StateDictWeights, classifier_config
from mm_models.config import FusionConfig, ModelConfig
from mm_models.io import from_dict

log = logging.getLogger(__name__)

# Data settings the pretrained encoders were built for: fine-tuning data must decode the same way.
GEOMETRY = (
    "image_size",
    "n_mels",
    "audio_frames",
    "max_text_len",
    "sample_rate",
    "n_fft",
    "hop_length",
    "audio_features",
)


def label_spec(task) -> LabelSpec:
    try:
        return LabelSpec(num_classes=task.num_classes, classes=tuple(task.classes), multi_label=task.multi_label)
    except ValueError as e:
        raise ValueError(f"task: {e}") from None


def check_task(task) -> None:
    """The classify settings, checked at start; each error names the key.
    (task.init is read by train.preflight, which adopts its model config.)"""
    if not 0.0 < task.lr_decay <= 1.0:
        raise ValueError(f"task.lr_decay={task.lr_decay} must be in (0, 1]")
    if not 0.0 < task.threshold < 1.0:
        raise ValueError(f"task.threshold={task.threshold} must be in (0, 1)")
    weights = task.class_weights
    if not (isinstance(weights, str) and weights in ("none", "auto")) and not isinstance(weights, (list, tuple)):
        raise ValueError(f"task.class_weights={weights!r}; choose none, auto or a list of one weight per class")
    label_spec(task)  # the classes, checked
    classifier_config(
        dataclasses.asdict(task) if dataclasses.is_dataclass(task) else dict(task),
        class_weights=list(weights) if isinstance(weights, (list, tuple)) else (),
    ).check()


# -- where the encoders start ------------------------------------------------------------------


def read_init(init: str, *, peek: bool = False, trust: bool = False) -> tuple[dict | None, dict]:
    """(state dict, training config) of task.init: an exported .safetensors
    (safe to read from anyone) or a checkpoint directory of ours. With peek,
    only the config (a start-up check; no weights are read)."""
    from mm_models.io import read_config
    from train.export import CheckpointError, consolidate, read_meta, resolve_step_dir

    path = Path(init)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ValueError(f"task.init={init}: no such file")
        config = read_config(path)
        if peek:
            return None, config
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu"), config
    if not path.is_dir():
        raise ValueError(
            f"task.init={init}: neither an exported .safetensors file nor a checkpoint directory "
            "(or set task.init=none to start from random weights)"
        )
    try:
        step_dir = resolve_step_dir(path)
        config = read_meta(step_dir)["config"]
    except CheckpointError as e:
        raise ValueError(f"task.init={init}: {e}") from None
    if peek:
        return None, config
    try:
        return consolidate(step_dir, trust=trust), config
    except CheckpointError as e:
        raise ValueError(f"task.init={init}: {e}") from None


def adopt_pretrained_config(cfg, pretrained: dict, *, init: str) -> None:
    """The model config of task.init replaces cfg.model (the weights need
    it); the data must decode as the pretraining data did, and the text
    must use the same tokenizer."""
    model = from_dict(ModelConfig, pretrained["model"], where=f"{init}: model")
    data = pretrained.get("data", {})
    wrong = [
        f"data.{k}={getattr(cfg.data, k)} (pretrained with {data[k]})"
        for k in GEOMETRY
        if k in data and data[k] != getattr(cfg.data, k)
    ]
    if wrong:
        raise ValueError(
            f"task.init={init} was pretrained on other input geometry: "
            + ", ".join(wrong)
            + "; set these to the pretrained values"
        )
    theirs, ours = str(data.get("tokenizer", "byte")), cfg.data.tokenizer
    recorded = pretrained.get("tokenizer_sha256")
    if recorded:
        # What the text tower's token ids mean: the same tokenizer, wherever its file lies, digests the same.
        from data_pipeline.tokenizer import load_tokenizer, tokenizer_digest

        try:
            mine = tokenizer_digest(load_tokenizer(ours))
        except Exception:  # noqa: BLE001 - an unreadable tokenizer is reported by the start-up checks
            mine = recorded
        if mine != recorded:
            raise ValueError(
                f"task.init={init} was pretrained with the tokenizer {theirs!r} (digest {recorded}); "
                f"data.tokenizer={ours!r} is another one (digest {mine}): its token ids would mean other "
                f"tokens. Set data.tokenizer={theirs}"
            )
    elif (theirs == "byte") != (ours == "byte"):
        raise ValueError(
            f"task.init={init} was pretrained with data.tokenizer={theirs!r}, this run uses {ours!r}: "
            "captions would map to other tokens; use the pretraining tokenizer"
        )
    cfg.model = model


def init_weights_from(
    state: dict, pretrained: dict, *, fusion: FusionConfig, init: str
) -> tuple[StateDictWeights, tuple]:
    """The source of initial values, and the module prefixes it covers: the
    encoders always, the fusion too when it is the pretrained one (same
    strategy and sizes)."""
    source = StateDictWeights(state, origin=f"task.init={init}")
    prefixes: tuple[str, ...] = ("model.",)
    theirs = pretrained.get("fusion", {})
    if fusion.name != "none" and {k: theirs.get(k) for k in dataclasses.asdict(fusion)} == dataclasses.asdict(fusion):
        prefixes += ("fusion.",)
    return source, prefixes


# -- class weights -----------------------------------------------------------------------------


def read_labels(shards, data: DataConfig, spec: LabelSpec, *, take: int | None = None):
    """For each sample position of the (url, size) shards, the first `take`
    of each (default all): (Skip, None) where the shard yields no sample,
    else (sample, its label or the LabelError saying why it has none).
    Labels only: the .json members are parsed, nothing is decoded."""
    from data_pipeline.sources import Skip, read_shard

    for url, size in shards:
        for item in read_shard(url, size=size, take=None if take is None else min(size, take)):
            if isinstance(item, Skip):
                yield item, None
                continue
            try:
                yield item, spec.read(item.get("json"), label_key=data.label_key, class_key=data.class_key)
            except LabelError as e:
                yield item, e


def count_labels(loader, spec: LabelSpec) -> tuple[np.ndarray, int, Counter]:
    """Per-class counts over every training shard (see read_labels).
    Returns (counts, labelled samples, skips by reason)."""
    from data_pipeline.sources import Skip

    counts = np.zeros(spec.num_classes, dtype=np.int64)
    labelled, skipped = 0, Counter()
    shards = ((url, size) for source in loader.sources for url, size in zip(source.urls, source.sizes))
    for item, value in read_labels(shards, loader.cfg, spec):
        if isinstance(item, Skip) or isinstance(value, LabelError):
            skipped[item.reason if isinstance(item, Skip) else value.reason] += 1
            continue
        for c in value if spec.multi_label else [value]:
            counts[c] += 1
        labelled += 1
    return counts, labelled, skipped


def auto_class_weights(counts: np.ndarray, labelled: int, *, multi_label: bool) -> list[float]:
    """Single-label: n / (C × count_c) (scikit-learn's "balanced"); multi-label:
    negatives / positives per class. A class never seen gets weight 1."""
    counts = counts.astype(np.float64)
    if multi_label:
        w = np.where(counts > 0, (labelled - counts) / np.maximum(counts, 1), 1.0)
    else:
        w = np.where(counts > 0, labelled / (len(counts) * np.maximum(counts, 1)), 1.0)
    return [float(x) for x in w]


def shared_label_counts(loader, spec: LabelSpec, *, is_main: bool) -> tuple[np.ndarray, int, Counter]:
    """count_labels, run by rank 0 alone and handed to every rank
    (broadcast_object_list): the training corpus is read once, not once per
    rank, and every rank weighs the classes alike (a transient read error on
    one rank can no longer give it other weights, and another loss). An
    error on rank 0 is raised on every rank."""
    import builtins

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return count_labels(loader, spec)
    box: list = [None]
    failed: BaseException | None = None
    if is_main:
        try:
            box[0] = ("ok", count_labels(loader, spec))
        except Exception as e:  # noqa: BLE001 - the other ranks wait in the broadcast: they must hear of it
            failed = e
            box[0] = ("error", type(e).__name__, str(e))
    dist.broadcast_object_list(box, src=0)
    if failed is not None:
        raise failed
    if box[0][0] == "error":
        _, name, message = box[0]
        where = "rank 0, counting the training labels for task.class_weights=auto"
        kind = getattr(builtins, name, None)  # the same kind of error where it can be made from its message
        try:
            error = kind(f"{where}: {message}") if isinstance(kind, type) and issubclass(kind, Exception) else None
        except TypeError:
            error = None
        raise error or RuntimeError(f"{where}: {name}: {message}")
    return box[0][1]


def resolve_class_weights(task, loader, spec: LabelSpec, *, is_main: bool) -> list[float]:
    """task.class_weights as a list (empty for none). With auto, rank 0
    counts the training labels and every rank gets its counts
    (shared_label_counts), so every rank computes the same weights."""
    weights = task.class_weights
    if isinstance(weights, str) and weights == "none":
        return []
    if isinstance(weights, str) and weights == "auto":
        counts, labelled, skipped = shared_label_counts(loader, spec, is_main=is_main)
        if labelled == 0:
            raise ValueError(
                f"task.class_weights=auto: no training sample has a usable label "
                f"(skipped: {dict(skipped)}); check data.label_key={loader.cfg.label_key!r}"
            )
        out = auto_class_weights(counts, labelled, multi_label=spec.multi_label)
        if is_main:
            log.info(
                "class weights (auto, from %d labelled training samples): %s",
                labelled,
                ", ".join(f"{spec.name(i)} {w:.2f}" for i, w in enumerate(out)),
            )
        return out
    return [float(w) for w in weights]


# -- layer-wise learning-rate decay ------------------------------------------------------------

_BLOCK = __import__("re").compile(r"\.(?:blocks|stages|layers|layer|h)\.(\d+)\.|_l(\d+)(?:_reverse)?$")


def lr_scales(model: torch.nn.Module, decay: float) -> dict[str, float]:
    """Parameter name -> learning-rate multiplier (BEiT's scheme). Fusion,
    head and an encoder's parts above its blocks (final norm, projection): 1.
    In an encoder of L blocks, block i (0 = nearest the input) gets
    decay^(L-i), and what comes before the blocks (stem, embeddings,
    positions) decay^(L+1). Blocks are found by name (blocks.N, stages.N,
    layer.N, an RNN's _lN); before and above by registration order."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    out = {n: 1.0 for n in names}
    if decay >= 1.0:
        return out
    encoders: dict[str, list[str]] = {}
    for n in names:
        if n.startswith("model.encoders."):
            encoders.setdefault(n.split(".")[2], []).append(n)
    for params in encoders.values():
        blocks = []
        for n in params:
            m = _BLOCK.search(n)
            blocks.append(int(m.group(1) or m.group(2)) if m else None)
        found = [i for i, b in enumerate(blocks) if b is not None]
        if not found:
            continue  # no blocks to tell apart: one rate for the encoder
        depth = max(b for b in blocks if b is not None) + 1
        for i, (n, b) in enumerate(zip(params, blocks)):
            if b is not None:
                out[n] = decay ** (depth - b)
            elif i < found[0]:
                out[n] = decay ** (depth + 1)
    return out


def check_labels(data: DataConfig, spec: LabelSpec, *, samples: int = 200) -> None:
    """At start: about `samples` training samples, the first ones of up to 8
    shards spread over each source (their .json parsed, nothing decoded),
    must include one with a usable label. Otherwise a
    ValueError names the reasons with an example, and the keys the .json
    members do hold, so a misspelled data.label_key is told at once instead
    of as data.max_consecutive_errors bad samples in a data worker."""
    import json

    from data_pipeline.loader import source_specs
    from data_pipeline.sources import Skip, expand_shards, shard_sizes

    reasons: Counter = Counter()
    example: dict[str, str] = {}
    keys: set[str] = set()
    read = 0
    for _, pattern, _ in source_specs(data, "train"):
        urls = expand_shards(pattern, allow_pipe=data.allow_pipe)
        # Up to 8 shards spread over the list, the first samples of each: a
        # corpus whose first shard happens to be unlabelled is not refused.
        picked = urls[:: max(1, len(urls) // 8)][:8]
        shards = ((url, shard_sizes([url])[0]) for url in picked)  # its index.json, else one scan of it only
        for item, value in read_labels(shards, data, spec, take=samples // len(picked)):
            if isinstance(item, Skip):
                continue
            read += 1
            if not isinstance(value, LabelError):
                return
            reasons[value.reason] += 1
            example.setdefault(value.reason, value.detail)
            try:
                meta = json.loads(item.get("json") or b"null")
            except ValueError:
                meta = None
            if isinstance(meta, dict):
                keys.update(str(k)[:40] for k in list(meta)[:50])
    if not reasons:
        return  # nothing readable here: the loader counts unreadable shards itself
    why = "; ".join(f"{reason} {n} (e.g. {example[reason]})" for reason, n in reasons.most_common())
    hold = f"their .json members hold {sorted(keys)[:20]}" if keys else "they have no .json with any key"
    named = f"data.label_key={data.label_key!r}" + (f", data.class_key={data.class_key!r}" if data.class_key else "")
    raise ValueError(
        f"{named}: none of {read} training samples read at start has a usable label: {why}. "
        f"{hold[0].upper() + hold[1:]}; set data.label_key to the key that holds each sample's class"
        + (" and task.classes to the class names" if spec.classes else "")
    )


def data_for_classify(data: DataConfig) -> None:
    """A classifier needs labels: an empty data.label_key cannot work."""
    if not data.label_key and not data.class_key:
        raise ValueError("task=classify reads labels from each sample's .json: set data.label_key (or data.class_key)")
