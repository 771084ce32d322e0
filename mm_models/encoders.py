"""Per-modality encoders, chosen by model.<modality>.arch from ENCODERS: the
transformer (a modality-specific embedder, then the shared block), the ViT
with a convolutional stem, CNNs and RNNs (mm_models.convnets), and Hugging
Face backbones (mm_models.hf).

Every encoder returns a dict:
    tokens  B×N×D  token-level outputs (CLS excluded)
    pooled  B×D    the CLS output
    embed   B×E    pooled, projected into the shared embedding space
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from mm_models.block import Transformer
from mm_models.config import EncoderConfig, ModelConfig
from mm_models.convnets import CNNEncoder, ConvStem, RNNEncoder


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
            cfg.width,
            cfg.depth,
            cfg.heads,
            cfg.mlp_ratio,
            dropout,
            rotary=rotary,
            checkpointing=cfg.activation_checkpointing,
        )
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        # Set to 0 by the trainer for a final unmasked phase (set_token_dropout).
        self.token_dropout = self.configured_token_dropout = cfg.token_dropout

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
        elif self.training and self.token_dropout > 0:
            h = torch.cat([h[:, :1], drop_tokens(h[:, 1:], self.token_dropout)], dim=1)
        h = self.transformer(h, keep)
        pooled = h[:, 0]
        return {"tokens": h[:, 1:], "pooled": pooled, "embed": self.proj(pooled)}


def kept_tokens(n: int, token_dropout: float) -> int:
    """Patches left of n after dropping the fraction token_dropout (at least one)."""
    return max(1, round(n * (1.0 - token_dropout)))


def drop_tokens(tokens: torch.Tensor, token_dropout: float) -> torch.Tensor:
    """A random subset of each row's B×N×D tokens, kept_tokens(N) of them,
    in their original order (positions are already added)."""
    b, n, d = tokens.shape
    k = kept_tokens(n, token_dropout)
    index = torch.rand(b, n, device=tokens.device).argsort(dim=1)[:, :k].sort(dim=1).values
    return tokens.gather(1, index[..., None].expand(b, k, d))


def check_token_dropout(cfg: ModelConfig, modality: str) -> None:
    """model.<modality>.token_dropout is a fraction in [0, 1), and, when set,
    meets image or audio patches before a transformer with learned positions."""
    enc = getattr(cfg, modality)
    p = enc.token_dropout
    if not 0.0 <= p < 1.0:
        raise ValueError(f"model.{modality}.token_dropout={p}: give a fraction in [0, 1)")
    if p == 0:
        return
    arch = arch_name(cfg, modality)
    if modality == "text" or arch not in ("transformer", "conv_transformer"):
        raise ValueError(
            f"model.{modality}.token_dropout drops image or audio patches before a transformer: "
            f"model.{modality}.arch={arch} has none; set it to 0"
        )
    if enc.positions == "rotary":
        raise ValueError(
            f"model.{modality}.token_dropout needs positions=learned: rotary positions follow the "
            "token order, which dropping patches changes"
        )


def _grid(n: int, patch: int, what: str) -> int:
    if n < patch:
        raise ValueError(f"{what} ({n}) is smaller than the patch size ({patch})")
    return n // patch


def _patch_tokens(cfg: ModelConfig, modality: str) -> int:
    enc = getattr(cfg, modality)
    if modality == "image":
        return _grid(cfg.image_size, enc.patch_size, "image_size") ** 2
    return _grid(cfg.n_mels, enc.patch_size, "n_mels") * _grid(cfg.audio_frames, enc.patch_size, "audio_frames")


def _vit(cfg: ModelConfig, modality: str, *, conv_stem: bool) -> Encoder:
    enc = getattr(cfg, modality)
    channels = 3 if modality == "image" else 1
    if conv_stem:
        sizes = (
            {"image_size": cfg.image_size}
            if modality == "image"
            else {"n_mels": cfg.n_mels, "audio_frames": cfg.audio_frames}
        )
        for key, n in sizes.items():
            if n % enc.patch_size:
                raise ValueError(
                    f"model.{modality}.arch=conv_transformer needs data.{key} ({n}) to be a multiple "
                    f"of model.{modality}.patch_size ({enc.patch_size})"
                )
        embedder: nn.Module = ConvStem(channels, enc.patch_size, enc.width, what=f"model.{modality}")
    else:
        embedder = (
            PatchEmbed(3, enc.patch_size, enc.width)
            if modality == "image"
            else SpectrogramPatchEmbed(enc.patch_size, enc.width)
        )
    return Encoder(embedder, _patch_tokens(cfg, modality), enc, embed_dim=cfg.embed_dim, dropout=cfg.dropout)


def _transformer(cfg: ModelConfig, modality: str) -> Encoder:
    if modality == "text":
        embed = nn.Embedding(cfg.vocab_size, cfg.text.width)
        return Encoder(embed, cfg.max_text_len, cfg.text, embed_dim=cfg.embed_dim, dropout=cfg.dropout)
    return _vit(cfg, modality, conv_stem=False)


def _cnn(cfg: ModelConfig, modality: str) -> nn.Module:
    return CNNEncoder(
        3 if modality == "image" else 1, getattr(cfg, modality), embed_dim=cfg.embed_dim, what=f"model.{modality}"
    )


def _rnn(cfg: ModelConfig, modality: str) -> nn.Module:
    return RNNEncoder(cfg.text, vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim, dropout=cfg.dropout)


def _hf(cfg: ModelConfig, modality: str) -> nn.Module:
    from mm_models.hf import HFEncoder  # imports transformers, only when chosen

    return HFEncoder(modality, cfg)


# model.<modality>.arch -> (builder, the modalities it encodes). One entry per encoder family.
ENCODERS: dict[str, tuple[Callable[[ModelConfig, str], nn.Module], tuple[str, ...]]] = {
    "transformer": (_transformer, ("image", "audio", "text")),
    "conv_transformer": (lambda cfg, m: _vit(cfg, m, conv_stem=True), ("image", "audio")),
    "cnn": (_cnn, ("image", "audio")),
    "rnn": (_rnn, ("text",)),
    "hf": (_hf, ("image", "audio", "text")),
}
ALIASES = {"vit": "transformer", "vit_conv": "conv_transformer"}


def arch_name(cfg: ModelConfig, modality: str) -> str:
    """The canonical arch of a modality's encoder; an unknown or unsuitable one names the choices."""
    arch = getattr(cfg, modality).arch
    arch = ALIASES.get(arch, arch)
    choices = sorted(a for a, (_, modalities) in ENCODERS.items() if modality in modalities)
    if arch not in choices:
        raise ValueError(f"model.{modality}.arch={getattr(cfg, modality).arch!r}; choose one of {choices}")
    return arch


def build_encoder(cfg: ModelConfig, modality: str) -> nn.Module:
    """The encoder model.<modality>.arch names."""
    check_token_dropout(cfg, modality)
    return ENCODERS[arch_name(cfg, modality)][0](cfg, modality)


def set_token_dropout(model: nn.Module, enabled: bool) -> None:
    """Turns every encoder's token dropout on (its configured fraction) or off
    (the final unmasked phase); `model` may be any module around them."""
    for module in model.modules():
        if isinstance(module, Encoder):
            module.token_dropout = module.configured_token_dropout if enabled else 0.0
