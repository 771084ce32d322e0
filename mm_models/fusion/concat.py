"""`concat`: the pooled outputs of all modalities, concatenated, through an
MLP into one fused embedding. An absent modality is replaced by a learned
"missing" vector of its own."""

from __future__ import annotations

import torch
from torch import nn

from mm_models.config import FusionConfig, ModelConfig
from mm_models.objectives import MODALITIES


class ConcatFusion(nn.Module):
    def __init__(self, cfg: FusionConfig, model: ModelConfig):
        super().__init__()
        widths = {m: getattr(model, m).width for m in MODALITIES}
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(w)) for m, w in widths.items()})
        self.mlp = nn.Sequential(
            nn.LayerNorm(sum(widths.values())),
            nn.Linear(sum(widths.values()), cfg.width),
            nn.GELU(),
            nn.Linear(cfg.width, model.embed_dim),
        )

    def forward(self, features: dict, masks: dict, text_pad) -> dict:
        parts = [
            torch.where(masks[m][:, None], features[m]["pooled"], self.missing[m].to(features[m]["pooled"].dtype))
            for m in MODALITIES
        ]
        return {"embed": self.mlp(torch.cat(parts, dim=-1))}
