"""Byte-level BPE tokenizer trained on the shards' captions (Hugging Face `tokenizers`).

Same interface and special ids as :class:`data_pipeline.tokenizer.ByteTokenizer`:
0 = PAD, 1 = BOS, 2 = EOS, 3 = MASK. Byte-level pre-tokenization means any
UTF-8 text encodes without unknown tokens and decodes back exactly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.decode import TEXT_EXTS
from data_pipeline.sources import Skip, count_samples, read_shard

log = logging.getLogger(__name__)

# In id order: PAD, BOS, EOS, MASK must be ids 0..3, as in ByteTokenizer.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>")
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the 256 byte symbols


class BPETokenizer:
    """A trained byte-level BPE vocabulary; ids 0..3 are PAD, BOS, EOS, MASK."""

    pad_id = 0
    bos_id = 1
    eos_id = 2
    mask_id = 3

    def __init__(self, tokenizer: Tokenizer, *, source: str = "<in memory>") -> None:
        found = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if found != list(range(len(SPECIAL_TOKENS))):
            raise ValueError(
                f"tokenizer {source}: special tokens {list(SPECIAL_TOKENS)} must have ids 0..3 "
                f"(the ids ByteTokenizer uses), found ids {found}; retrain it with "
                f"`python -m data_pipeline tokenizer train`"
            )
        # Captions that contain a literal "<pad>" etc. encode as text, not as a special id.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.source = source
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"tokenizer file {path!r} does not exist (give 'byte' or the path to a "
                f"tokenizer JSON written by `python -m data_pipeline tokenizer train`)"
            )
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise ValueError(f"tokenizer file {path!r} is not a valid tokenizer JSON: {e}") from e
        return cls(tokenizer, source=repr(path))

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._tok.save(path)

    def encode(self, text: str, *, max_len: int) -> torch.Tensor:
        """Returns a 1-D long tensor of at most max_len ids, BOS ... EOS."""
        if max_len < 3:
            raise ValueError(f"max_len must be at least 3 (BOS, one token, EOS), got {max_len}")
        body = self._tok.encode(text, add_special_tokens=False).ids[: max_len - 2]
        return torch.tensor([self.bos_id, *body, self.eos_id], dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        body = [int(i) for i in ids if int(i) >= len(SPECIAL_TOKENS)]
        return self._tok.decode(body, skip_special_tokens=False)

    # encode_special_tokens is not kept by Tokenizer's own pickling; loader
    # workers started with spawn get a copy through these.
    def __getstate__(self) -> dict:
        return {"json": self._tok.to_str(), "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(Tokenizer.from_str(state["json"]), source=state["source"])


# ---------------------------------------------------------------------------
# Reading captions from shards


@dataclass
class CaptionStats:
    captions: int = 0
    shards_read: int = 0
    shards_skipped: list[str] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)  # samples lost in broken shards, by reason


def shard_captions(url: str, stats: CaptionStats) -> list[str]:
    """The non-empty captions of one shard, one per sample, read by the
    loader's own reader (data_pipeline.sources.read_shard) and chosen as the
    loader chooses them (`.txt`, else `.caption`). A shard that breaks
    part-way gives the captions before the break, as it does in training;
    the lost samples are counted in stats.skipped by reason."""
    captions = []
    for item in read_shard(url, size=count_samples(url)):
        if isinstance(item, Skip):
            stats.skipped[item.reason] += 1
            continue
        raw = next((item[e] for e in TEXT_EXTS if e in item), None)
        if raw is None:
            continue
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            continue  # the loader drops such samples too
        if text:
            captions.append(text)
    return captions


def iter_captions(shards: Iterable[str], stats: CaptionStats) -> Iterator[str]:
    """Captions of every shard; a shard with no readable sample is logged and recorded in stats."""
    for url in shards:
        captions = shard_captions(url, stats)
        if not captions:
            log.warning("skipping shard %s: no readable caption", url)
            stats.shards_skipped.append(url)
            continue
        stats.shards_read += 1
        stats.captions += len(captions)
        yield from captions


# ---------------------------------------------------------------------------
# Training


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _train(shards: list[str], out: str, *, vocab_size: int, min_frequency: int) -> tuple[BPETokenizer, CaptionStats]:
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} (4 specials + 256 bytes), got {vocab_size}")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),  # given first, so they get ids 0..3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = CaptionStats()
    tok = _new_tokenizer()
    tok.train_from_iterator(iter_captions(shards, stats), trainer=trainer)
    if stats.captions == 0:
        raise ValueError(
            f"no captions ({'/'.join('.' + e for e in TEXT_EXTS)} members) found in {len(shards)} shards "
            f"({len(stats.shards_skipped)} unreadable), e.g. {shards[0] if shards else 'none given'}"
        )
    if stats.shards_skipped:
        log.warning("skipped %d of %d shards as unreadable", len(stats.shards_skipped), len(shards))
    bpe = BPETokenizer(tok, source=repr(out))
    bpe.save(out)
    return bpe, stats


def train_bpe(shards: list[str], out: str, *, vocab_size: int = 8000, min_frequency: int = 2) -> BPETokenizer:
    """Trains a byte-level BPE on every caption of the `shards` (URLs the loader reads),
    saves it to `out` (JSON) and returns it. Shards with no readable caption are skipped."""
    return _train(shards, out, vocab_size=vocab_size, min_frequency=min_frequency)[0]


# ---------------------------------------------------------------------------
# Command line: python -m data_pipeline tokenizer train SHARDS OUT.json


def cmd_train(args: argparse.Namespace) -> int:
    from data_pipeline.sources import expand_shards

    try:
        shards = expand_shards(args.shards, allow_pipe=getattr(args, "allow_pipe", False))
        tok, stats = _train(shards, args.out, vocab_size=args.vocab_size, min_frequency=args.min_frequency)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {str(e).replace('data.allow_pipe=true', '--allow-pipe')}", file=sys.stderr)
        return 2
    skipped = f", {len(stats.shards_skipped)} unreadable shards skipped" if stats.shards_skipped else ""
    print(
        f"trained BPE on {stats.captions} captions from {stats.shards_read} shards{skipped}: "
        f"vocab size {tok.vocab_size}, written to {args.out}"
    )
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Registers `tokenizer train SHARDS OUT.json` on the data_pipeline CLI."""
    t = subparsers.add_parser("tokenizer", help="train a BPE tokenizer on the shards' captions")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tr = tsub.add_parser("train", help="shards' captions -> byte-level BPE tokenizer JSON")
    tr.add_argument("shards", help="a directory of .tar files, a glob or a brace pattern")
    tr.add_argument("out", help="the tokenizer JSON to write, e.g. data/tokenizer.json")
    tr.add_argument("--vocab-size", type=int, default=8000, help="target vocabulary size, specials included")
    tr.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learned")
    tr.add_argument(
        "--allow-pipe", action="store_true", help="read pipe: sources (each runs its shell command, as written)"
    )
    tr.set_defaults(func=cmd_train)
