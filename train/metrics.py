"""Retrieval metrics over held-out embeddings (pure torch, no I/O)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_models.objectives import PAIRS, pair_name

KS = (1, 5, 10)


BLOCK = 1024  # query rows per similarity block: memory O(BLOCK · N), not N²


def _recall_at_k(
    queries: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...], block: int = BLOCK
) -> dict[str, float]:
    """queries, keys: N×E unit rows; the match of query i is key i.

    Similarities are computed BLOCK query rows at a time, so a 50,000-sample
    evaluation never holds an N×N matrix. Ties are broken at random in
    expectation: with g keys strictly above the match and t others equal to
    it, a hit at k counts (k - g) / (t + 1), clamped to [0, 1]. Identical
    captions therefore earn no free hits.
    """
    n = queries.shape[0]
    hits = {k: torch.zeros((), dtype=torch.float64) for k in ks}
    for start in range(0, n, block):
        sim = queries[start : start + block] @ keys.T  # b×N
        rows = torch.arange(sim.shape[0])
        # The match's score taken from the same product, so it ties with itself exactly.
        target = sim[rows, rows + start].unsqueeze(1)
        greater = (sim > target).sum(1).double()
        ties = (sim == target).sum(1).double() - 1.0
        for k in ks:
            hits[k] += ((k - greater) / (ties + 1.0)).clamp(0.0, 1.0).sum()
    return {f"R@{k}": (hits[k] / max(n, 1)).item() for k in ks}


def retrieval_metrics(
    embeds: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    ks: tuple[int, ...] = KS,
    block: int = BLOCK,
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
        ab, ba = _recall_at_k(za, zb, ks, block), _recall_at_k(zb, za, ks, block)
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
