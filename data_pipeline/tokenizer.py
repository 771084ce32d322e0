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


class PretrainedTokenizer:
    """The tokenizer of a pretrained text backbone: a directory in Hugging
    Face's save_pretrained layout holding tokenizer.json (a BERT's, say), for
    `model.text.arch=hf`. Its own ids, special tokens ([CLS] … [SEP]) and
    padding id are used as they are; captions longer than max_len are cut,
    keeping the closing special token."""

    def __init__(self, directory: str):
        from pathlib import Path

        from tokenizers import Tokenizer as _Tokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"data.tokenizer={directory}: no tokenizer.json there (save the backbone's "
                "tokenizer with save_pretrained into that directory)"
            )
        self._tok = _Tokenizer.from_file(str(path))
        self._tok.encode_special_tokens = True  # a caption's literal "[SEP]" stays text
        self.source = str(path)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

        def first(*tokens: str) -> int | None:
            return next((i for i in map(self._tok.token_to_id, tokens) if i is not None), None)

        pad = first("[PAD]", "<pad>", "<|endoftext|>")
        if pad is None:
            raise ValueError(f"tokenizer {path}: no padding token ([PAD] or <pad>)")
        self.pad_id = pad
        self.bos_id = first("[CLS]", "<s>", "<|startoftext|>")
        self.eos_id = first("[SEP]", "</s>", "<|endoftext|>")
        self.mask_id = first("[MASK]", "<mask>")

    def encode(self, text: str, *, max_len: int) -> torch.Tensor:
        ids = self._tok.encode(text).ids
        if len(ids) > max_len:
            ids = ids[: max_len - 1] + ids[-1:]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by `spec`: "byte" is ByteTokenizer; a directory is
    a pretrained backbone's tokenizer (PretrainedTokenizer); anything else is
    the path of a tokenizer JSON written by `python -m data_pipeline tokenizer train`."""
    import os

    if spec == "byte":
        return ByteTokenizer()
    if os.path.isdir(spec):
        return PretrainedTokenizer(spec)
    from data_pipeline.bpe import BPETokenizer  # lazy: only BPE needs `tokenizers`

    return BPETokenizer.from_file(spec)


def tokenizer_for(export: str) -> Tokenizer:
    """The tokenizer an exported model (`python -m train.export`) was trained
    with, from the copy bundled beside it: byte, a trained BPE or a
    pretrained text backbone's. Captions must be encoded with it:

        model = mm_models.load("export/model.safetensors")
        tokenizer = tokenizer_for("export/model.safetensors")
    """
    import json
    import os

    config_path = os.path.splitext(export)[0] + ".json"
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} is missing: the export's config names its tokenizer")
    spec = json.loads(open(config_path, encoding="utf-8").read()).get("data", {}).get("tokenizer", "byte")
    if spec != "byte" and not os.path.isabs(spec):
        spec = os.path.join(os.path.dirname(os.path.abspath(export)), spec)
    return load_tokenizer(spec)


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """What a tokenizer maps text to, as a short digest: "byte" for
    ByteTokenizer, else the sha256 of its canonical serialization (the same
    tokenizer.json copied elsewhere, or bundled with an export, digests the
    same; one with other merges or ids does not)."""
    import hashlib

    inner = getattr(tokenizer, "_tok", None)
    if inner is None:
        return "byte"
    return hashlib.sha256(inner.to_str().encode()).hexdigest()[:16]
