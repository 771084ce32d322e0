"""The epoch plan's arithmetic, checked exhaustively on small cases."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from data_pipeline.plan import consumed_by_worker, epoch_plan


@pytest.mark.parametrize("sizes", [[7], [3, 0, 9, 1], [5, 5, 5, 5, 5], [1, 1, 1]])
@pytest.mark.parametrize("world,workers,batch", [(1, 1, 4), (2, 2, 3), (3, 1, 2), (2, 3, 5), (4, 2, 8)])
def test_every_position_is_read_once_and_batch_counts_match(sizes, world, workers, batch):
    read: Counter = Counter()
    counts = []
    for rank, worker in itertools.product(range(world), range(workers)):
        plan = epoch_plan(
            sizes, seed=3, epoch=1, rank=rank, world_size=world, worker=worker, num_workers=workers, batch_size=batch
        )
        assert all(0 <= r <= batch for r in plan.real)
        assert sum(plan.real) == sum(s.take for s in plan.segments)
        for seg in plan.segments:
            read.update((seg.shard, seg.skip + i) for i in range(seg.take))
        counts.append(plan.num_batches)
        assert plan.batch_ids == list(range(worker, plan.num_batches, workers))
    assert len(set(counts)) == 1
    assert read == Counter((s, i) for s, n in enumerate(sizes) for i in range(n))


def test_shard_order_changes_with_epoch_and_seed():
    orders = {
        (seed, epoch): [
            s.shard
            for s in epoch_plan(
                [2] * 8, seed=seed, epoch=epoch, rank=0, world_size=1, worker=0, num_workers=1, batch_size=16
            ).segments
        ]
        for seed in (0, 1)
        for epoch in (0, 1)
    }
    assert len({tuple(o) for o in orders.values()}) == 4


def test_consumed_by_worker_matches_round_robin():
    for batches, workers in itertools.product(range(12), range(1, 4)):
        assert sum(consumed_by_worker(batches, worker=w, num_workers=workers) for w in range(workers)) == batches
