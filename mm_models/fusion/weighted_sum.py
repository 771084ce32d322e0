"""`weighted_sum`: a convex combination of the modalities' projected
embeddings, with weights computed from the inputs and normalised over the
modalities present only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_models.config import FusionConfig, ModelConfig
from mm_models.objectives import MODALITIES


class WeightedSumFusion(nn.Module):
    def __init__(self, cfg: FusionConfig, model: ModelConfig):
        super().__init__()
        e = model.embed_dim
        # One score per modality, from all embeddings together (B×3E -> B×3).
        self.gate = nn.Sequential(
            nn.LayerNorm(len(MODALITIES) * e),
            nn.Linear(len(MODALITIES) * e, cfg.width),
            nn.GELU(),
            nn.Linear(cfg.width, len(MODALITIES)),
        )
        self.out = nn.Linear(e, e)

    def forward(self, features: dict, masks: dict, text_pad) -> dict:
        present = torch.stack([masks[m] for m in MODALITIES], dim=1)  # B×3
        z = torch.stack([F.normalize(features[m]["embed"], dim=-1) for m in MODALITIES], dim=1)  # B×3×E
        z = torch.where(present[..., None], z, torch.zeros_like(z))  # absent content cannot leak in
        scores = self.gate(z.flatten(1)).float().masked_fill(~present, -1e9)
        weights = torch.softmax(scores, dim=1) * present  # a row with nothing present sums to 0
        fused = (weights.to(z.dtype)[..., None] * z).sum(dim=1)
        return {"embed": self.out(fused), "weights": weights}
