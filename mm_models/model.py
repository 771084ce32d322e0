"""The tri-modal model: encoders + fusion + objectives in one module the
training engine wraps. Architecture only: no optimizer, no distributed code."""

from __future__ import annotations

import torch
from torch import nn

from mm_models.config import FusionConfig, ModelConfig, ObjectiveConfig
from mm_models.encoders import audio_encoder, image_encoder, text_encoder
from mm_models.fusion import build_fusion
from mm_models.fused_objectives import MaskedTextLoss, MatchingLoss
from mm_models.objectives import MODALITIES, Gather, build_contrastive_loss


@torch.no_grad()
def init_module(module: nn.Module) -> None:
    """Initialises the parameters `module` owns itself (not its children's):
    truncated-normal matrices, zero biases, unit norms, and whatever the
    module's own `reset_own_parameters()` sets (class tokens, positions,
    temperatures). Module by module, so a partitioned (ZeRO-3) model can be
    initialised while gathering one module at a time."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    reset = getattr(module, "reset_own_parameters", None)
    if reset is not None:
        reset()


def init_weights(root: nn.Module) -> None:
    """The one explicit initialisation: init_module over every module under root."""
    for module in root.modules():
        init_module(module)


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
        init_weights(self)

    def forward(self, batch: dict) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "image": self.encoders["image"](batch["image"]),
            "audio": self.encoders["audio"](batch["audio"]),
            "text": self.encoders["text"](batch["text"], pad=batch["text_pad"]),
        }


class PretrainModel(nn.Module):
    """MultimodalModel + fusion + objectives -> a dict of losses.

    Returns {"loss": the weighted total, "loss/<objective>[/<pair>]": each
    term, "logit_scale": ...}; every value is a scalar tensor.
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
        self.contrastive = build_contrastive_loss(objective, gather)
        self.matching = self.masked_text = None
        if objective.matching_weight > 0:
            if fusion.name == "none":
                raise ValueError("objective.matching_weight > 0 needs a fused tuple: set fusion to concat, weighted_sum or attention")
            self.matching = MatchingLoss(model.embed_dim)
        if objective.masked_text_weight > 0:
            if fusion.name != "attention":
                raise ValueError("objective.masked_text_weight > 0 needs fusion=attention (it predicts from fused text tokens)")
            self.masked_text = MaskedTextLoss(width=fusion.width, vocab_size=model.vocab_size, mask_prob=objective.mask_prob)

    def init_weights(self) -> None:
        init_weights(self)

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        """Shared-space embeddings per modality, B×E each (unnormalised)."""
        return {m: f["embed"] for m, f in self.model(batch).items()}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        cfg = self.objective_cfg
        features = self.model(batch)
        masks = {m: batch[f"{m}_mask"] for m in MODALITIES}
        con = self.contrastive({m: f["embed"] for m, f in features.items()}, masks)
        contrastive = con.pop("loss")
        out = {"loss/contrastive": contrastive.detach(), "logit_scale": con.pop("logit_scale")}
        out.update({f"loss/contrastive/{pair}": value.detach() for pair, value in con.items()})
        total = cfg.contrastive_weight * contrastive

        fused = self.fusion(features, masks, batch["text_pad"])
        if fused is not None:
            # Zero-weighted: the fusion stays in the graph without a fused objective.
            total = total + 0.0 * fused["embed"].float().sum()
        if self.matching is not None:
            matching = self.matching(fusion=self.fusion, features=features, masks=masks,
                                     text_pad=batch["text_pad"], fused=fused)
            out["loss/matching"] = matching.detach()
            total = total + cfg.matching_weight * matching
        if self.masked_text is not None:
            masked = self.masked_text(text_encoder=self.model.encoders["text"], fusion=self.fusion, features=features,
                                      masks=masks, ids=batch["text"], text_pad=batch["text_pad"])
            out["loss/masked_text"] = masked.detach()
            total = total + cfg.masked_text_weight * masked
        out["loss"] = total
        return out
