"""Held-out evaluation: embed every held-out sample, then retrieval metrics."""

from __future__ import annotations

import torch

from data_pipeline import DataConfig, build_loader
from mm_models.objectives import MODALITIES
from train.batch import to_device
from train.metrics import retrieval_metrics


@torch.no_grad()
def embed_split(model, loader, *, device: torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """model: a PretrainModel (or DeepSpeed engine around one).

    Every rank runs every batch, so ZeRO-3 parameter gathers stay in step.
    """
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    embeds = {m: [] for m in MODALITIES}
    masks = {m: [] for m in MODALITIES}
    for batch in loader:
        batch = to_device(batch, device=device, dtype=dtype)
        out = module.embed(batch)
        for m in MODALITIES:
            embeds[m].append(out[m].float().cpu())
            masks[m].append(batch[f"{m}_mask"].cpu())
    module.train(was_training)
    return ({m: torch.cat(v) for m, v in embeds.items()}, {m: torch.cat(v) for m, v in masks.items()})


def evaluate_heldout(model, *, data: DataConfig, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
    loader = build_loader(data, split="heldout", batch_size=batch_size)
    embeds, masks = embed_split(model, loader, device=device, dtype=dtype)
    return retrieval_metrics(embeds, masks)


def results_table(results: dict) -> str:
    """A fixed-width table of R@k against chance, one row per pair."""
    lines = [f"{'pair':<12} {'n':>5} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'chance@1':>9} {'R@1/chance':>11}"]
    for pair, r in results.items():
        ratio = r["R@1"] / r["chance"]["R@1"]
        lines.append(
            f"{pair:<12} {r['n']:>5} {r['R@1']:>7.3f} {r['R@5']:>7.3f} {r['R@10']:>7.3f} "
            f"{r['chance']['R@1']:>9.4f} {ratio:>10.1f}x"
        )
    return "\n".join(lines)
