"""train.predict's reader: many shards through one set of DataLoader
workers, each shard's batches kept apart (a part file per shard), unlike
the trainer's loader (loader.py), which mixes them into one stream."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from data_pipeline.config import DataConfig, worker_count
from data_pipeline.decode import MODALITIES, mel_filterbank, warm_decoders
from data_pipeline.loader import StreamLoader, worker_loader
from data_pipeline.stream import Source
from data_pipeline.tokenizer import load_tokenizer


@dataclass(frozen=True)
class ShardPiece:
    """Piece `piece` of `pieces` (contiguous, in sample order) of shard
    `shard`, an index into ShardwiseLoader's URL list."""

    shard: int
    piece: int = 0
    pieces: int = 1


def shard_pieces(shards: list[int], sizes: list[int], *, workers: int, batch_size: int) -> list[ShardPiece]:
    """The work of ShardwiseLoader's workers, handed out round-robin.

    Whole shards when there are at least four per worker: the last round,
    in which some workers may idle, is then a small part of the whole. With
    fewer, each shard is cut into pieces (at most one per worker) so that
    there are that many, but never into pieces of under a batch (each piece
    is read in batches of its own, padded). A piece's worker reads the shard
    past the pieces before its own without decoding them."""
    if not shards:
        return []
    n = 1 if workers <= 1 else min(workers, -(-4 * workers // len(shards)))
    out = []
    for i in shards:
        cut = max(1, min(n, sizes[i] // max(1, batch_size)))
        out += [ShardPiece(i, k, cut) for k in range(cut)]
    return out


class _Pieces(torch.utils.data.IterableDataset):
    """Worker w of W reads pieces w, w + W, ... each through a loader of its
    own, in the worker's process: (piece, batch, None) for each batch, then
    (piece, None, samples skipped by reason)."""

    def __init__(self, pieces: list[ShardPiece], loader_for):
        super().__init__()
        self.pieces, self.loader_for = pieces, loader_for

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for piece in self.pieces[worker::workers]:
            loader = self.loader_for(piece)
            if loader is None:  # an empty shard
                yield piece, None, {}
                continue
            for batch in loader.read_here():
                yield piece, batch, None
            yield piece, None, dict(loader.skipped)


def _unchanged(item):
    return item


class ShardwiseLoader:
    """Held-out batches of many shards, each shard's kept apart, through one
    set of DataLoader workers for all of them (train.predict's reader: it
    writes a part per shard).

    Iterating yields (ShardPiece, batch, None) for every batch and
    (ShardPiece, None, skipped-by-reason) once a piece is read. The workers
    start, and begin decoding, as soon as iter() is called. Pieces of
    different workers interleave; within a piece, batches come in sample
    order. A loader per shard would fork a worker set per shard, and each
    fresh worker pays again for its start and its first, cold batches."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        sizes: list[int],
        shards: list[int],
        *,
        batch_size: int,
        modalities: tuple[str, ...] | list[str] = MODALITIES,
    ):
        self.cfg, self.urls, self.sizes, self.batch_size = cfg, urls, sizes, batch_size
        self.modalities = tuple(modalities)
        self.num_workers = worker_count(cfg.num_workers)
        self.pieces = shard_pieces(shards, sizes, workers=self.num_workers, batch_size=batch_size)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        # Built before the workers fork: they inherit them.
        mel_filterbank(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels)
        if self.num_workers > 0:
            warm_decoders(cfg)
        # A piece's loader, made here once, checks the settings in this
        # process: a bad one is a plain error, not a worker's traceback.
        for piece in self.pieces:
            if self._loader_for(piece) is not None:
                break

    def _loader_for(self, piece: ShardPiece) -> StreamLoader | None:
        url, size = self.urls[piece.shard], self.sizes[piece.shard]
        if size == 0:
            return None
        return StreamLoader(
            dataclasses.replace(self.cfg, num_workers=0),
            split="heldout",
            batch_size=self.batch_size,
            rank=piece.piece,
            world_size=piece.pieces,
            tokenizer=self.tokenizer,
            modalities=self.modalities,
            # As listed: the URL is not expanded again (a name may hold glob characters).
            sources=[Source(urls=[url], sizes=[size])],
        )

    def __iter__(self):
        dataset = _Pieces(self.pieces, self._loader_for)
        return iter(worker_loader(dataset, workers=self.num_workers, seed=self.cfg.seed, collate_fn=_unchanged))
