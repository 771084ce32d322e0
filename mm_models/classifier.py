"""A fused classifier on the pretrained encoders (task=classify).

    batch -> encoders -> fusion over the task's modalities -> head -> logits

Fusion is the pretraining strategy of the same name: `none` (late fusion)
averages the unit-length embeddings of the modalities a sample has;
`concat`, `weighted_sum` and `attention` produce one fused embedding. A
modality outside `modalities`, or absent from a sample, never changes its
logits (its mask is False). A sample with none of the modalities gets no
loss and, at prediction, no class.

Single-label: softmax cross-entropy (class weights, label smoothing).
Multi-label: a sigmoid per class, binary cross-entropy (class weights are
the positives' weights, label smoothing pulls targets towards 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from mm_models.config import FusionConfig, ModelConfig
from mm_models.fusion import build_fusion
from mm_models.model import MultimodalModel, init_weights
from mm_models.objectives import MODALITIES

HEADS = ("linear", "mlp")


@dataclass
class ClassifierConfig:
    num_classes: int = 2
    multi_label: bool = False
    modalities: List[str] = field(default_factory=lambda: list(MODALITIES))
    head: str = "linear"  # linear, or mlp (hidden sizes head_hidden, GELU, dropout)
    head_hidden: List[int] = field(default_factory=lambda: [256])
    head_dropout: float = 0.1
    label_smoothing: float = 0.0
    # Per-class loss weights (empty: all 1); multi-label: the positives' weights.
    class_weights: List[float] = field(default_factory=list)
    # A linear probe: the encoders are locked (no gradient, eval mode); only fusion and head train.
    freeze_encoders: bool = False

    def check(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown or not self.modalities:
            raise ValueError(f"task.modalities={self.modalities}: choose a non-empty subset of {list(MODALITIES)}")
        if self.head not in HEADS:
            raise ValueError(f"task.head={self.head!r}; choose one of {HEADS}")
        if self.num_classes < (1 if self.multi_label else 2):
            raise ValueError(
                f"task.num_classes={self.num_classes} is too few for a "
                f"{'multi' if self.multi_label else 'single'}-label classifier"
            )
        if self.class_weights and len(self.class_weights) != self.num_classes:
            raise ValueError(f"task.class_weights has {len(self.class_weights)} values for {self.num_classes} classes")
        if any(w < 0 for w in self.class_weights):
            raise ValueError("task.class_weights must not be negative")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"task.head_dropout={self.head_dropout} must be in [0, 1)")


def classifier_config(task: dict, *, class_weights=()) -> ClassifierConfig:
    """The classifier of a training config's "task" section (task=classify),
    as exports store it; class weights are a training-time setting."""
    classes = list(task.get("classes") or [])
    return ClassifierConfig(
        num_classes=int(task.get("num_classes") or len(classes)),
        multi_label=bool(task.get("multi_label", False)),
        modalities=list(task.get("modalities") or MODALITIES),
        head=str(task.get("head", "linear")),
        head_hidden=[int(h) for h in task.get("head_hidden") or [256]],
        head_dropout=float(task.get("head_dropout", 0.1)),
        label_smoothing=float(task.get("label_smoothing", 0.0)),
        class_weights=[float(w) for w in class_weights],
        freeze_encoders=task.get("freeze", "none") == "encoders",
    )


class Head(nn.Module):
    def __init__(self, dim: int, cfg: ClassifierConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(dim)]
        if cfg.head == "mlp":
            for hidden in cfg.head_hidden:
                layers += [nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.head_dropout)]
                dim = hidden
        else:
            layers.append(nn.Dropout(cfg.head_dropout))
        layers.append(nn.Linear(dim, cfg.num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ClassifierModel(nn.Module):
    """Returns {"loss", "loss/classify", "logits"} from forward(batch);
    `predict(batch)` gives {"logits", "probs", "valid"}."""

    def __init__(self, model: ModelConfig, fusion: FusionConfig, task: ClassifierConfig):
        super().__init__()
        task.check()
        self.task = task
        self.fusion_name = fusion.name
        self.model = MultimodalModel(model)
        self.fusion = build_fusion(fusion, model)
        self.head = Head(model.embed_dim, task)
        if task.freeze_encoders:
            self.model.requires_grad_(False)
            self.model.eval()
        weights = torch.tensor(task.class_weights or [1.0] * task.num_classes, dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def init_weights(self) -> None:
        init_weights(self)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.task.freeze_encoders:
            self.model.eval()  # a linear probe's encoders: no dropout, ever
        return self

    def masks(self, batch: dict) -> dict[str, torch.Tensor]:
        return {m: batch[f"{m}_mask"] & (m in self.task.modalities) for m in MODALITIES}

    def logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B×C logits, B bool: the sample has at least one of the task's modalities)."""
        features = self.model(batch)
        masks = self.masks(batch)
        present = torch.stack([masks[m] for m in MODALITIES], dim=1)  # B×3
        fused = self.fusion(features, masks, batch["text_pad"])
        if fused is None:  # late fusion: the mean of the unit embeddings present
            z = torch.stack([F.normalize(features[m]["embed"].float(), dim=-1) for m in MODALITIES], dim=1)
            weight = present.to(z.dtype).unsqueeze(-1)
            x = (z * weight).sum(1) / weight.sum(1).clamp(min=1.0)
            x = x.to(features["text"]["embed"].dtype)
        else:
            x = fused["embed"]
        return self.head(x), present.any(dim=1)

    def loss(self, logits: torch.Tensor, batch: dict, valid: torch.Tensor) -> torch.Tensor:
        keep = valid & (batch["label"] >= 0)
        logits = logits.float()
        if self.task.multi_label:
            target = batch["label_multi"].to(logits.device, torch.float32)
            if self.task.label_smoothing:
                target = target * (1 - self.task.label_smoothing) + 0.5 * self.task.label_smoothing
            per = F.binary_cross_entropy_with_logits(
                logits, target, pos_weight=self.class_weights, reduction="none"
            ).mean(dim=1)
            denom = keep.sum().clamp(min=1)
            return (per * keep).sum() / denom
        if not bool(keep.any()):
            return logits.sum() * 0.0  # no labelled sample here: grads of zero, the graph intact
        return F.cross_entropy(
            logits[keep], batch["label"][keep], weight=self.class_weights, label_smoothing=self.task.label_smoothing
        )

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """{"loss", "loss/classify", "accuracy"}: scalars; accuracy is over
        this batch's labelled samples (multi-label: per class, at p > 0.5)."""
        logits, valid = self.logits(batch)
        loss = self.loss(logits, batch, valid)
        with torch.no_grad():
            keep = valid & (batch["label"] >= 0)
            if self.task.multi_label:
                hits = ((logits > 0).float() == batch["label_multi"].to(logits.device)).float().mean(dim=1)
            else:
                hits = (logits.argmax(dim=-1) == batch["label"]).float()
            accuracy = (hits * keep).sum() / keep.sum().clamp(min=1)
        return {"loss": loss, "loss/classify": loss.detach(), "accuracy": accuracy}

    @torch.no_grad()
    def predict(self, batch: dict) -> dict[str, torch.Tensor]:
        logits, valid = self.logits(batch)
        logits = logits.float()
        probs = torch.sigmoid(logits) if self.task.multi_label else logits.softmax(dim=-1)
        return {"logits": logits, "probs": probs, "valid": valid}


