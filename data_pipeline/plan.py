"""Pure arithmetic that places every sample of an epoch on one rank, worker
and batch, so that every sample is read exactly once and every rank gets the
same number of batches.

The epoch's global order is the shards in a seeded permutation, each read
front to back. Rank r takes a contiguous slice of that order (slices differ
by at most one sample). Its nb batches (nb is the same on every rank) get
near-equal numbers of real samples, topped up with padding rows to the batch
size, and batch j comes from worker j % num_workers, which matches the
round-robin order in which a torch DataLoader returns worker output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """Samples [skip, skip + take) of shard `shard` (an index into the URL list)."""

    shard: int
    skip: int
    take: int


def shard_order(n_shards: int, *, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch]).permutation(n_shards).tolist()


def batches_per_rank(total: int, *, world_size: int, batch_size: int) -> int:
    return math.ceil(total / (world_size * batch_size)) if total > 0 else 0


def rank_slice(total: int, *, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous share of `total` samples."""
    return rank * total // world_size, (rank + 1) * total // world_size


def real_per_batch(n_samples: int, n_batches: int) -> list[int]:
    """Spreads n_samples over n_batches as evenly as possible."""
    if n_batches == 0:
        return []
    q, r = divmod(n_samples, n_batches)
    return [q + (j < r) for j in range(n_batches)]


def worker_batches(n_batches: int, *, worker: int, num_workers: int) -> list[int]:
    return list(range(worker, n_batches, num_workers))


def segments(sizes: list[int], order: list[int], start: int, end: int) -> list[Segment]:
    """The pieces of shards that cover positions [start, end) of the global
    order in which shards `order` are laid end to end."""
    out: list[Segment] = []
    offset = 0
    for shard in order:
        size = sizes[shard]
        lo, hi = max(start, offset), min(end, offset + size)
        if lo < hi:
            out.append(Segment(shard, lo - offset, hi - lo))
        offset += size
        if offset >= end:
            break
    return out


@dataclass(frozen=True)
class WorkerPlan:
    """What one (rank, worker) reads in one epoch."""

    batch_ids: list[int]  # indices of this worker's batches among the rank's
    real: list[int]  # real samples in each of those batches
    segments: list[Segment]  # where those samples live, in order
    num_batches: int  # batches on the rank (all workers)


def epoch_plan(
    sizes: list[int],
    *,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    shuffle_shards: bool = True,
) -> WorkerPlan:
    total = sum(sizes)
    order = shard_order(len(sizes), seed=seed, epoch=epoch) if shuffle_shards else list(range(len(sizes)))
    nb = batches_per_rank(total, world_size=world_size, batch_size=batch_size)
    start, end = rank_slice(total, rank=rank, world_size=world_size)
    real = real_per_batch(end - start, nb)
    ids = worker_batches(nb, worker=worker, num_workers=num_workers)
    # Worker w's samples follow those of workers 0..w-1 within the rank's slice.
    before = sum(real[j] for j in range(nb) if j % num_workers < worker)
    mine = sum(real[j] for j in ids)
    return WorkerPlan(
        batch_ids=ids,
        real=[real[j] for j in ids],
        segments=segments(sizes, order, start + before, start + before + mine),
        num_batches=nb,
    )


def consumed_by_worker(batches: int, *, worker: int, num_workers: int) -> int:
    """How many of worker's batches are among the rank's first `batches`."""
    return len(range(worker, batches, num_workers))
