"""Held-out evaluation of a pretrained model: embed every held-out sample,
then retrieval metrics and, where the shards carry class labels, zero-shot
classification. Used during training (train.tasks.pretrain), by
train.evaluate and by the benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
