"""Fusion strategies, one module each, chosen by name from FUSIONS."""

from __future__ import annotations

import torch
from torch import nn

from mm_models.config import FusionConfig, ModelConfig


class LateFusion(nn.Module):
    """`none`: no joint representation; modalities meet only in the
    contrastive objective (CLIP / ImageBind style)."""

    def __init__(self, cfg: FusionConfig, model: ModelConfig):
        super().__init__()

    def forward(self, features: dict, masks: dict[str, torch.Tensor]) -> None:
        return None


FUSIONS: dict[str, type[nn.Module]] = {"none": LateFusion}


def build_fusion(cfg: FusionConfig, model: ModelConfig) -> nn.Module:
    if cfg.name not in FUSIONS:
        raise ValueError(f"unknown fusion {cfg.name!r}; choose one of {sorted(FUSIONS)}")
    return FUSIONS[cfg.name](cfg, model)
