"""Fusion strategies, one module each, chosen by name from FUSIONS.

Every strategy has the same call:

    fusion(features, masks, text_pad) -> dict | None

features: modality -> {"tokens": B×N×D, "pooled": B×D, "embed": B×E} (the
encoders' outputs); masks: modality -> B bool; text_pad: B×L bool (True at
padding). It returns None (late fusion) or {"embed": B×E}, one fused
embedding per tuple; `attention` adds "tokens" (B×N×W), "keep" (B×N bool)
and "text" (the slice of "tokens" holding the text tokens). An absent
modality never changes the result.
"""

from __future__ import annotations

from torch import nn

from mm_models.config import FusionConfig, ModelConfig
from mm_models.fusion.attention import AttentionFusion
from mm_models.fusion.concat import ConcatFusion
from mm_models.fusion.late import LateFusion
from mm_models.fusion.weighted_sum import WeightedSumFusion

FUSIONS: dict[str, type[nn.Module]] = {
    "none": LateFusion,
    "concat": ConcatFusion,
    "weighted_sum": WeightedSumFusion,
    "attention": AttentionFusion,
}


def build_fusion(cfg: FusionConfig, model: ModelConfig) -> nn.Module:
    if cfg.name not in FUSIONS:
        raise ValueError(f"unknown fusion {cfg.name!r}; choose one of {sorted(FUSIONS)}")
    return FUSIONS[cfg.name](cfg, model)


__all__ = ["FUSIONS", "build_fusion", "LateFusion", "ConcatFusion", "WeightedSumFusion", "AttentionFusion"]
