"""The loader the trainer iterates: shards -> (rank, worker) streams ->
decoded, collated batches (the dict collate() builds, listed in this
package's docstring), with a state_dict() that resumes at exactly the next batch."""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import multiprocessing
import signal
from collections import Counter
from functools import partial
from typing import Iterator

import torch

from data_pipeline.config import MODES, DataConfig, worker_count
from data_pipeline.decode import MODALITIES, fit_wave, log_mel, mel_filterbank, scale_pixels, warm_decoders
from data_pipeline.labels import LabelSpec
from data_pipeline.plan import Pool, batches_per_rank, consumed_by_worker, epoch_plan, pool_size, remaining
from data_pipeline.redact import without_credentials
from data_pipeline.sources import expand_shards, shard_sizes
from data_pipeline.stream import BatchDataset, BatchStream, Source
from data_pipeline.tokenizer import ByteTokenizer, load_tokenizer

log = logging.getLogger(__name__)
STATE_VERSION = 1  # pool and generation were added later; absent means None and 0


def collate(
    samples: list[dict | None], *, cfg: DataConfig, pad_id: int = ByteTokenizer.pad_id, multi_label_classes: int = 0
) -> dict:
    """Stacks decoded samples. An absent modality is zeros with mask False; a
    None sample is a padding row (key "", every mask False). "label" is -1
    and "class_name" "" where a sample has no class label.

    A sample's image is float in [-1, 1] (decode_image) or uint8 pixels
    (image_pixels, as decode_sample gives it); its audio a log-mel
    (decode_audio) or a mono waveform at cfg.sample_rate (audio_wave's,
    already cropped or padded to cfg.audio_samples; any other is). The uint8 images are
    scaled, and the waveforms' log-mels taken, here for the batch at once."""
    b = len(samples)
    batch = {
        "image": torch.zeros(b, 3, cfg.image_size, cfg.image_size),
        "image_mask": torch.zeros(b, dtype=torch.bool),
        "audio": torch.zeros(b, cfg.n_mels, cfg.audio_frames),
        "audio_mask": torch.zeros(b, dtype=torch.bool),
        "text": torch.full((b, cfg.max_text_len), pad_id, dtype=torch.long),
        "text_mask": torch.zeros(b, dtype=torch.bool),
        "text_pad": torch.ones(b, cfg.max_text_len, dtype=torch.bool),
        "label": torch.tensor([s.get("label", -1) if s is not None else -1 for s in samples], dtype=torch.long),
        # with multi_label_classes=C (a multi-label classifier's loader): "label_multi", B×C multi-hot
        "class_name": [s.get("class_name", "") if s is not None else "" for s in samples],
        "__key__": [s["__key__"] if s is not None else "" for s in samples],
    }
    if multi_label_classes:
        batch["label_multi"] = torch.zeros(b, multi_label_classes)
    pixels, waves = [], []  # (row, tensor) to finish as a batch
    for i, s in enumerate(samples):
        if s is None:
            continue
        if multi_label_classes and "label_multi" in s:
            batch["label_multi"][i] = s["label_multi"]
        if s["image"] is not None:
            if s["image"].dtype == torch.uint8:
                pixels.append((i, s["image"]))
            else:
                batch["image"][i] = s["image"]
            batch["image_mask"][i] = True
        if s["audio"] is not None:
            if s["audio"].dim() == 1:
                waves.append((i, s["audio"]))
            else:
                batch["audio"][i] = s["audio"]
            batch["audio_mask"][i] = True
        if s["text"] is not None:
            n = s["text"].numel()
            batch["text"][i, :n] = s["text"]
            batch["text_pad"][i, :n] = False
            batch["text_mask"][i] = True
    if pixels:
        rows = torch.tensor([i for i, _ in pixels])
        batch["image"][rows] = scale_pixels(torch.stack([p for _, p in pixels]))
    if waves:
        rows = torch.tensor([i for i, _ in waves])
        n = cfg.audio_samples  # audio_wave's are fitted already; a caller's own waveform is fitted here
        fitted = [w if w.numel() == n and w.dtype == torch.float32 else fit_wave(w.numpy(), n) for _, w in waves]
        batch["audio"][rows] = log_mel(torch.stack(fitted), cfg)
    return batch


def source_specs(cfg: DataConfig, split: str) -> list[tuple[str, str, float]]:
    """(config key, shard pattern, weight) of each source of a split."""
    if split == "heldout":
        return [("data.heldout", cfg.heldout, 1.0)]
    if cfg.sources:
        return [(f"data.sources[{i}]", s.url, s.weight) for i, s in enumerate(cfg.sources)]
    return [("data.train", cfg.train, 1.0)]


