"""Resuming the data position on another topology (world size, workers,
micro batch, shuffle buffer): every sample of the epoch is read exactly once
across the change."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest
from shardkit import text_shards
from test_loader_epochs import _cfg

from data_pipeline import build_loader
from data_pipeline.plan import block_key, epoch_plan, merge, remaining, through_pool
from data_pipeline.stream import block_shuffled


def _consumed(sizes, *, world, workers, batch, block, batches, pool=None, generation=0, epoch=0):
    """Global positions the streams really hand out first: each worker's
    block-shuffled order (the stream's own block_shuffled), cut after its
    share of `batches` rank batches."""
    out: Counter = Counter()
    for rank, worker in itertools.product(range(world), range(workers)):
        plan = epoch_plan(
            sizes, seed=5, epoch=epoch, rank=rank, world_size=world, worker=worker,
            num_workers=workers, batch_size=batch, pool=pool,
        )  # fmt: skip
        count = sum(plan.real)
        key = block_key(seed=5, epoch=epoch, rank=rank, worker=worker, generation=generation)
        order = block_shuffled(lambda p, n=count: iter(range(p, n)), total=count, start=0, block=block, key=key)
        mine = [j for j in plan.batch_ids if j < batches[rank]]
        taken = sum(plan.real[: len(mine)])
        for local in itertools.islice(order, taken):
            ((a, _),) = through_pool(plan.intervals, local, local + 1)
            out[a] += 1
    return out


@pytest.mark.parametrize("sizes", [[7, 0, 13], [5] * 6, [40]])
@pytest.mark.parametrize("world,workers,batch,block", [(2, 2, 3, 4), (3, 1, 4, 1), (1, 3, 2, 5), (4, 2, 2, 3)])
def test_remaining_is_exactly_what_the_streams_have_not_read(sizes, world, workers, batch, block):
    total = sum(sizes)
    nb = epoch_plan(sizes, seed=5, epoch=0, rank=0, world_size=world, worker=0, num_workers=workers,
                    batch_size=batch).num_batches  # fmt: skip
    for k in range(nb + 1):
        read = _consumed(sizes, world=world, workers=workers, batch=batch, block=block, batches=[k] * world)
        assert max(read.values(), default=1) == 1
        left = remaining(sizes, seed=5, epoch=0, world_size=world, num_workers=workers, batch_size=batch,
                         block=block, batches=[k] * world)  # fmt: skip
        unread = {p for a, b in left for p in range(a, b)}
        assert not unread & set(read)
        assert unread | set(read) == set(range(total))
        # A second change of topology, over the pool the first one left.
        if left:
            read2 = _consumed(sizes, world=2, workers=1, batch=3, block=2, batches=[1, 1], pool=left, generation=1)
            left2 = remaining(sizes, seed=5, epoch=0, world_size=2, num_workers=1, batch_size=3, block=2,
                              batches=[1, 1], pool=left, generation=1)  # fmt: skip
            unread2 = {p for a, b in left2 for p in range(a, b)}
            assert set(read2) <= unread and not unread2 & set(read2)
            assert unread2 | set(read2) == unread


def test_merge_joins_touching_and_drops_empty():
    assert merge([(5, 6), (0, 2), (2, 4), (7, 7), (6, 9)]) == [(0, 4), (5, 9)]


def _read_epoch(loader, it, epoch: int, limit: int | None = None) -> list[str]:
    """Keys of the batches `it` hands out while the loader is in `epoch`
    (at most `limit` batches); the first batch of the next epoch is dropped."""
    keys = []
    for n in itertools.count():
        if limit is not None and n == limit:
            break
        batch = next(it)
        if loader.epoch != epoch:
            break
        keys += [k for k in batch["__key__"] if k]
    return keys


def _states(loaders) -> list[dict]:
    return [json.loads(json.dumps(lo.state_dict())) for lo in loaders]  # through JSON, as on disk


def test_two_ranks_then_one_then_three_read_the_epoch_exactly_once(tmp_path):
    keys = text_shards(tmp_path, [37, 5, 61, 12, 1, 29])  # 145 samples
    seen: Counter = Counter()
    # 2 ranks, 2 workers each, micro batch 8, 3 batches per rank.
    first = [
        build_loader(_cfg(tmp_path, num_workers=2), split="train", batch_size=8, rank=r, world_size=2) for r in (0, 1)
    ]
    for lo in first:
        seen.update(_read_epoch(lo, iter(lo), 0, limit=3))
    # 1 rank, no workers, micro batch 5, another shuffle buffer: 4 batches.
    one = build_loader(_cfg(tmp_path, shuffle_buffer=3), split="train", batch_size=5)
    assert one.resume(_states(first)) is True
    assert (one.epoch, one.batches, one.generation) == (0, 0, 1)
    seen.update(_read_epoch(one, iter(one), 0, limit=4))
    # 3 ranks with one worker each read the rest of the epoch.
    three = [
        build_loader(_cfg(tmp_path, num_workers=1), split="train", batch_size=8, rank=r, world_size=3) for r in range(3)
    ]
    for lo in three:
        assert lo.resume(_states([one])) is True
        assert lo.generation == 2
        seen.update(_read_epoch(lo, iter(lo), 0))
    assert seen == Counter(keys), "every sample of epoch 0 exactly once"
    # Epoch 1 is a whole fresh epoch on the new topology.
    assert all(lo.epoch == 1 and lo.pool is None and lo.generation == 0 for lo in three)


def test_same_setup_resumes_exactly_and_epoch_end_moves_on(tmp_path):
    text_shards(tmp_path, [30, 30])
    cfg = _cfg(tmp_path)
    a = build_loader(cfg, split="train", batch_size=8)
    it = iter(a)
    for _ in range(3):
        next(it)
    b = build_loader(cfg, split="train", batch_size=8)
    assert b.resume(_states([a])) is False and (b.epoch, b.batches) == (0, 3)
    assert next(iter(b))["__key__"] == next(it)["__key__"]
    # An epoch read to its end (8 batches of 8 for 60 samples), resumed on 2 ranks: epoch 1 from its start.
    for _ in range(4):
        next(it)
    assert (a.epoch, a.batches) == (0, 8)
    two = build_loader(cfg, split="train", batch_size=4, rank=1, world_size=2)
    assert two.resume(_states([a])) is True and (two.epoch, two.batches, two.pool) == (1, 0, None)


def test_resampled_mode_continues_with_fresh_streams(tmp_path):
    text_shards(tmp_path, [30, 30])
    cfg = _cfg(tmp_path, mode="resampled")
    a = build_loader(cfg, split="train", batch_size=8)
    it = iter(a)
    before = [next(it)["__key__"] for _ in range(2)]
    two = build_loader(cfg, split="train", batch_size=8, rank=0, world_size=2)
    assert two.resume(_states([a])) is True and two.generation == 1
    after = next(iter(two))["__key__"]
    assert len(after) == 8 and after not in before


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s: s["fingerprint"].update(seed=99), "seed changed"),
        (lambda s: s["fingerprint"].update(shards="0" * 16), "shards changed"),
        (lambda s: s.update(pool=[[0, 10**9]]), "within 0..60"),
        (lambda s: s.update(pool=[[5, 9], [7, 12]]), "sorted, disjoint"),
        (lambda s: s.update(pool="x"), "pairs"),
        (lambda s: s.update(batches=-1), "batches must be an integer"),
        (lambda s: s["fingerprint"].update(world_size=3), "not ranks 0..0"),
    ],
)
def test_a_bad_or_foreign_state_is_a_clear_error(tmp_path, change, match):
    text_shards(tmp_path, [30, 30])
    a = build_loader(_cfg(tmp_path), split="train", batch_size=8)
    (state,) = _states([a])
    change(state)
    other = build_loader(_cfg(tmp_path, num_workers=1), split="train", batch_size=8)
    with pytest.raises(ValueError, match=match):
        other.resume([state])
