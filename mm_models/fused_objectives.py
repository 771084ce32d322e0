"""Objectives on fused tuples (fusion != none): matching and masked text."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm_models.objectives import MODALITIES

# Both tokenizers reserve ids 0..3 for PAD, BOS, EOS, MASK.
MASK_ID = 3
FIRST_TEXT_ID = 4
_HARD_NEGATIVE_SCALE = 10.0  # sharpness of hard-negative sampling over cosine similarity


def _take(features: dict, index: torch.Tensor) -> dict:
    return {k: v[index] for k, v in features.items()}


def _same_class(labels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """B×B: True where both samples have a known label (>= 0) and it is the same."""
    b = like.shape[0]
    if labels is None:
        return torch.zeros(b, b, dtype=torch.bool, device=like.device)
    labels = labels.to(like.device)
    return (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)


class MatchingLoss(nn.Module):
    """Aligned versus shuffled tuples (ALBEF-style, extended to three
    modalities): for each modality m, every tuple gets a negative whose m is
    taken from another sample, drawn in proportion to exp(similarity) with the
    tuple's other modalities, so negatives are hard. A binary head on the
    fused embedding tells aligned from shuffled.

    The head is a small MLP, not a linear layer: with fusion=weighted_sum the
    fused embedding is a sum of the modalities' embeddings, and agreement
    between them shows in its norm, which no linear function can read."""

    def __init__(self, embed_dim: int):
        super().__init__()
        # No LayerNorm in front: it would remove that norm.
        self.head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, 1))

    @torch.no_grad()
    def _hard_negatives(self, m: str, z: dict, masks: dict, same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Index of a negative for modality m per row, and which rows have one.
        same: B×B, True where two samples are known to be of one class."""
        others = [o for o in MODALITIES if o != m]
        anchor = sum(z[o] * masks[o][:, None] for o in others)
        has_anchor = sum(masks[o].long() for o in others) > 0
        b = anchor.shape[0]
        # Never a sample of the same class: its content matches, so calling it
        # a negative teaches the head noise. Hard negatives are drawn from the
        # most similar samples, where such false negatives concentrate: on the
        # demo corpus they kept the matching loss at the prior's entropy.
        candidates = masks[m][None, :] & ~torch.eye(b, dtype=torch.bool, device=anchor.device) & ~same
        valid = masks[m] & has_anchor & candidates.any(dim=1)
        # Half the rows draw uniformly instead. Hard negatives alone teach the
        # head that "more similar to the tuple" means "negative" while an
        # encoder is still weak (its hard negatives then score above the true
        # partner): on the demo corpus, held-out tuples with a random image
        # swapped in scored above the aligned ones.
        sharp = torch.rand(b, 1, device=anchor.device) < 0.5
        scores = torch.where(sharp, _HARD_NEGATIVE_SCALE * (anchor @ z[m].T), 0.0).masked_fill(~candidates, -1e9)
        scores[~valid] = 0.0  # any index will do for rows that are not used
        return torch.multinomial(torch.softmax(scores, dim=1), 1).squeeze(1), valid

    def forward(
        self,
        *,
        fusion: nn.Module,
        features: dict,
        masks: dict,
        text_pad: torch.Tensor,
        fused: dict,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """labels: B class indices (-1: unknown), or None; samples of one
        known class are never each other's negatives."""
        z = {m: F.normalize(features[m]["embed"].detach().float(), dim=-1) for m in MODALITIES}
        same = _same_class(labels, masks["text"])
        n_present = sum(masks[m].long() for m in MODALITIES)
        logits = [self.head(fused["embed"]).squeeze(-1).float()]
        labels = [torch.ones_like(logits[0])]
        valid = [n_present >= 2]
        for m in MODALITIES:
            index, rows = self._hard_negatives(m, z, masks, same)
            neg_features = {**features, m: _take(features[m], index)}
            neg_masks = {**masks, m: masks[m][index]}
            pad = text_pad[index] if m == "text" else text_pad
            neg = fusion(neg_features, neg_masks, pad)
            logits.append(self.head(neg["embed"]).squeeze(-1).float())
            labels.append(torch.zeros_like(logits[-1]))
            valid.append(rows)
        logits, labels, valid = torch.cat(logits), torch.cat(labels), torch.cat(valid)
        per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return (per_row * valid).sum() / valid.sum().clamp(min=1)

    @torch.no_grad()
    def swap_scores(
        self,
        *,
        fusion: nn.Module,
        features: dict,
        masks: dict,
        text_pad: torch.Tensor,
        fused: dict,
        labels: torch.Tensor | None = None,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """For evaluation: match logits (B each) and the rows that count, for
        the aligned tuples ("aligned") and, per modality m, for tuples whose m
        is swapped with the next sample that has m (a fixed negative, unlike
        training's sampled hard ones, so the figure is reproducible). A row
        counts for m when the sample has m and one more modality, and its
        partner is not known to be of the same class."""
        n_present = sum(masks[m].long() for m in MODALITIES)
        same = _same_class(labels, masks["text"])
        out = {"aligned": (self.head(fused["embed"]).squeeze(-1).float(), n_present >= 2)}
        b = n_present.shape[0]
        for m in MODALITIES:
            have = masks[m].nonzero().squeeze(1)
            index = torch.arange(b, device=have.device)
            rows = torch.zeros(b, dtype=torch.bool, device=have.device)
            if len(have) >= 2:
                partner = have.roll(-1)
                index[have] = partner
                # m plus at least one other modality to match against, and a partner of another class
                rows[have] = (n_present[have] >= 2) & ~same[have, partner]
            pad = text_pad[index] if m == "text" else text_pad
            neg = fusion({**features, m: _take(features[m], index)}, masks, pad)
            out[m] = (self.head(neg["embed"]).squeeze(-1).float(), rows)
        return out


class MaskedTextLoss(nn.Module):
    """Masked text modelling conditioned on the other modalities: mask a
    fraction of caption tokens, encode the masked caption, fuse it with the
    other modalities' tokens (fusion=attention) and predict the masked ids."""

    def __init__(self, *, width: int, vocab_size: int, mask_prob: float):
        super().__init__()
        self.mask_prob = mask_prob
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, vocab_size))

    def forward(
        self,
        *,
        text_encoder: nn.Module,
        fusion: nn.Module,
        features: dict,
        masks: dict,
        ids: torch.Tensor,
        text_pad: torch.Tensor,
    ) -> torch.Tensor:
        candidates = ~text_pad & (ids >= FIRST_TEXT_ID) & masks["text"][:, None]
        chosen = candidates & (torch.rand(ids.shape, device=ids.device) < self.mask_prob)
        masked = text_encoder(ids.masked_fill(chosen, MASK_ID), pad=text_pad)
        fused = fusion({**features, "text": masked}, masks, text_pad)
        logits = self.head(fused["tokens"][:, fused["text"]]).float()  # B×L×V
        # Every row contributes (zero-weighted where nothing is masked), so the
        # head stays in the graph on every rank.
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
        return (ce * chosen.flatten()).sum() / chosen.sum().clamp(min=1)
