"""`attention`: a fusion transformer with joint self-attention over every
modality's tokens, each tagged with a learned modality-type embedding. Keys
of absent modalities and text padding are masked out; a fusion [CLS] token
gives the fused embedding."""

from __future__ import annotations

import torch
from torch import nn

from mm_models.block import Transformer
from mm_models.config import FusionConfig, ModelConfig
from mm_models.objectives import MODALITIES


class AttentionFusion(nn.Module):
    def __init__(self, cfg: FusionConfig, model: ModelConfig):
        super().__init__()
        self.inputs = nn.ModuleDict({m: nn.Linear(getattr(model, m).width, cfg.width) for m in MODALITIES})
        self.type_embed = nn.Parameter(torch.zeros(len(MODALITIES), cfg.width))
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, model.dropout)
        self.proj = nn.Linear(cfg.width, model.embed_dim, bias=False)

    def reset_own_parameters(self) -> None:
        nn.init.normal_(self.type_embed, std=0.02)
        nn.init.normal_(self.cls, std=0.02)

    def forward(self, features: dict, masks: dict, text_pad: torch.Tensor) -> dict:
        b = masks["image"].shape[0]
        tokens, keeps = [self.cls.expand(b, -1, -1)], [masks["image"].new_ones(b, 1)]
        start, text = 1, slice(0, 0)
        for i, m in enumerate(MODALITIES):
            t = self.inputs[m](features[m]["tokens"]) + self.type_embed[i]
            keep = masks[m][:, None].expand(-1, t.shape[1])
            if m == "text":
                keep = keep & ~text_pad[:, : t.shape[1]]
                text = slice(start, start + t.shape[1])
            tokens.append(t)
            keeps.append(keep)
            start += t.shape[1]
        keep = torch.cat(keeps, dim=1)
        h = self.transformer(torch.cat(tokens, dim=1), keep)
        return {"embed": self.proj(h[:, 0]), "tokens": h, "keep": keep, "text": text}
