"""The tri-modal model: encoders + fusion + objectives in one module the
training engine wraps. Architecture only: no optimizer, no distributed code."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from mm_models.config import FusionConfig, ModelConfig, ObjectiveConfig
from mm_models.convnets import init_recurrent
from mm_models.encoders import build_encoder
from mm_models.fused_objectives import MaskedTextLoss, MatchingLoss
from mm_models.fusion import build_fusion
from mm_models.objectives import MODALITIES, CachedGradient, Gather, build_contrastive_loss


@torch.no_grad()
def init_module(module: nn.Module) -> None:
    """Initialises the parameters `module` owns itself (not its children's):
    LeCun-normal matrices (std 1/sqrt(fan_in), truncated at 2 std), zero biases, unit norms, and whatever the
    module's own `reset_own_parameters()` sets (class tokens, positions,
    temperatures). Module by module, so a partitioned (ZeRO-3) model can be
    initialised while gathering one module at a time."""
    _init_own(module)
    # A pretrained backbone's module (mm_models.hf): the checkpoint's tensors
    # replace the initial values (those it lacks keep them).
    source = getattr(module, "pretrained_weights", None)
    if source is not None:
        source[0].load_into(module, source[1])


def _init_own(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        # LeCun normal: std 1/sqrt(fan_in), so a layer keeps its input's scale
        # at any width. A fixed std of 0.02 (GPT-2's, sized for width 768) is
        # 5x too small at width 96: attention starts uniform and audio-text
        # learning lagged a plain PyTorch model's (benchmarks/README.md).
        shape = getattr(module.weight, "ds_shape", module.weight.shape)  # full shape under ZeRO-3
        std = math.prod(shape[1:]) ** -0.5
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.RNNBase):
        init_recurrent(module)
    reset = getattr(module, "reset_own_parameters", None)
    if reset is not None:
        reset()


def init_weights(root: nn.Module) -> None:
    """The one explicit initialisation: init_module over every module under root."""
    for module in root.modules():
        init_module(module)
    finish_init(root)


def finish_init(root: nn.Module) -> None:
    """After init_module has run on every module: pretrained backbones report what their checkpoint lacked."""
    for module in root.modules():
        done = getattr(module, "finish_loading", None)
        if done is not None:
            done()


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
        self.encoders = nn.ModuleDict({m: build_encoder(cfg, m) for m in ("image", "audio", "text")})
        self.frozen = [m for m in self.encoders if getattr(cfg, m).freeze]
        for m in self.frozen:
            # Locked tower: everything but the projection into the shared
            # space (and an hf backbone's width adapter, new like it).
            for name, p in self.encoders[m].named_parameters():
                if not name.startswith(("proj.", "resize.")):
                    p.requires_grad_(False)
            self.encoders[m].eval()  # and so it stays: see train()

    def init_weights(self) -> None:
        init_weights(self)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen:
            self.encoders[m].eval()  # no dropout, no norm statistics updates in a locked tower
        return self

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
        if fusion.name != "none" and objective.matching_weight <= 0 and objective.masked_text_weight <= 0:
            # Its parameters would get no gradient while weight decay shrinks them.
            raise ValueError(
                f"fusion={fusion.name} with an objective that never uses the fused tuple "
                "(objective.matching_weight and masked_text_weight are 0): use objective=matching "
                "(or matching_mtm with fusion=attention), or fusion=none"
            )
        if objective.matching_weight > 0:
            if fusion.name == "none":
                raise ValueError(
                    "objective.matching_weight > 0 needs a fused tuple: set fusion to concat, weighted_sum or attention"
                )
            self.matching = MatchingLoss(model.embed_dim)
        if objective.masked_text_weight > 0:
            if fusion.name != "attention":
                raise ValueError(
                    "objective.masked_text_weight > 0 needs fusion=attention (it predicts from fused text tokens)"
                )
            self.masked_text = MaskedTextLoss(
                width=fusion.width, vocab_size=model.vocab_size, mask_prob=objective.mask_prob
            )

    def init_weights(self) -> None:
        init_weights(self)

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """Shared-space embeddings per modality, B×E each (unnormalised), one
        row per sample whether or not it has the modality: the caller masks
        with the batch's `<modality>_mask` (training and evaluation do)."""
        return {m: f["embed"] for m, f in self.model(batch).items()}

    def encode_and_match(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict | None]:
        """`encode`'s embeddings and, when the model has a matching head, its
        held-out scores (MatchingLoss.swap_scores), from one forward pass."""
        features = self.model(batch)
        embeds = {m: f["embed"] for m, f in features.items()}
        if self.matching is None:
            return embeds, None
        masks = {m: batch[f"{m}_mask"] for m in features}
        fused = self.fusion(features, masks, batch["text_pad"])
        return embeds, self.matching.swap_scores(
            fusion=self.fusion,
            features=features,
            masks=masks,
            text_pad=batch["text_pad"],
            fused=fused,
            labels=batch.get("label"),
        )

    def embed(self, batch: dict) -> dict[str, torch.Tensor | None]:
        """Shared-space embeddings per modality (unnormalised), with absence
        impossible to miss: a modality no sample of the batch has maps to
        None, and in a B×E tensor the rows of samples that lack it are NaN
        (so any similarity computed from them is NaN, never a number)."""
        out: dict[str, torch.Tensor | None] = {}
        for m, e in self.encode(batch).items():
            present = batch[f"{m}_mask"].to(e.device)
            out[m] = None if not bool(present.any()) else e.masked_fill(~present[:, None], float("nan"))
        return out

    def forward(
        self, batch: dict, *, embed_only: bool = False, cached: CachedGradient | None = None
    ) -> dict[str, torch.Tensor]:
        """The losses of a micro batch. Gradient caching (train.gradcache)
        calls it twice per micro batch: embed_only=True, under no_grad, gives
        {"embeds": modality -> B×E, "params": the contrastive loss's own
        parameters}; then `cached` carries the group's loss and gradients
        for the second pass, which replays the first pass's random state in
        the encoders."""
        cfg = self.objective_cfg
        if embed_only:
            return {"embeds": self.encode(batch), "params": self.contrastive(None, None, snapshot=True)}
        with cached.replay() if cached is not None else contextlib.nullcontext():
            features = self.model(batch)
        masks = {m: batch[f"{m}_mask"] for m in MODALITIES}
        con = self.contrastive({m: f["embed"] for m, f in features.items()}, masks, cached=cached)
        contrastive = con.pop("loss")
        out = {"loss/contrastive": contrastive.detach(), "logit_scale": con.pop("logit_scale")}
        out.update({f"loss/contrastive/{pair}": value.detach() for pair, value in con.items()})
        total = cfg.contrastive_weight * contrastive

        fused = self.fusion(features, masks, batch["text_pad"])
        if fused is not None:
            # Zero-weighted: the fusion stays in the graph without a fused objective.
            total = total + 0.0 * fused["embed"].float().sum()
        if self.matching is not None:
            matching = self.matching(
                fusion=self.fusion,
                features=features,
                masks=masks,
                text_pad=batch["text_pad"],
                fused=fused,
                labels=batch.get("label"),
            )
            out["loss/matching"] = matching.detach()
            total = total + cfg.matching_weight * matching
        if self.masked_text is not None:
            masked = self.masked_text(
                text_encoder=self.model.encoders["text"],
                fusion=self.fusion,
                features=features,
                masks=masks,
                ids=batch["text"],
                text_pad=batch["text_pad"],
            )
            out["loss/masked_text"] = masked.detach()
            total = total + cfg.masked_text_weight * masked
        out["loss"] = total
        return out
