"""Pure arithmetic that places every sample of an epoch on one rank, worker
and batch, so that every sample is read exactly once and every rank gets the
same number of batches.

The epoch's global order is the shards in a seeded permutation, each read
front to back. Rank r takes a contiguous slice of that order (slices differ
by at most one sample). Its nb batches (nb is the same on every rank) get
near-equal numbers of real samples, topped up with padding rows to the batch
size, and batch j comes from worker j % num_workers, which matches the
round-robin order in which a torch DataLoader returns worker output.

The global order depends only on the seed, the epoch and the shards, never
on the world size, the worker count or the batch size. That is what lets a
run resume on another topology: `remaining` turns the positions that W ranks
have consumed into a pool (the epoch's unread positions, as intervals of the
global order), and the new topology's plan is laid over that pool exactly as
a fresh epoch's is laid over [0, total).
"""

from __future__ import annotations

import bisect
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


Pool = list[tuple[int, int]]  # sorted, disjoint [start, end) intervals of the global order


def pool_size(pool: Pool) -> int:
    return sum(b - a for a, b in pool)


def through_pool(pool: Pool, start: int, end: int) -> Pool:
    """The global intervals that positions [start, end) of the pool (its
    intervals laid end to end) denote."""
    out: Pool = []
    offset = 0
    for a, b in pool:
        n = b - a
        lo, hi = max(start, offset), min(end, offset + n)
        if lo < hi:
            out.append((a + lo - offset, a + hi - offset))
        offset += n
        if offset >= end:
            break
    return out


def merge(intervals: list[tuple[int, int]]) -> Pool:
    out: Pool = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def block_key(*, seed: int, epoch: int, rank: int, worker: int, generation: int = 0) -> list[int]:
    """The seed of a worker's block shuffle (block b adds [b]). Generation g > 0
    marks the g-th plan laid over a pool within one epoch (after a resume on
    another topology), so its shuffles are fresh; 0 keeps the original keys."""
    key = [seed, epoch, rank, worker]
    return [*key, generation] if generation else key


def block_permutation(key: list[int], block: int, n: int) -> np.ndarray:
    return np.random.default_rng([*key, block]).permutation(n)


def segments(sizes: list[int], order: list[int], start: int, end: int) -> list[Segment]:
    """The pieces of shards that cover positions [start, end) of the global
    order in which shards `order` are laid end to end."""
    return _Layout(sizes, order).segments([(start, end)])


class _Layout:
    """Shards `order` laid end to end; maps global intervals to shard pieces
    by bisection (a pool after a resume can hold many small intervals)."""

    def __init__(self, sizes: list[int], order: list[int]):
        self.sizes, self.order = sizes, order
        self.starts = np.cumsum([0] + [sizes[s] for s in order]).tolist()

    def segments(self, intervals: list[tuple[int, int]]) -> list[Segment]:
        out: list[Segment] = []
        for start, end in intervals:
            i = max(0, bisect.bisect_right(self.starts, start) - 1)
            while i < len(self.order) and self.starts[i] < end:
                lo, hi = max(start, self.starts[i]), min(end, self.starts[i + 1])
                if lo < hi:
                    out.append(Segment(self.order[i], lo - self.starts[i], hi - lo))
                i += 1
        return out


@dataclass(frozen=True)
class WorkerPlan:
    """What one (rank, worker) reads in one epoch."""

    batch_ids: list[int]  # indices of this worker's batches among the rank's
    real: list[int]  # real samples in each of those batches
    segments: list[Segment]  # where those samples live, in order
    num_batches: int  # batches on the rank (all workers)
    intervals: Pool  # the same samples as intervals of the global order


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
    pool: Pool | None = None,
) -> WorkerPlan:
    """pool: the positions of the epoch still to read (None: all of them)."""
    pool = [(0, sum(sizes))] if pool is None else pool
    total = pool_size(pool)
    order = shard_order(len(sizes), seed=seed, epoch=epoch) if shuffle_shards else list(range(len(sizes)))
    nb = batches_per_rank(total, world_size=world_size, batch_size=batch_size)
    start, end = rank_slice(total, rank=rank, world_size=world_size)
    real = real_per_batch(end - start, nb)
    ids = worker_batches(nb, worker=worker, num_workers=num_workers)
    # Worker w's samples follow those of workers 0..w-1 within the rank's slice.
    before = sum(real[j] for j in range(nb) if j % num_workers < worker)
    mine = sum(real[j] for j in ids)
    intervals = through_pool(pool, start + before, start + before + mine)
    return WorkerPlan(
        batch_ids=ids,
        real=[real[j] for j in ids],
        segments=_Layout(sizes, order).segments(intervals),
        num_batches=nb,
        intervals=intervals,
    )


def consumed_by_worker(batches: int, *, worker: int, num_workers: int) -> int:
    """How many of worker's batches are among the rank's first `batches`."""
    return len(range(worker, batches, num_workers))


def unread(count: int, consumed: int, *, block: int, key: list[int]) -> list[tuple[int, int]]:
    """Positions of a worker's stream of `count` items that the first
    `consumed` items of its block-shuffled order (see stream.block_shuffled)
    leave unread, as [start, end) intervals of the unshuffled stream."""
    if consumed >= count:
        return []
    if block <= 1:
        return [(consumed, count)]
    b = consumed // block
    lo = b * block
    n = min(block, count - lo)
    left = sorted(lo + int(i) for i in block_permutation(key, b, n)[consumed - lo :])
    return merge([(i, i + 1) for i in left] + [(lo + n, count)])


def remaining(
    sizes: list[int],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    block: int,
    batches: list[int],
    pool: Pool | None = None,
    generation: int = 0,
    shuffle_shards: bool = True,
) -> Pool:
    """The epoch's positions not yet read once rank r of `world_size` has
    handed out batches[r] batches of the plan these arguments describe: the
    pool of the plan that continues the epoch on another topology."""
    left: list[tuple[int, int]] = []
    for rank in range(world_size):
        for worker in range(num_workers):
            plan = epoch_plan(
                sizes,
                seed=seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                worker=worker,
                num_workers=num_workers,
                batch_size=batch_size,
                shuffle_shards=shuffle_shards,
                pool=pool,
            )
            done = consumed_by_worker(min(batches[rank], plan.num_batches), worker=worker, num_workers=num_workers)
            key = block_key(seed=seed, epoch=epoch, rank=rank, worker=worker, generation=generation)
            for a, b in unread(sum(plan.real), sum(plan.real[:done]), block=block, key=key):
                left += through_pool(plan.intervals, a, b)
    return merge(left)