def check_spec(key: str, spec: str, weight: float) -> None:
    """A ValueError naming the key for an empty pattern or a weight <= 0."""
    if not spec.strip():
        raise ValueError(f"{key} is empty: give a shard directory, glob or brace pattern")
    if weight <= 0:
        raise ValueError(f"{key}: data source {spec!r} has weight {weight}; weights must be positive")


def shard_size_table(cfg: DataConfig, split: str) -> dict[str, int]:
    """{shard URL: samples} for every shard of a split: what one rank reads
    (index.json, or a scan) and hands to the others (build_loader's sizes=)."""
    table: dict[str, int] = {}
    for _, spec, _ in source_specs(cfg, split):
        if spec.strip():
            urls = expand_shards(spec, allow_pipe=cfg.allow_pipe)
            table.update(zip(urls, shard_sizes(urls)))
    return table


def _sources(cfg: DataConfig, split: str, known: dict[str, int] | None = None) -> list[Source]:
    out = []
    for key, spec, weight in source_specs(cfg, split):
        check_spec(key, spec, weight)
        urls = expand_shards(spec, allow_pipe=cfg.allow_pipe)
        sizes = [known[u] for u in urls] if known and all(u in known for u in urls) else shard_sizes(urls)
        if sum(sizes) == 0:
            raise ValueError(f"data source {spec!r} holds no readable samples")
        out.append(Source(urls=urls, sizes=sizes, weight=weight))
    return out


