"""`none`: late fusion. No joint representation; modalities meet only in the
contrastive objective (CLIP, ImageBind)."""

from __future__ import annotations

from torch import nn

from mm_models.config import FusionConfig, ModelConfig


class LateFusion(nn.Module):
    def __init__(self, cfg: FusionConfig, model: ModelConfig):
        super().__init__()

    def forward(self, features: dict, masks: dict, text_pad) -> None:
        return None
