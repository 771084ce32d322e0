"""Pretraining objectives, separate from the encoders (open_clip style)."""

from __future__ import annotations

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


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over every pair of modalities with a learnable temperature.

    For the pair (a, b), a row is a sample holding both; the columns are every
    sample, on every rank, holding the other modality. Each rank's loss is
    scaled so that averaging over ranks (as data parallelism does with
    gradients) gives the mean over all valid rows of the global batch.
    """

    def __init__(self, cfg: ObjectiveConfig, gather: Gather | None = None):
        super().__init__()
        # Shape (1,), not a 0-dim scalar: DeepSpeed broadcasts parameters as bytes.
        self.logit_scale = nn.Parameter(
            torch.full((1,), math.log(1.0 / cfg.temperature_init)), requires_grad=cfg.learn_temperature
        )
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.gather = gather

    def init_weights(self, cfg: ObjectiveConfig) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1.0 / cfg.temperature_init))

    def _all(self, x: torch.Tensor) -> torch.Tensor:
        return self.gather.fn(x) if self.gather is not None else x

    def forward(self, embeds: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """embeds: modality -> B×E; masks: modality -> B bool. Returns the
        mean loss and one loss per pair (zero where no sample has both)."""
        rank, world = (self.gather.rank, self.gather.world_size) if self.gather else (0, 1)
        z = {m: F.normalize(e.float(), dim=-1) for m, e in embeds.items()}
        z_all = {m: self._all(v) for m, v in z.items()}
        m_all = {m: self._all(v.to(torch.uint8)).bool() for m, v in masks.items()}
        scale = self.logit_scale.clamp(max=self.max_log_scale).exp().squeeze(0)
        b = next(iter(z.values())).shape[0]
        labels = torch.arange(b, device=scale.device) + rank * b

        # Zero-weighted term: keeps every encoder and the temperature in the
        # graph even when no pair is present, so all ranks reduce the same grads.
        total = scale * 0.0 + sum(v.sum() for v in z.values()) * 0.0
        out: dict[str, torch.Tensor] = {}
        n_pairs = 0
        for a, bm in PAIRS:
            rows = masks[a] & masks[bm]
            n = (m_all[a] & m_all[bm]).sum()
            if n == 0:
                out[pair_name(a, bm)] = total.detach() * 0.0
                continue
            ab = (scale * z[a] @ z_all[bm].T).masked_fill(~m_all[bm][None, :], _MASKED)
            ba = (scale * z[bm] @ z_all[a].T).masked_fill(~m_all[a][None, :], _MASKED)
            ce = F.cross_entropy(ab, labels, reduction="none") + F.cross_entropy(ba, labels, reduction="none")
            pair = (ce * rows).sum() / (2 * n) * world
            out[pair_name(a, bm)] = pair
            total = total + pair
            n_pairs += 1
        out["loss"] = total / max(n_pairs, 1)
        out["logit_scale"] = scale.detach()
        return out