class StateDictWeights:
    """Initial values from a state dict (a pretrained export or checkpoint),
    copied module by module by init_module (so also into a ZeRO-3
    partitioned model, one gathered module at a time). Tensors the model
    has but the state dict lacks keep their fresh initialisation and are
    listed in `missing`."""

    def __init__(self, state: dict[str, torch.Tensor], *, origin: str):
        self.state, self.origin = state, origin
        self.loaded: list[str] = []
        self.missing: list[str] = []

    @torch.no_grad()
    def load_into(self, module: nn.Module, name: str) -> None:
        skip = module._non_persistent_buffers_set
        own = [
            *module.named_parameters(recurse=False),
            *((n, b) for n, b in module.named_buffers(recurse=False) if n not in skip),
        ]
        for local, t in own:
            key = f"{name}.{local}" if name else local
            value = self.state.get(key)
            if value is None:
                self.missing.append(key)
                continue
            shape = tuple(getattr(t, "ds_shape", t.shape))
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{self.origin}: {key} has shape {tuple(value.shape)}, the model expects {shape}: "
                    "the model config differs from the one it was trained with"
                )
            t.data.copy_(value.to(t.dtype))
            self.loaded.append(key)


def attach_weights(root: nn.Module, source: StateDictWeights, prefixes: tuple[str, ...]) -> None:
    """Marks every module under `prefixes` (e.g. "model.") to take its initial values from `source`."""
    for name, module in root.named_modules():
        if name.startswith(prefixes) and (
            any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        ):
            module.pretrained_weights = (source, name)
