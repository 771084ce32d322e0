"""The one transformer block every encoder uses: pre-norm, SDPA attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def rotary_tables(n: int, head_dim: int, *, device, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each N×(head_dim/2), for rotary position embeddings."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs of channels of x (B×H×N×Dh) by position-dependent angles."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float = 0.0, rotary: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if rotary and (width // heads) % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {width // heads}")
        self.heads = heads
        self.rotary = rotary
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: B×N×D; keep: B×N bool, True where a key may be attended to."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.rotary:
            cos, sin = rotary_tables(n, d // self.heads, device=x.device)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        mask = keep[:, None, None, :] if keep is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0, rotary: bool = False):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout, rotary)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of blocks with a final norm; optionally recomputes each block's
    activations in the backward pass (activation checkpointing)."""

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float = 0.0,
        *,
        rotary: bool = False,
        checkpointing: bool = False,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, rotary) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, keep, use_reentrant=False)
            else:
                x = block(x, keep)
        return self.norm(x)
