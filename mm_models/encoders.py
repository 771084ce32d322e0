"""Per-modality encoders: a modality-specific embedder, then the shared block.

Every encoder returns a dict:
    tokens  B×N×D  token-level outputs (CLS excluded)
    pooled  B×D    the CLS output
    embed   B×E    pooled, projected into the shared embedding space
"""

from __future__ import annotations

import torch
from torch import nn

from mm_models.block import Transformer
from mm_models.config import EncoderConfig, ModelConfig


class PatchEmbed(nn.Module):
    """B×C×H×W -> B×(H/p·W/p)×D with non-overlapping p×p patches."""

    def __init__(self, in_chans: int, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class SpectrogramPatchEmbed(PatchEmbed):
    """B×M×T log-mel -> AST-style patch tokens."""

    def __init__(self, patch: int, width: int):
        super().__init__(1, patch, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(1))


class Encoder(nn.Module):
    """Embedder -> [CLS] + positions (learned, or rotary inside attention) ->
    Transformer -> pooled + projection."""

    def __init__(self, embedder: nn.Module, num_tokens: int, cfg: EncoderConfig, *, embed_dim: int, dropout: float):
        super().__init__()
        if cfg.positions not in ("learned", "rotary"):
            raise ValueError(f"positions={cfg.positions!r}; choose 'learned' or 'rotary'")
        self.embedder = embedder
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        rotary = cfg.positions == "rotary"
        self.pos = None if rotary else nn.Parameter(torch.zeros(1, num_tokens + 1, cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio, dropout,
            rotary=rotary, checkpointing=cfg.activation_checkpointing,
        )
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def reset_own_parameters(self) -> None:
        nn.init.normal_(self.cls, std=0.02)
        if self.pos is not None:
            nn.init.normal_(self.pos, std=0.02)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """pad: B×N bool, True at padding tokens (text only)."""
        tokens = self.embedder(x)
        b = tokens.shape[0]
        h = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1)
        if self.pos is not None:
            h = h + self.pos[:, : h.shape[1]]
        keep = None
        if pad is not None:
            # CLS is always attendable, so no row of the attention mask is empty.
            keep = torch.cat([torch.ones_like(pad[:, :1]), ~pad], dim=1)
        h = self.transformer(h, keep)
        pooled = h[:, 0]
        return {"tokens": h[:, 1:], "pooled": pooled, "embed": self.proj(pooled)}


def _grid(n: int, patch: int, what: str) -> int:
    if n < patch:
        raise ValueError(f"{what} ({n}) is smaller than the patch size ({patch})")
    return n // patch


def image_encoder(cfg: ModelConfig) -> Encoder:
    p = cfg.image.patch_size
    n = _grid(cfg.image_size, p, "image_size") ** 2
    return Encoder(PatchEmbed(3, p, cfg.image.width), n, cfg.image, embed_dim=cfg.embed_dim, dropout=cfg.dropout)


def audio_encoder(cfg: ModelConfig) -> Encoder:
    p = cfg.audio.patch_size
    n = _grid(cfg.n_mels, p, "n_mels") * _grid(cfg.audio_frames, p, "audio_frames")
    return Encoder(SpectrogramPatchEmbed(p, cfg.audio.width), n, cfg.audio, embed_dim=cfg.embed_dim, dropout=cfg.dropout)


def text_encoder(cfg: ModelConfig) -> Encoder:
    embed = nn.Embedding(cfg.vocab_size, cfg.text.width)
    return Encoder(embed, cfg.max_text_len, cfg.text, embed_dim=cfg.embed_dim, dropout=cfg.dropout)
