"""Text tokenizers: bytes (no training, no vocabulary file) or a trained BPE
(data_pipeline/bpe.py), chosen by :func:`load_tokenizer`."""

from __future__ import annotations

from typing import Iterable, Protocol

import torch


class Tokenizer(Protocol):
    """What the loader and the model need of a tokenizer. Every tokenizer uses
    ids 0 = PAD, 1 = BOS, 2 = EOS, 3 = MASK."""

    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int
    vocab_size: int

    def encode(self, text: str, *, max_len: int) -> torch.Tensor: ...

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past a few special ids.

    ids: 0 = PAD, 1 = BOS, 2 = EOS, 3 = MASK, 4 + b for byte b.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    mask_id = 3
    offset = 4
    vocab_size = 256 + offset

    def encode(self, text: str, *, max_len: int) -> torch.Tensor:
        """Returns a 1-D long tensor of at most max_len ids, BOS ... EOS."""
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (BOS, one byte, EOS), got {max_len}")
        body = list(text.encode("utf-8"))[: max_len - 2]
        ids = [self.bos_id] + [b + self.offset for b in body] + [self.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
        return data.decode("utf-8", errors="replace")


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by `spec`: "byte" is ByteTokenizer; anything else is
    the path of a tokenizer JSON written by `python -m data_pipeline tokenizer train`."""
    if spec == "byte":
        return ByteTokenizer()
    from data_pipeline.bpe import BPETokenizer  # lazy: only BPE needs `tokenizers`

    return BPETokenizer.from_file(spec)
