"""Pretraining objectives, separate from the encoders (open_clip style)."""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mm_models.config import ObjectiveConfig

MODALITIES = ("image", "audio", "text")
PAIRS = tuple(itertools.combinations(MODALITIES, 2))
_MASKED = -1e9  # finite, so a row with every column masked cannot produce NaN


@dataclass
class CachedGradient:
    """Gradient caching (GradCache, Gao et al. 2021) for one micro batch of
    a contrastive group: the group's loss was computed from every micro
    batch's embeddings (without activations); what the contrastive loss
    needs to backpropagate it through this micro batch's encoders.

    embeds: modality -> B×E, d(group loss)/d(this micro batch's embeddings,
        as fp32); params: the loss's own parameter name -> d(group loss)/d(it)
        (zeros on every micro batch of the group but one); values: the
        group's losses (detached), reported as this micro batch's; scale:
        the micro batches in the group (each backward is divided by the
        accumulation steps, the group's gradient must come out whole);
        replay: a context manager that puts back the random state of the
        first pass, entered around the encoders so that dropout and token
        dropout draw what they drew then (the objectives after the encoders
        draw from the ongoing stream).
    """

    embeds: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    scale: float
    replay: Callable[[], contextlib.AbstractContextManager]


@dataclass
class Gather:
    """How to see other ranks' features, passed in by the trainer.

    fn concatenates a tensor over ranks along dim 0, in rank order, with
    gradients flowing back to this rank's part. mm_models never imports
    torch.distributed itself.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    rank: int
    world_size: int


def pair_name(a: str, b: str) -> str:
    return f"{a}_{b}"


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for the similarity products; fp32 and fp64 stay."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _PairwiseLoss(nn.Module):
    """What InfoNCE and SigLIP share: a learnable temperature, features
    gathered over ranks, and the masking and scaling rules.

    For the pair (a, b), a row is a local sample holding both; the columns are
    every sample, on every rank, holding the other modality. Both directions
    (a rows against b columns, b rows against a columns) are scored. Each
    rank's loss is scaled so that averaging over ranks (as data parallelism
    does with gradients) gives the mean over all valid rows of the global
    batch. Subclasses define the loss of each row.
    """

    def __init__(self, cfg: ObjectiveConfig, gather: Gather | None = None):
        super().__init__()
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as bytes.
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(1.0 / cfg.temperature_init)), requires_grad=cfg.learn_temperature
        )
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.temperature_init = cfg.temperature_init
        self.gather = gather

    @torch.no_grad()
    def reset_own_parameters(self) -> None:
        self.logit_scale.fill_(math.log(1.0 / self.temperature_init))

    def _all(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather.fn(x) if self.gather is not None else x

    def row_loss(
        self,
        q: torch.Tensor,
        k_all: torch.Tensor,
        k_mask: torch.Tensor,
        labels: torch.Tensor,
        scale: torch.Tensor,
        params: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """q: B×E local rows; k_all: N×E columns of every rank; k_mask: N bool
        (valid columns); labels: B (column index of each row's match); params:
        the loss's parameters. Returns B: the loss of each row."""
        raise NotImplementedError

    def own_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters the loss itself learns (temperature, bias), by name."""
        return dict(self.named_parameters())

    def forward(
        self,
        embeds: dict[str, torch.Tensor] | None,
        masks: dict[str, torch.Tensor] | None,
        *,
        cached: CachedGradient | None = None,
        snapshot: bool = False,
    ) -> dict[str, torch.Tensor]:
        """embeds: modality -> B×E; masks: modality -> B bool. Returns the
        mean loss and one loss per pair (zero where no sample has both).

        Gradient caching goes through here too, so that a ZeRO-3 engine
        gathers the loss's own parameters as for any module call:
        snapshot=True returns a detached copy of those parameters (the
        first pass, for `loss` over the whole group); with `cached`, the
        returned "loss" has the group's loss as its value and, as its
        gradient, the cached one, flowing into this micro batch's embeddings
        and the loss's parameters."""
        if snapshot:
            return {k: p.detach().clone() for k, p in self.own_parameters().items()}
        if cached is None:
            return self.loss(embeds, masks, self.own_parameters())
        own = self.own_parameters()
        surrogate = sum((_upcast(embeds[m]) * g).sum() for m, g in cached.embeds.items())
        surrogate = surrogate + sum((own[k].float() * g).sum() for k, g in cached.params.items())
        surrogate = surrogate * cached.scale
        out = dict(cached.values)
        out["loss"] = surrogate - surrogate.detach() + cached.values["loss"]
        return out

    def loss(
        self, embeds: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], params: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """forward's arithmetic, with the loss's parameters given (its own,
        or leaf copies when gradient caching computes a group's loss)."""
        rank, world = (self.gather.rank, self.gather.world_size) if self.gather else (0, 1)
        z = {m: F.normalize(_upcast(e), dim=-1) for m, e in embeds.items()}
        z_all = {m: self._all(v) for m, v in z.items()}
        m_all = {m: self._all(v.to(torch.uint8)).bool() for m, v in masks.items()}
        scale = params["logit_scale"].clamp(max=self.max_log_scale).exp().squeeze(0)
        b = next(iter(z.values())).shape[0]
        labels = torch.arange(b, device=scale.device) + rank * b

        # Zero-weighted term: keeps every encoder and parameter in the graph
        # even when no pair is present, so all ranks reduce the same grads.
        total = sum(p.sum() for p in params.values()) * 0.0 + sum(v.sum() for v in z.values()) * 0.0
        out: dict[str, torch.Tensor] = {}
        n_pairs = 0
        for a, bm in PAIRS:
            rows = masks[a] & masks[bm]
            # Global count, the same on every rank: all ranks skip the same
            # pairs, so the gathers' backward all-reduces stay matched.
            n = (m_all[a] & m_all[bm]).sum()
            if n == 0:
                out[pair_name(a, bm)] = total.detach() * 0.0
                continue
            per_row = self.row_loss(z[a], z_all[bm], m_all[bm], labels, scale, params) + self.row_loss(
                z[bm], z_all[a], m_all[a], labels, scale, params
            )
            pair = torch.where(rows, per_row, 0.0).sum() / (2 * n) * world
            out[pair_name(a, bm)] = pair
            total = total + pair
            n_pairs += 1
        out["loss"] = total / max(n_pairs, 1)
        out["logit_scale"] = scale.detach()
        return out


class ContrastiveLoss(_PairwiseLoss):
    """Symmetric InfoNCE (CLIP) over every pair of modalities: each row's
    cross-entropy over the valid columns, its match being the target."""

    def row_loss(self, q, k_all, k_mask, labels, scale, params):
        logits = (scale * q @ k_all.T).masked_fill(~k_mask[None, :], _MASKED)
        return F.cross_entropy(logits, labels, reduction="none")


class SigLIPLoss(_PairwiseLoss):
    """Pairwise sigmoid loss (Zhai et al. 2023, SigLIP) over every pair of
    modalities, with a learnable temperature and bias.

    Every (row, valid column) is a binary problem, label +1 for the row's own
    sample and -1 for every other: a row's loss is the sum over its valid
    columns of -log sigmoid(label * (scale * cos + bias)). Scored in both
    directions and divided by twice the valid rows, so a batch with every
    modality present gives the paper's value (its matrix is symmetric).
    """

    def __init__(self, cfg: ObjectiveConfig, gather: Gather | None = None):
        super().__init__(cfg, gather)
        self.bias_init = float(cfg.siglip_bias_init)
        self.bias = nn.Parameter(torch.full((1,), self.bias_init))

    @torch.no_grad()
    def reset_own_parameters(self) -> None:
        super().reset_own_parameters()
        self.bias.fill_(self.bias_init)

    def row_loss(self, q, k_all, k_mask, labels, scale, params):
        logits = scale * q @ k_all.T + params["bias"].to(q.dtype)
        sign = torch.full_like(logits, -1.0)
        sign[torch.arange(q.shape[0], device=q.device), labels] = 1.0
        # where, not a product: a masked entry contributes exactly 0 whatever it holds.
        return torch.where(k_mask[None, :], -F.logsigmoid(sign * logits), 0.0).sum(dim=1)


# objective.contrastive -> the loss class; PretrainModel builds one of these.
CONTRASTIVE_LOSSES: dict[str, type[_PairwiseLoss]] = {"infonce": ContrastiveLoss, "siglip": SigLIPLoss}


def build_contrastive_loss(cfg: ObjectiveConfig, gather: Gather | None = None) -> _PairwiseLoss:
    """The contrastive loss objective.contrastive names."""
    if cfg.contrastive not in CONTRASTIVE_LOSSES:
        raise ValueError(f"objective.contrastive={cfg.contrastive!r}; choose one of {sorted(CONTRASTIVE_LOSSES)}")
    return CONTRASTIVE_LOSSES[cfg.contrastive](cfg, gather)
