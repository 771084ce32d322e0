"""The tri-modal model: encoders + fusion + objectives in one module the
training engine wraps. Architecture only: no optimizer, no distributed code."""

from __future__ import annotations

import torch
from torch import nn

from mm_models.config import FusionConfig, ModelConfig, ObjectiveConfig
from mm_models.encoders import audio_encoder, image_encoder, text_encoder
from mm_models.fusion import build_fusion
from mm_models.objectives import MODALITIES, ContrastiveLoss, Gather


class MultimodalModel(nn.Module):
    """batch -> {modality: {"tokens", "pooled", "embed"}}.

    Every encoder runs on every call, on its full batch tensor (absent samples
    hold zeros or padding and are masked later). Skipping an encoder on one
    rank would make ZeRO-3 parameter gathers diverge and hang the job
    (DeepSpeed issue #7170).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoders = nn.ModuleDict(
            {"image": image_encoder(cfg), "audio": audio_encoder(cfg), "text": text_encoder(cfg)}
        )

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for enc in self.encoders.values():
            nn.init.normal_(enc.cls, std=0.02)
            nn.init.normal_(enc.pos, std=0.02)

    def forward(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "image": self.encoders["image"](batch["image"]),
            "audio": self.encoders["audio"](batch["audio"]),
            "text": self.encoders["text"](batch["text"], pad=batch["text_pad"]),
        }


class PretrainModel(nn.Module):
    """MultimodalModel + fusion + objectives -> a dict of losses.

    Returns {"loss": weighted total, "loss/<name>": each objective and pair,
    "logit_scale": ...}; every value is a scalar tensor.
    """

    def __init__(
        self,
        model: ModelConfig,
        fusion: FusionConfig,
        objective: ObjectiveConfig,
        *,
        gather: Gather | None = None,
    ):
        super().__init__()
        self.objective_cfg = objective
        self.model = MultimodalModel(model)
        self.fusion = build_fusion(fusion, model)
        self.contrastive = ContrastiveLoss(objective, gather)

    def init_weights(self) -> None:
        self.model.init_weights()
        self.contrastive.init_weights(self.objective_cfg)

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """Shared-space embeddings per modality, B×E each (unnormalised)."""
        return {m: f["embed"] for m, f in self.model(batch).items()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        features = self.model(batch)
        masks = {m: batch[f"{m}_mask"] for m in MODALITIES}
        # Late fusion yields no joint representation; fused-tuple objectives
        # (matching, masked text) will consume what other strategies return.
        self.fusion(features, masks)
        con = self.contrastive({m: f["embed"] for m, f in features.items()}, masks)
        contrastive = con.pop("loss")
        out = {
            "loss": self.objective_cfg.contrastive_weight * contrastive,
            "loss/contrastive": contrastive.detach(),
            "logit_scale": con.pop("logit_scale"),
        }
        for pair, value in con.items():
            out[f"loss/contrastive/{pair}"] = value.detach()
        return out
