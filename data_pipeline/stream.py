"""The worker side of the loader: a deterministic stream of batches for one
(rank, worker), from any position, in epoch or resampled mode.

Every position in the stream is fixed by (seed, epoch, rank, worker) alone:
shard order, block shuffles and source draws are all seeded, and bad data
keeps its slot as a counted skip. Resuming at batch k therefore replays
nothing but byte reads up to the current shuffle block.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from data_pipeline.cache import from_config as cache_from_config
from data_pipeline.config import DataConfig
from data_pipeline.decode import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    MODALITIES,
    TEXT_EXTS,
    audio_wave,
    first_present,
    image_pixels,
)
from data_pipeline.labels import LabelError, LabelSpec
from data_pipeline.plan import Pool, Segment, block_key, block_permutation, consumed_by_worker, epoch_plan
from data_pipeline.redact import redact_text
from data_pipeline.sources import Skip, read_shard

_CHOICE_CHUNK = 4096


def worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


@dataclass
class Source:
    urls: list[str]
    sizes: list[int]
    weight: float = 1.0


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_caption(raw: bytes, *, max_tokens: int) -> str:
    """UTF-8 text, of which only the start that can fill max_tokens tokens
    is decoded (at most 64 bytes a token): an unbounded caption costs no
    more than a long one. A character cut at the end is dropped."""
    limit = max(4096, 64 * max_tokens)
    head = raw[:limit]
    try:
        return head.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        if len(raw) > limit and e.start >= len(head) - 3:
            return head[: e.start].decode("utf-8").strip()
        raise


def decode_sample(
    sample: dict,
    *,
    cfg: DataConfig,
    tokenizer,
    labels: LabelSpec | None = None,
    modalities: tuple[str, ...] = MODALITIES,
) -> dict:
    """Raw tar members -> tensors; an absent modality becomes None, and so
    does one outside `modalities` (the model does not read it: not decoded).
    The image is uint8 pixels and the audio a waveform: collate() scales
    the one and takes the log-mel of the other for the whole batch at once.

    Raises BadSample for data that is present but unusable, for a sample
    that lacks a modality listed in cfg.require, and (with `labels`, a
    classifier's) for one whose label is missing or invalid.
    """
    image = first_present(sample, IMAGE_EXTS)
    audio = first_present(sample, AUDIO_EXTS)
    text = first_present(sample, TEXT_EXTS)
    if image is None and audio is None and text is None:
        raise BadSample("no_modalities", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
    out: dict = {"__key__": sample["__key__"], "image": None, "audio": None, "text": None}
    present = {"image": image is not None, "audio": audio is not None, "text": text is not None}
    image, audio, text = (raw if m in modalities else None for m, raw in zip(MODALITIES, (image, audio, text)))
    if image is not None:
        try:
            out["image"] = image_pixels(image, size=cfg.image_size)
        except Exception as e:
            raise BadSample("bad_image", f"{type(e).__name__}: {e}") from e
    if audio is not None:
        try:
            out["audio"] = audio_wave(audio, cfg)
        except Exception as e:
            raise BadSample("bad_audio", f"{type(e).__name__}: {e}") from e
    if text is not None:
        try:
            caption = decode_caption(text, max_tokens=cfg.max_text_len)
        except UnicodeDecodeError as e:
            raise BadSample("bad_text", str(e)) from e
        if not caption:
            raise BadSample("empty_text")
        out["text"] = tokenizer.encode(caption, max_len=cfg.max_text_len)
    for m in cfg.require:
        if not present[m]:
            raise BadSample(f"missing_{m}")
    if labels is None:
        out["label"], out["class_name"] = read_label(sample.get("json"), cfg)
        return out
    try:
        value = labels.read(sample.get("json"), label_key=cfg.label_key, class_key=cfg.class_key)
    except LabelError as e:
        raise BadSample(e.reason, e.detail) from None
    if labels.multi_label:
        out["label"], out["class_name"] = 0, ",".join(labels.name(i) for i in value)
        out["label_multi"] = torch.zeros(labels.num_classes)
        out["label_multi"][value] = 1.0
    else:
        # The name the .json gives its class (for reports), else the configured one.
        out["label"], out["class_name"] = value, labels.name(value)
        if not labels.classes:
            out["class_name"] = read_label(sample.get("json"), cfg)[1] or out["class_name"]
    return out


def read_label(raw: bytes | None, cfg: DataConfig) -> tuple[int, str]:
    """(label, class name) from a sample's .json; (-1, "") where it has none.

    A label must be a non-negative integer; anything else counts as no label.
    Unparsable JSON is a bad sample.
    """
    if raw is None or not cfg.label_key:
        return -1, ""
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("bad_json", str(e)) from e
    if not isinstance(meta, dict):
        return -1, ""
    label = meta.get(cfg.label_key)
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        return -1, ""
    name = meta.get(cfg.class_key)
    return label, name.strip() if isinstance(name, str) else ""


def block_shuffled(
    read_from: Callable[[int], Iterator], *, total: int | None, start: int, block: int, key: list[int]
) -> Iterator:
    """Items from position `start` of a stream shuffled within fixed blocks.

    read_from(p) iterates the unshuffled stream from position p; total=None
    means endless. Block b is permuted by a generator seeded with key + [b].
    """
    if block <= 1:
        yield from read_from(start)
        return
    b = start // block
    pos = b * block
    raw = read_from(pos)
    first = start - pos
    while total is None or pos < total:
        n = block if total is None else min(block, total - pos)
        buf = [next(raw) for _ in range(n)]
        for i in block_permutation(key, b, n)[first:]:
            yield buf[i]
        first, pos, b = 0, pos + n, b + 1


class BatchStream:
    """Iterable over the batches of one (rank, worker); see module doc."""

    def __init__(
        self,
        *,
        sources: list[Source],
        cfg: DataConfig,
        tokenizer,
        collate: Callable,
        batch_size: int,
        rank: int,
        world_size: int,
        mode: str,
        epoch: int,
        start_batch: int,
        shuffle: bool,
        labels: LabelSpec | None = None,
        modalities: tuple[str, ...] = MODALITIES,
        pool: Pool | None = None,
        generation: int = 0,
    ):
        self.sources, self.cfg, self.tokenizer, self.collate = sources, cfg, tokenizer, collate
        self.labels, self.modalities = labels, modalities
        # The epoch's positions still to read (None: all) and which plan over
        # them this is (0 unless the run resumed on another topology).
        self.pool, self.generation = pool, generation
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.mode, self.epoch, self.start_batch, self.shuffle = mode, epoch, start_batch, shuffle
        self.cache = cache_from_config(cfg.cache_dir, cfg.cache_max_gb)

    # -- epoch mode -----------------------------------------------------
    def _epoch_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        urls = [u for s in self.sources for u in s.urls]
        sizes = [n for s in self.sources for n in s.sizes]
        plan = epoch_plan(
            sizes,
            seed=self.cfg.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            batch_size=self.batch_size,
            shuffle_shards=self.shuffle,
            pool=self.pool,
        )
        done = consumed_by_worker(self.start_batch, worker=worker, num_workers=num_workers)
        total = sum(plan.real)
        reads = _coalesce(plan.segments)

        def read_from(pos: int) -> Iterator:
            for shard, pieces in reads:
                count = sum(take for _, take in pieces)
                if pos >= count:
                    pos -= count
                    continue
                # One pass over the shard for all of its pieces: a pool left by a
                # resume on another topology can cut a shard into many of them.
                wanted = [(a, a + take) for a, take in pieces]
                first, pos = _advance(wanted, pos), 0
                end = wanted[-1][1]
                items = read_shard(
                    urls[shard],
                    size=sizes[shard],
                    skip=first,
                    take=end - first,
                    max_member_bytes=self.cfg.max_member_bytes,
                    cache=self.cache,
                )
                j = 0
                for at, item in enumerate(items, start=first):
                    while at >= wanted[j][1]:
                        j += 1
                    if at >= wanted[j][0]:
                        yield item

        block = self.cfg.shuffle_buffer if self.shuffle else 1
        key = block_key(seed=self.cfg.seed, epoch=self.epoch, rank=self.rank, worker=worker, generation=self.generation)
        items = block_shuffled(read_from, total=total, start=sum(plan.real[:done]), block=block, key=key)
        for real in plan.real[done:]:
            yield self._batch([next(items) for _ in range(real)])

    # -- resampled mode -------------------------------------------------
    def _fresh(self) -> list[int]:
        """Extra seed material after a resume on another topology: the new
        ranks' streams are fresh draws (resampling has no epoch to finish)."""
        return [self.generation] if self.generation else []

    def _source_stream(self, s: int, worker: int, start: int) -> Iterator:
        """Source s's samples for this worker: seeded random shards, each read
        through, beginning `start` samples in."""
        src = self.sources[s]
        rng = np.random.default_rng([self.cfg.seed, self.rank, worker, 2, s, *self._fresh()])
        while True:
            shard = int(rng.integers(len(src.urls)))
            size = src.sizes[shard]
            if start >= size:
                start -= size
                continue
            yield from read_shard(
                src.urls[shard], size=size, skip=start, max_member_bytes=self.cfg.max_member_bytes, cache=self.cache
            )
            start = 0

    def _choices(self, worker: int) -> Iterator[int]:
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        rng = np.random.default_rng([self.cfg.seed, self.rank, worker, 1, *self._fresh()])
        while True:
            yield from rng.choice(len(self.sources), size=_CHOICE_CHUNK, p=weights / weights.sum()).tolist()

    def _resampled_batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        def read_from(pos: int) -> Iterator:
            choices = self._choices(worker)
            counts = Counter(next(choices) for _ in range(pos))
            streams = [self._source_stream(s, worker, counts[s]) for s in range(len(self.sources))]
            for s in choices:
                yield next(streams[s])

        done = consumed_by_worker(self.start_batch, worker=worker, num_workers=num_workers)
        block = self.cfg.shuffle_buffer if self.shuffle else 1
        items = block_shuffled(
            read_from,
            total=None,
            start=done * self.batch_size,
            block=block,
            key=[self.cfg.seed, self.rank, worker, *self._fresh()],
        )
        while True:
            yield self._batch([next(items) for _ in range(self.batch_size)])

    # -- shared -----------------------------------------------------------
    def _batch(self, items: list) -> dict:
        """Decodes items into a batch of exactly batch_size rows; skipped and
        missing samples become padding rows (every mask False)."""
        decoded: list[dict | None] = []
        skipped: Counter = Counter()
        for item in items:
            if isinstance(item, Skip):
                skipped[item.reason] += 1
                self._error(item.shard, item.reason, item.detail, event=(item.shard, item.reason))
                continue
            try:
                decoded.append(
                    decode_sample(
                        item, cfg=self.cfg, tokenizer=self.tokenizer, labels=self.labels, modalities=self.modalities
                    )
                )
                self._consecutive, self._last_event = 0, None
            except BadSample as e:
                skipped[e.reason] += 1
                if not e.reason.startswith("missing_"):  # a filter, not an error
                    self._error(item.get("__url__", "?"), e.reason, f"{item['__key__']}: {e.detail}")
        decoded += [None] * (self.batch_size - len(decoded))
        batch = self.collate(decoded)
        batch["__skipped__"] = dict(skipped)
        return batch

    def _error(self, shard: str, reason: str, detail: str, event: tuple | None = None) -> None:
        # A broken shard yields many skips in a row; it counts as one error.
        if event is not None and event == self._last_event:
            return
        self._last_event = event
        self._consecutive += 1
        if self._consecutive >= self.cfg.max_consecutive_errors:
            raise RuntimeError(
                f"{self._consecutive} bad samples in a row (data.max_consecutive_errors="
                f"{self.cfg.max_consecutive_errors}); the last in shard {redact_text(shard)}: {reason} "
                f"{redact_text(detail)}".rstrip()
            )

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_info()
        # A DataLoader always asks worker 0 first; the batch due next (number
        # start_batch) belongs to logical worker start_batch % num_workers.
        return self.batches((worker + self.start_batch) % num_workers, num_workers)

    def batches(self, worker: int, num_workers: int) -> Iterator[dict]:
        """The batches of logical worker `worker` of `num_workers`, read in
        this process (worker=0, num_workers=1: the whole stream)."""
        self._consecutive, self._last_event = 0, None
        if self.mode == "epoch":
            return self._epoch_batches(worker, num_workers)
        return self._resampled_batches(worker, num_workers)


def _coalesce(segs: list[Segment]) -> list[tuple[int, list[tuple[int, int]]]]:
    """Consecutive pieces of one shard, in shard order, as (shard, [(skip, take)...])."""
    out: list[tuple[int, list[tuple[int, int]]]] = []
    for seg in segs:
        if out and out[-1][0] == seg.shard and seg.skip >= sum(out[-1][1][-1]):
            out[-1][1].append((seg.skip, seg.take))
        else:
            out.append((seg.shard, [(seg.skip, seg.take)]))
    return out


def _advance(wanted: list[tuple[int, int]], pos: int) -> int:
    """The shard position of the pos-th wanted sample; drops the pieces before it."""
    while pos >= wanted[0][1] - wanted[0][0]:
        pos -= wanted[0][1] - wanted[0][0]
        wanted.pop(0)
    start = wanted[0][0] + pos
    wanted[0] = (start, wanted[0][1])
    return start


class BatchDataset(torch.utils.data.IterableDataset):
    """Hands a BatchStream to DataLoader workers."""

    def __init__(self, stream: BatchStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict]:
        return iter(self.stream)