def ignore_stop_signals(worker_id: int) -> None:
    """A data worker ignores SIGTERM, SIGINT and SIGUSR1: a cluster (or Ctrl-C)
    signals the whole process group, and the trainer must still have its
    workers while it finishes the step and checkpoints; it ends them itself
    (normally through the DataLoader; at exit with _kill_data_workers)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _kill_data_workers() -> None:
    """At exit, before multiprocessing's own handler: it would SIGTERM the
    daemonic workers (which ignore it) and then wait for them for ever, so a
    rank that fails would never exit and its peers would wait on it. Killed
    here instead (registered after multiprocessing's, so it runs first)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(_kill_data_workers)


def worker_loader(dataset, *, workers: int, seed: int, collate_fn=None) -> torch.utils.data.DataLoader:
    """A DataLoader over an iterable dataset that yields whole batches."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        collate_fn=collate_fn,
        num_workers=workers,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
        # Page-locked batches on a CUDA machine: the host-to-device copy
        # (to_device, non_blocking) then overlaps with compute.
        pin_memory=torch.cuda.is_available(),
        # Its own generator: a DataLoader draws its workers' base seed from the
        # global torch RNG otherwise, so a resumed run (which starts a new
        # iterator mid-epoch) would see other dropout masks than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )


class StreamLoader:
    """Iterates batches; for split="train" endlessly (epoch after epoch, or
    resampled), for "heldout" one unshuffled pass: over everything, or with
    rank/world_size over this rank's contiguous 1/world_size of it (the
    ranks' parts, in rank order, are the whole set in order).

    state_dict() describes the position after the last batch handed out (not
    the ones prefetched by workers); load_state_dict() continues from there.
    """

    def __init__(
        self,
        cfg: DataConfig,
        *,
        split: str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        tokenizer=None,
        labels: LabelSpec | None = None,
        sizes: dict[str, int] | None = None,
        modalities: tuple[str, ...] | list[str] = MODALITIES,
        sources: list[Source] | None = None,
    ):
        """sources: the split's shards already expanded and counted (cfg's
        pattern for the split is then not read)."""
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if cfg.mode not in MODES:
            raise ValueError(f"data.mode={cfg.mode!r}; choose one of {MODES}")
        unknown = set(cfg.require) - set(MODALITIES)
        if unknown:
            raise ValueError(f"data.require names unknown modalities {sorted(unknown)}; choose from {MODALITIES}")
        if not modalities or set(modalities) - set(MODALITIES):
            raise ValueError(f"modalities={list(modalities)}: choose a non-empty subset of {list(MODALITIES)}")
        # Only these are decoded: a classifier over image and text never pays
        # for the log-mel of samples' audio (the costliest decode).
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.cfg, self.split, self.batch_size = cfg, split, batch_size
        self.train = split == "train"
        # Held-out data is read unshuffled: whole on every rank by default, or
        # 1/world_size per rank, each rank getting the same number of batches.
        self.rank, self.world_size = rank, world_size
        self.mode = cfg.mode if self.train else "epoch"
        self.tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
        self.sources = sources if sources is not None else _sources(cfg, split, sizes)
        # Built before workers fork, so they inherit it instead of each building it.
        mel_filterbank(sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels)
        self.num_workers = worker_count(cfg.num_workers)
        if self.num_workers > 0:
            warm_decoders(cfg)  # before the workers fork: they inherit the set-up
        self.labels = labels  # a classifier's: samples without a usable label are counted skips
        self.epoch, self.batches = 0, 0
        # The current epoch's positions still to read when its plan was laid
        # (None: all) and how many plans this epoch has had (see plan.remaining).
        self.pool: Pool | None = None
        self.generation = 0
        self.skipped: Counter = Counter()

    @property
    def total_samples(self) -> int:
        return sum(sum(s.sizes) for s in self.sources)

    def batches_per_epoch(self) -> int:
        """Batches each rank gets per epoch (epoch mode)."""
        return batches_per_rank(self.total_samples, world_size=self.world_size, batch_size=self.batch_size)

    def _stream(self) -> BatchStream:
        return BatchStream(
            sources=self.sources,
            cfg=self.cfg,
            tokenizer=self.tokenizer,
            collate=partial(
                collate,
                cfg=self.cfg,
                pad_id=self.tokenizer.pad_id,
                multi_label_classes=self.labels.num_classes if self.labels and self.labels.multi_label else 0,
            ),
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            mode=self.mode,
            epoch=self.epoch,
            start_batch=self.batches,
            shuffle=self.train,
            labels=self.labels,
            modalities=self.modalities,
            pool=self.pool,
            generation=self.generation,
        )

    def _dataloader(self) -> torch.utils.data.DataLoader:
        return worker_loader(BatchDataset(self._stream()), workers=self.num_workers, seed=self.cfg.seed)

    def __iter__(self) -> Iterator[dict]:
        while True:
            for batch in self._dataloader():
                self.batches += 1
                self.skipped.update(batch.pop("__skipped__"))
                yield batch
            if self.mode == "resampled":  # endless: only an error ends it
                return
            if not self.train:
                return
            self.epoch, self.batches, self.pool, self.generation = self.epoch + 1, 0, None, 0

    def read_here(self) -> Iterator[dict]:
        """One pass of held-out batches decoded in the calling process,
        whatever process that is, without workers of its own. A DataLoader
        worker that reads many loaders in turn (shardwise.ShardwiseLoader's) calls
        this: iterated there, the loader would read only that worker's
        share of its samples."""
        if self.train:
            raise ValueError("read_here() reads a held-out split")
        for batch in self._stream().batches(0, 1):
            self.batches += 1
            self.skipped.update(batch.pop("__skipped__"))
            yield batch

    # -- state --------------------------------------------------------------
    def _fingerprint(self) -> dict:
        shards = [[u, n] for s in self.sources for u, n in zip(s.urls, s.sizes)]
        digest = hashlib.sha256(json.dumps([shards, [s.weight for s in self.sources]]).encode()).hexdigest()[:16]
        return {
            "mode": self.mode,
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "shards": digest,
        }

    def _worker_positions(self) -> list[dict]:
        """Where each worker stands: informative, derived from the position."""
        out = []
        for w in range(max(1, self.num_workers)):
            done = consumed_by_worker(self.batches, worker=w, num_workers=max(1, self.num_workers))
            entry = {"worker": w, "batches": done}
            if self.mode == "epoch":
                sizes = [n for s in self.sources for n in s.sizes]
                urls = [u for s in self.sources for u in s.urls]
                plan = epoch_plan(
                    sizes,
                    seed=self.cfg.seed,
                    epoch=self.epoch,
                    rank=self.rank,
                    world_size=self.world_size,
                    worker=w,
                    num_workers=max(1, self.num_workers),
                    batch_size=self.batch_size,
                    shuffle_shards=self.train,
                    pool=self.pool,
                )
                left = sum(plan.real[:done])
                for seg in plan.segments:
                    if left < seg.take:
                        entry.update(shard=without_credentials(urls[seg.shard]), sample_offset=seg.skip + left)
                        break
                    left -= seg.take
            out.append(entry)
        return out

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches": self.batches,
            "pool": None if self.pool is None else [list(i) for i in self.pool],
            "generation": self.generation,
            "skipped": dict(self.skipped),
            "rng": {"seed": self.cfg.seed, "derived_from": "seed, epoch, rank, worker, block"},
            "workers": self._worker_positions(),
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continues exactly where a loader of the same setup (world size,
        workers, batch size included) stopped; resume() also takes another."""
        position = self._position(state)
        mine, theirs = self._fingerprint(), state.get("fingerprint", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the data loader exactly: {detail}")
        self.epoch, self.batches, self.pool, self.generation = position
        self.skipped = Counter(state.get("skipped", {}))

    def resume(self, states: list[dict]) -> bool:
        """Continues from the states of every rank of the run that saved them
        (states[r] from its rank r). On the same setup that is load_state_dict
        of this rank's own state. On another world size, worker count, batch
        size or shuffle buffer, the saved ranks' positions are turned into
        the epoch's unread positions and this setup's plan is laid over them:
        every sample of the epoch is still read exactly once, across all
        ranks. Returns True if the setup changed."""
        if not states:
            raise ValueError("no saved loader states to resume from")
        saved = [s.get("fingerprint", {}) for s in states]
        mine = self._fingerprint()
        if len(states) == self.world_size and saved[self.rank] == mine:
            self.load_state_dict(states[self.rank])
            return False
        old = saved[0]
        for key in ("mode", "seed", "shards"):
            values = {json.dumps(f.get(key)) for f in saved} | {json.dumps(mine[key])}
            if len(values) > 1:
                what = "the shards" if key == "shards" else f"data.{key}"
                raise ValueError(
                    f"cannot resume the data loader: {what} changed "
                    f"(saved {old.get(key)!r}, now {mine[key]!r}); only the world size, "
                    "data.num_workers, the micro batch and data.shuffle_buffer may change on resume"
                )
        if any(f.get("world_size") != len(states) or f.get("rank") != r for r, f in enumerate(saved)):
            raise ValueError(f"the {len(states)} saved loader states are not ranks 0..{len(states) - 1} of one run")
        positions = [self._position(s) for s in states]
        if len({(e, json.dumps(pool), g) for e, _, pool, g in positions}) != 1:
            raise ValueError("the saved loader states disagree on the epoch or its plan")
        epoch, _, pool, generation = positions[0]
        self.skipped = Counter()
        if self.rank == 0:  # the totals live on; sum_counters adds the ranks' counts
            for s in states:
                self.skipped.update(s.get("skipped", {}))
        self.epoch, self.batches = epoch, 0
        if self.mode != "epoch":  # resampling: fresh streams for the new ranks
            self.pool, self.generation = None, generation + 1
            return True
        sizes = [n for s in self.sources for n in s.sizes]
        left = remaining(
            sizes,
            seed=self.cfg.seed,
            epoch=epoch,
            world_size=len(states),
            num_workers=max(1, _int(old.get("num_workers"), "num_workers")),
            batch_size=max(1, _int(old.get("batch_size"), "batch_size")),
            block=_int(old.get("shuffle_buffer"), "shuffle_buffer") if self.train else 1,
            batches=[b for _, b, _, _ in positions],
            pool=pool,
            generation=generation,
            shuffle_shards=self.train,
        )
        if left:
            self.pool, self.generation = left, generation + 1
        else:  # the epoch was read to its end
            self.epoch, self.pool, self.generation = epoch + 1, None, 0
        return True

    def _position(self, state: dict) -> tuple[int, int, Pool | None, int]:
        """(epoch, batches, pool, generation) of a saved state, checked: it
        comes from a file."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        epoch, batches = _int(state.get("epoch"), "epoch"), _int(state.get("batches"), "batches")
        generation = _int(state.get("generation", 0), "generation")
        raw = state.get("pool")
        if raw is None:
            return epoch, batches, None, generation
        total = self.total_samples
        try:
            pool = [(int(a), int(b)) for a, b in raw]
        except (TypeError, ValueError):
            raise ValueError("loader state: pool must be a list of [start, end] pairs") from None
        if any(not 0 <= a < b <= total for a, b in pool) or any(x[1] > y[0] for x, y in zip(pool, pool[1:])):
            raise ValueError(f"loader state: pool intervals must be sorted, disjoint and within 0..{total}")
        if pool_size(pool) == 0:
            raise ValueError("loader state: empty pool")
        return epoch, batches, pool, generation


def _int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"loader state: {name} must be an integer >= 0, got {value!r}")
    return value


def build_loader(
    cfg: DataConfig,
    *,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    tokenizer=None,
    labels: LabelSpec | None = None,
    sizes: dict[str, int] | None = None,
    modalities: tuple[str, ...] | list[str] = MODALITIES,
) -> StreamLoader:
    """sizes: {shard URL: samples} already known (shard_size_table on one
    rank, shared with the others), so not every rank reads every index.
    modalities: the ones the model reads; the others are not decoded (their
    masks are False), but a sample that carries only them still counts as
    having data."""
    return StreamLoader(
        cfg,
        split=split,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        tokenizer=tokenizer,
        labels=labels,
        sizes=sizes,
        modalities=modalities,
    )
