"""Retrieval metrics over held-out embeddings (pure torch, no I/O)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_models.objectives import PAIRS, pair_name

KS = (1, 5, 10)


def _recall_at_k(sim: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """sim: N×N, the match of row i is column i.

    Ties are broken at random in expectation: with g columns strictly above
    the match and t others equal to it, a hit at k counts (k - g) / (t + 1),
    clamped to [0, 1]. Identical captions therefore earn no free hits.
    """
    target = sim.diagonal().unsqueeze(1)
    greater = (sim > target).sum(1).float()
    ties = (sim == target).sum(1).float() - 1.0
    return {f"R@{k}": ((k - greater) / (ties + 1.0)).clamp(0.0, 1.0).mean().item() for k in ks}


def retrieval_metrics(
    embeds: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], ks: tuple[int, ...] = KS
) -> dict[str, dict]:
    """embeds: modality -> N×E; masks: modality -> N bool.

    Per pair, over the samples holding both modalities: R@k in each direction,
    their mean, the count n and chance (k / n).
    """
    out: dict[str, dict] = {}
    for a, b in PAIRS:
        both = masks[a] & masks[b]
        n = int(both.sum())
        if n == 0:
            continue
        za = F.normalize(embeds[a][both].float(), dim=-1)
        zb = F.normalize(embeds[b][both].float(), dim=-1)
        sim = za @ zb.T
        ab, ba = _recall_at_k(sim, ks), _recall_at_k(sim.T, ks)
        out[pair_name(a, b)] = {
            "n": n,
            **{f"R@{k}": (ab[f"R@{k}"] + ba[f"R@{k}"]) / 2 for k in ks},
            f"{a}->{b}": ab,
            f"{b}->{a}": ba,
            "chance": {f"R@{k}": min(1.0, k / n) for k in ks},
        }
    return out


def flatten(results: dict, prefix: str) -> dict[str, float]:
    """{"image_text": {"R@1": x, "image->text": {"R@1": y}}} -> {"prefix/image_text/R@1": x, ...}."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
