"""Streaming loader: shard list -> node split -> worker split -> shuffle ->
decode -> collate into the batch dict of ARCHITECTURE.md."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import random
from functools import partial
from typing import Iterator

import torch
import webdataset as wds
from braceexpand import braceexpand

from data_pipeline.config import DataConfig
from data_pipeline.decode import (
    AUDIO_EXTS,
    IMAGE_EXTS,
    TEXT_EXTS,
    decode_audio,
    decode_image,
    first_present,
)
from data_pipeline.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

_REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "pipe:")


def expand_shards(spec: str, *, allow_pipe: bool = False) -> list[str]:
    """Turns "dir", "glob*", "brace-{000..009}.tar" (joined by "::") into URLs.

    Local patterns that match nothing fail here, naming the pattern.
    """
    urls: list[str] = []
    for part in (p.strip() for p in spec.split("::")):
        if not part:
            continue
        if part.startswith("pipe:") and not allow_pipe:
            raise ValueError(
                f"shard source {part!r} is a pipe: URL, which runs a shell command; "
                "set data.allow_pipe=true to allow it"
            )
        if part.startswith(_REMOTE_PREFIXES):
            urls.extend(braceexpand(part))
            continue
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
        else:
            found = sorted({m for p in braceexpand(part) for m in glob.glob(p)})
        if not found:
            raise FileNotFoundError(f"shard pattern {part!r} matched no .tar files")
        urls.extend(found)
    if not urls:
        raise FileNotFoundError(f"no shards given (pattern {spec!r})")
    return urls


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _epoch_shards(urls: list[str], *, seed: int, rank: int, world_size: int) -> Iterator[dict]:
    """Endless stream of this rank's and worker's shards.

    Each epoch permutes the full list with the same seed on every rank, then
    rank r takes every world_size-th shard and each worker every
    num_workers-th of those, so no two readers share a shard in an epoch.
    """
    worker, num_workers = _worker()
    for epoch in itertools.count():
        order = random.Random(seed * 100_003 + epoch).sample(urls, len(urls))
        for url in order[rank::world_size][worker::num_workers]:
            yield {"url": url}


def _all_shards(urls: list[str]) -> Iterator[dict]:
    """One pass over every shard, split across workers only (evaluation)."""
    worker, num_workers = _worker()
    for url in urls[worker::num_workers]:
        yield {"url": url}


def _shuffle(samples: Iterator[dict], *, bufsize: int, seed: int, rank: int) -> Iterator[dict]:
    """Reservoir shuffle with a seed fixed by (seed, rank, worker)."""
    worker, _ = _worker()
    rng = random.Random(seed * 1_000_003 + rank * 1_009 + worker)
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(bufsize)
        yield buf[i]
        buf[i] = sample
    rng.shuffle(buf)
    yield from buf


def decode_sample(sample: dict, *, cfg: DataConfig, tokenizer: ByteTokenizer) -> dict:
    """Raw tar members -> tensors; a missing modality becomes None."""
    image = first_present(sample, IMAGE_EXTS)
    audio = first_present(sample, AUDIO_EXTS)
    text = first_present(sample, TEXT_EXTS)
    if isinstance(text, bytes):
        text = text.decode("utf-8").strip()
    return {
        "__key__": sample["__key__"],
        "image": decode_image(image, size=cfg.image_size) if image is not None else None,
        "audio": decode_audio(audio, cfg) if audio is not None else None,
        "text": tokenizer.encode(text, max_len=cfg.max_text_len) if text else None,
    }


def collate(samples: list[dict], *, cfg: DataConfig, pad_id: int = ByteTokenizer.pad_id) -> dict:
    """Stacks decoded samples; absent modalities are zeros with mask False."""
    b = len(samples)
    batch = {
        "image": torch.zeros(b, 3, cfg.image_size, cfg.image_size),
        "image_mask": torch.zeros(b, dtype=torch.bool),
        "audio": torch.zeros(b, cfg.n_mels, cfg.audio_frames),
        "audio_mask": torch.zeros(b, dtype=torch.bool),
        "text": torch.full((b, cfg.max_text_len), pad_id, dtype=torch.long),
        "text_mask": torch.zeros(b, dtype=torch.bool),
        "text_pad": torch.ones(b, cfg.max_text_len, dtype=torch.bool),
        "__key__": [s["__key__"] for s in samples],
    }
    for i, s in enumerate(samples):
        if s["image"] is not None:
            batch["image"][i] = s["image"]
            batch["image_mask"][i] = True
        if s["audio"] is not None:
            batch["audio"][i] = s["audio"]
            batch["audio_mask"][i] = True
        if s["text"] is not None:
            n = s["text"].numel()
            batch["text"][i, :n] = s["text"]
            batch["text_pad"][i, :n] = False
            batch["text_mask"][i] = True
    return batch


def build_loader(
    cfg: DataConfig,
    *,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: ByteTokenizer | None = None,
) -> wds.WebLoader:
    """The loader for `split` ("train": endless, split by rank; "heldout":
    one full pass on every rank, so evaluation sees the whole set)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    urls = expand_shards(getattr(cfg, split), allow_pipe=cfg.allow_pipe)
    tokenizer = tokenizer or ByteTokenizer()
    workers = cfg.num_workers
    if split == "train":
        readers = world_size * max(1, workers)
        if len(urls) < readers:
            raise ValueError(
                f"{len(urls)} train shards cannot feed {world_size} ranks × {max(1, workers)} "
                f"workers: each reader needs at least one shard. Write smaller shards or set "
                f"data.num_workers lower."
            )
        source = partial(_epoch_shards, urls, seed=cfg.seed, rank=rank, world_size=world_size)
    else:
        workers = min(workers, len(urls))
        source = partial(_all_shards, urls)

    stages = [source, wds.tarfile_to_samples(handler=wds.warn_and_continue)]
    if split == "train" and cfg.shuffle_buffer > 1:
        stages.append(partial(_shuffle, bufsize=cfg.shuffle_buffer, seed=cfg.seed, rank=rank))
    stages += [
        wds.map(partial(decode_sample, cfg=cfg, tokenizer=tokenizer), handler=wds.warn_and_continue),
        wds.batched(batch_size, collation_fn=partial(collate, cfg=cfg), partial=split != "train"),
    ]
    pipeline = wds.DataPipeline(*stages)
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0 and split == "train",
        prefetch_factor=4 if workers > 0 else None,
    )
