"""Held-out evaluation: embed every held-out sample, then retrieval metrics
and, where the shards carry class labels, zero-shot classification."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import MISSING

from data_pipeline import DataConfig, build_loader
from data_pipeline.loader import collate
from mm_models.objectives import MODALITIES
from train.batch import eval_mode, to_device
from train.distributed import gather_lists, gather_rows, sum_counters
from train.metrics import flatten, retrieval_metrics


@torch.no_grad()
def embed_split(model, loader, *, device: torch.device, dtype: torch.dtype) -> dict:
    """model: a PretrainModel (or DeepSpeed engine around one); loader: the
    held-out loader of this rank (the whole set, or its 1/W part: then every
    rank ends with all ranks' rows, gathered in rank order).

    Returns {"embeds": modality -> N×E, "masks": modality -> N bool,
    "labels": N (-1: none), "class_names": [N], "keys": [N], "matching":
    {modality -> [right, counted]}: how often the matching head scores a
    tuple above the same tuple with that modality swapped (empty without a
    matching head), "embedded_here": the rows this rank embedded itself},
    padding rows dropped. Every rank runs every batch, so ZeRO-3
    parameter gathers stay in step (a sharded loader gives each rank the
    same number of batches).
    """
    embeds = {m: [] for m in MODALITIES}
    masks = {m: [] for m in MODALITIES}
    labels, names, keys = [], [], []
    matching: dict[str, list[int]] = {}
    with eval_mode(model) as module:
        for batch in loader:
            real = torch.tensor([k != "" for k in batch["__key__"]])
            batch = to_device(batch, device=device, dtype=dtype)
            out, scores = module.encode_and_match(batch)
            if scores:
                aligned = scores.pop("aligned")[0].cpu()
                for m, (logits, rows) in scores.items():
                    rows = rows.cpu() & real
                    # Right when the head scores the aligned tuple above the one with m swapped.
                    tally = matching.setdefault(m, [0, 0])
                    tally[0] += int(((aligned > logits.cpu()) & rows).sum())
                    tally[1] += int(rows.sum())
            for m in MODALITIES:
                embeds[m].append(out[m].float().cpu()[real])
                masks[m].append(batch[f"{m}_mask"].cpu()[real])
            labels.append(batch["label"].cpu()[real])
            names += [n for n, r in zip(batch["class_name"], real) if r]
            keys += [k for k in batch["__key__"] if k]
    split = {
        "embeds": {m: torch.cat(v) for m, v in embeds.items()},
        "masks": {m: torch.cat(v) for m, v in masks.items()},
        "labels": torch.cat(labels),
        "class_names": names,
        "keys": keys,
        "matching": matching,
        "embedded_here": len(keys),
    }
    if getattr(loader, "world_size", 1) == 1:  # a plain list of batches is one process's
        return split
    right = sum_counters({m: r for m, (r, _) in matching.items()})
    counted = sum_counters({m: c for m, (_, c) in matching.items()})
    return {
        "embeds": {m: gather_rows(v) for m, v in split["embeds"].items()},
        "masks": {m: gather_rows(v) for m, v in split["masks"].items()},
        "labels": gather_rows(split["labels"]),
        "class_names": gather_lists(names),
        "keys": gather_lists(keys),
        "matching": {m: [right.get(m, 0), counted[m]] for m in sorted(counted)},
        "embedded_here": len(keys),
    }


def matching_metrics(tallies: dict[str, list[int]]) -> dict:
    """Held-out accuracy of the matching head: the share of tuples it scores
    above the same tuple with one modality swapped, per modality and over
    all (chance 0.5). Ranking needs no threshold, which a head trained on
    one aligned tuple per three swapped ones would bias."""
    if not any(n for _, n in tallies.values()):
        return {}
    right, n = sum(r for r, _ in tallies.values()), sum(c for _, c in tallies.values())
    return {
        "n": n,
        "accuracy": right / n,
        **{f"swapped_{m}": r / c for m, (r, c) in tallies.items() if c},
        "chance": 0.5,
    }


def class_names(labels: torch.Tensor, names: list[str]) -> dict[int, str]:
    """label -> class name, as the labelled samples name them (first seen wins)."""
    out: dict[int, str] = {}
    for label, name in zip(labels.tolist(), names):
        if label >= 0 and name and label not in out:
            out[label] = name
    return dict(sorted(out.items()))


@torch.no_grad()
def class_embeddings(
    model, names: list[str], *, data: DataConfig, tokenizer, batch_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """C×E unit vectors: per class, the normalised mean of its prompts' text embeddings."""
    texts = [p.format(name) for name in names for p in data.prompts]
    samples = [
        {"__key__": "prompt", "image": None, "audio": None, "text": tokenizer.encode(t, max_len=data.max_text_len)}
        for t in texts
    ]
    chunks = []
    with eval_mode(model) as module:
        for i in range(0, len(samples), batch_size):
            batch = to_device(
                collate(samples[i : i + batch_size], cfg=data, pad_id=tokenizer.pad_id), device=device, dtype=dtype
            )
            chunks.append(F.normalize(module.encode(batch)["text"].float().cpu(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(names), len(data.prompts), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def zero_shot_metrics(split: dict, classes: dict[int, str], class_embeds: torch.Tensor) -> dict:
    """Top-1/top-5 accuracy of classifying each non-text modality by its
    nearest class prompt, over the samples with that modality and a known label."""
    index = {label: i for i, label in enumerate(classes)}
    targets = torch.tensor([index.get(label, -1) for label in split["labels"].tolist()], dtype=torch.long)
    n_classes = len(classes)
    out = {}
    for m in ("image", "audio"):
        keep = split["masks"][m] & (targets >= 0)
        n = int(keep.sum())
        if n == 0:
            continue
        scores = F.normalize(split["embeds"][m][keep], dim=-1) @ class_embeds.T
        true = scores.gather(1, targets[keep][:, None])
        rank = (scores > true).sum(1)  # classes scored strictly above the true one
        out[m] = {
            "n": n,
            "classes": n_classes,
            **{f"top{k}": (rank < k).float().mean().item() for k in (1, 5)},
            "chance": {f"top{k}": min(1.0, k / n_classes) for k in (1, 5)},
        }
    return out


def evaluate_heldout(
    model,
    *,
    data: DataConfig,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    keep_split: bool = False,
    sizes: dict[str, int] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """{"retrieval": per pair R@k (see retrieval_metrics), "zero_shot": per
    modality accuracy (empty where the held-out .json carries no labels),
    "matching": the matching head's accuracy (matching_metrics; empty
    without one)},
    plus "split" (embed_split's result) with keep_split. With world_size > 1
    (a collective: every rank calls it) each rank embeds 1/world_size of the
    held-out set and the embeddings are gathered; every rank gets the same
    results as one process would."""
    loader = build_loader(data, split="heldout", batch_size=batch_size, sizes=sizes, rank=rank, world_size=world_size)
    split = embed_split(model, loader, device=device, dtype=dtype)
    results = {
        "retrieval": retrieval_metrics(split["embeds"], split["masks"]),
        "zero_shot": {},
        "matching": matching_metrics(split["matching"]),
    }
    if keep_split:
        results["split"] = split
    classes = class_names(split["labels"], split["class_names"])
    if len(classes) >= 2 and data.prompts:
        class_embeds = class_embeddings(
            model,
            list(classes.values()),
            data=data,
            tokenizer=loader.tokenizer,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
        )
        results["zero_shot"] = zero_shot_metrics(split, classes, class_embeds)
    return results


def eval_metrics(results: dict, prefix: str) -> dict[str, float]:
    """Flat metric names: PREFIX/<pair>/R@k, PREFIX/zero_shot/<modality>/topk
    and PREFIX/matching/accuracy (and its parts)."""
    return {
        **flatten(results["retrieval"], prefix),
        **flatten(results["zero_shot"], f"{prefix}/zero_shot"),
        **flatten(results.get("matching") or {}, f"{prefix}/matching"),
    }


def results_table(results: dict) -> str:
    """Fixed-width tables: R@k against chance per pair, then zero-shot accuracy."""
    lines = [f"{'pair':<12} {'n':>5} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'chance@1':>9} {'R@1/chance':>11}"]
    for pair, r in results["retrieval"].items():
        ratio = r["R@1"] / r["chance"]["R@1"]
        lines.append(
            f"{pair:<12} {r['n']:>5} {r['R@1']:>7.3f} {r['R@5']:>7.3f} {r['R@10']:>7.3f} "
            f"{r['chance']['R@1']:>9.4f} {ratio:>10.1f}x"
        )
    if results["zero_shot"]:
        lines.append(
            f"{'zero-shot':<12} {'n':>5} {'top1':>7} {'top5':>7} {'classes':>7} {'chance@1':>9} {'top1/chance':>11}"
        )
        for m, r in results["zero_shot"].items():
            ratio = r["top1"] / r["chance"]["top1"]
            lines.append(
                f"{m:<12} {r['n']:>5} {r['top1']:>7.3f} {r['top5']:>7.3f} {r['classes']:>7} "
                f"{r['chance']['top1']:>9.4f} {ratio:>10.1f}x"
            )
    match = results.get("matching")
    if match:
        swapped = "  ".join(
            f"{k.removeprefix('swapped_')} {v:.3f}" for k, v in match.items() if k.startswith("swapped_")
        )
        lines.append(
            f"matching head: aligned tuple above the swapped one in {match['accuracy']:.3f} of {match['n']} "
            f"(chance 0.5); by swapped modality: {swapped}"
        )
    return "\n".join(lines)


# -- `python -m train.evaluate checkpoint=PATH [data.KEY=VALUE ...] [batch_size=N]` --------------


def resolve_checkpoint(checkpoint: str) -> str:
    """An exported .safetensors as given; a checkpoint directory as the step
    directory it names now (see train.export.resolve_step_dir), so that the
    config and the weights read after it come from the same step even if a
    running job writes a newer one meanwhile."""
    from pathlib import Path

    from train.export import resolve_step_dir

    return checkpoint if Path(checkpoint).suffix == ".safetensors" else str(resolve_step_dir(Path(checkpoint)))


def saved_config(checkpoint: str) -> dict:
    """The training config a checkpoint directory or an exported .safetensors
    was saved with (model, fusion, objective, data, task, and the step),
    read without loading its weights."""
    from pathlib import Path

    from mm_models.io import read_config
    from train.export import CheckpointError, read_meta, resolve_step_dir

    path = Path(checkpoint)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"checkpoint={path}: no such file")
        return read_config(path)
    meta = read_meta(resolve_step_dir(path))
    return {**meta["config"], "step": meta.get("step")}


def load_for_eval(checkpoint: str, *, trust: bool = False) -> tuple[torch.nn.Module, dict]:
    """A plain fp32 model (PretrainModel or ClassifierModel) on CPU and the training config it was saved
    with (saved_config), from a checkpoint directory (consolidated as
    `train.export` does) or an exported .safetensors."""
    from pathlib import Path

    from mm_models import load
    from mm_models.io import build_loaded
    from train.export import CheckpointError, consolidate

    path = Path(resolve_checkpoint(checkpoint))
    config = saved_config(str(path))
    if path.suffix == ".safetensors":
        return load(path), config
    state = consolidate(path, trust=trust)  # the step directory; verified before anything is unpickled
    try:
        model = build_loaded(config, state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its config and weights do not make a model: {e}") from None
    return model.eval(), config


def final_json(results: dict) -> str:
    """The demo's last line: held-out R@k and chance per pair, and zero-shot
    accuracy and chance per modality where the data has class labels."""

    def rounded(r: dict, prefix: str) -> dict:
        return {
            k: (round(v, 4) if k.startswith(prefix) else v)
            for k, v in r.items()
            if k.startswith(prefix) or k in ("n", "classes")
        } | {"chance": {k: round(v, 5) for k, v in r["chance"].items()}}

    heldout = results["heldout"]
    if results.get("task") == "classify":
        from train.classify import final_summary

        return json.dumps(
            {"step": results["step"], "task": "classify", "heldout": final_summary(heldout)}, sort_keys=True
        )
    out = {"step": results["step"], "heldout": {p: rounded(r, "R@") for p, r in heldout["retrieval"].items()}}
    if heldout["zero_shot"]:
        out["zero_shot"] = {m: rounded(r, "top") for m, r in heldout["zero_shot"].items()}
    if heldout.get("matching"):
        out["matching"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in heldout["matching"].items()}
    return json.dumps(out, sort_keys=True)


@dataclass
class EvaluateArgs:
    """The command line of `python -m train.evaluate` (see USAGE)."""

    checkpoint: str = MISSING
    batch_size: int = 0  # 0: the run's trainer.eval_batch_size
    device: str = "cpu"
    trust_checkpoint: bool = False


USAGE = """usage: python -m train.evaluate checkpoint=PATH [data.KEY=VALUE ...] [batch_size=N] [device=cpu]

Held-out retrieval and zero-shot metrics of a checkpoint (for a fine-tuned
classifier: accuracy, macro-F1, per-class metrics), in one process: a table
on stderr, then the JSON line a training run prints at its end.

  checkpoint=PATH   a step directory, checkpoints/ or run directory, or an
                    exported .safetensors file
  data.KEY=VALUE    overrides of the data config saved with the run
                    (data.heldout=SHARDS evaluates other shards)
  batch_size=N      evaluation batch (default: the run's trainer.eval_batch_size)
  device=DEVICE     cpu (default) or cuda
  trust_checkpoint=true   skip the safe-loading check (see python -m train.export --help)

example: python -m train.evaluate checkpoint=outputs/2026-11-30/10-00-00 data.heldout=data/demo/heldout
"""


def check_heldout(data, *, overridden: bool) -> None:
    """The held-out shards exist, else a ValueError that says where the
    pattern came from: the one saved with the model is the training run's,
    relative to the directory it ran in."""
    from data_pipeline.sources import expand_shards

    try:
        expand_shards(data.heldout, allow_pipe=data.allow_pipe)
    except (ValueError, OSError) as e:
        where = "" if overridden else " (saved with the model: a relative path is read from where training ran)"
        raise ValueError(f"data.heldout={data.heldout!r}{where}: {e}; pass data.heldout=SHARDS") from None


def main(argv: list[str] | None = None) -> int:
    """Held-out retrieval of a checkpoint, in one process; the last stdout
    line is the same JSON object a training run prints at its end."""
    import sys

    if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        print(USAGE, end="")
        return 0

    from train.cli import UsageError, compose_args, data_config
    from train.export import CheckpointError
    from train.secrets import redact_streams

    redact_streams()  # an error or a log line naming a signed URL prints it redacted
    try:
        args, data_overrides = compose_args(
            EvaluateArgs, sys.argv[1:] if argv is None else argv, tool="train.evaluate", data=True
        )
        model, config = load_for_eval(args.checkpoint, trust=args.trust_checkpoint)
        data = data_config(config.get("data", {}), data_overrides)
        check_heldout(data, overridden=any(o.startswith("data.heldout=") for o in data_overrides))
        batch_size = args.batch_size or int(config.get("trainer", {}).get("eval_batch_size", 128))
    except (CheckpointError, UsageError, ValueError) as e:
        print(f"train.evaluate: error: {e}", file=sys.stderr)
        return 2
    try:
        results, table = _evaluate(model, config, data=data, batch_size=batch_size, device=torch.device(args.device))
    except (ValueError, OSError) as e:  # unreadable held-out shards, labels the task cannot use
        print(f"train.evaluate: error: {e}", file=sys.stderr)
        return 2
    print(table, file=sys.stderr)
    print(final_json(results), flush=True)
    return 0


def _evaluate(model, config: dict, *, data, batch_size: int, device: torch.device) -> tuple[dict, str]:
    """(results, their table) of `python -m train.evaluate`."""
    from omegaconf import OmegaConf

    model.to(device)
    task = config.get("task") or {}
    if task.get("name") != "classify":
        heldout = evaluate_heldout(model, data=data, batch_size=batch_size, device=device, dtype=torch.float32)
        return {"step": config.get("step"), "heldout": heldout}, results_table(heldout)
    from train.classify import classification_metrics, classify_table, label_spec, predict_split
    from train.config import TaskConfig

    task_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), task))
    spec = label_spec(task_cfg)
    loader = build_loader(
        data, split="heldout", batch_size=batch_size, labels=spec, modalities=tuple(task_cfg.modalities)
    )
    heldout = classification_metrics(
        predict_split(model, loader, device=device, dtype=torch.float32), spec, threshold=task_cfg.threshold
    )
    return {"step": config.get("step"), "task": "classify", "heldout": heldout}, classify_table(heldout)


if __name__ == "__main__":
    raise SystemExit(main())
