"""The streaming loader: batch contract, masks, splitting, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline import ByteTokenizer, DataConfig, build_loader
from data_pipeline.sources import expand_shards


def _cfg(shards, **kw) -> DataConfig:
    base = dict(
        train=str(shards["train"]), heldout=str(shards["heldout"]), num_workers=0, shuffle_buffer=16,
        image_size=32, n_mels=32, audio_frames=48, max_text_len=48,
    )
    return DataConfig(**{**base, **kw})


def _manifest(shards, split: str) -> dict[str, dict]:
    rows = [json.loads(l) for l in (shards["raw"] / f"{split}.jsonl").read_text().splitlines()]
    return {r["key"]: r for r in rows}


def test_heldout_batches_follow_the_contract(demo_shards):
    cfg = _cfg(demo_shards)
    rows = _manifest(demo_shards, "heldout")
    batches = list(build_loader(cfg, split="heldout", batch_size=24))
    # 64 samples in 3 batches of 24 rows: real samples spread evenly, the
    # rest padding rows (key "", every mask False).
    assert [len(b["__key__"]) for b in batches] == [24, 24, 24]
    assert [sum(1 for k in b["__key__"] if k) for b in batches] == [22, 21, 21]
    tok = ByteTokenizer()
    for b in batches:
        n = len(b["__key__"])
        assert b["image"].shape == (n, 3, 32, 32) and b["image"].dtype == torch.float32
        assert b["audio"].shape == (n, 32, 48) and b["audio"].dtype == torch.float32
        assert b["text"].shape == (n, 48) and b["text"].dtype == torch.long
        assert b["text_pad"].shape == (n, 48) and b["text_pad"].dtype == torch.bool
        for m in ("image", "audio", "text"):
            assert b[f"{m}_mask"].shape == (n,) and b[f"{m}_mask"].dtype == torch.bool
        for i, key in enumerate(b["__key__"]):
            if not key:
                assert not (b["image_mask"][i] or b["audio_mask"][i] or b["text_mask"][i])
                continue
            row = rows[key]
            assert bool(b["image_mask"][i]) == ("image" in row)
            assert bool(b["audio_mask"][i]) == ("audio" in row)
            assert b["text_mask"][i]
            if "image" not in row:
                assert torch.count_nonzero(b["image"][i]) == 0
            else:
                assert b["image"][i].abs().max() <= 1.0 and b["image"][i].std() > 0
            if "audio" not in row:
                assert torch.count_nonzero(b["audio"][i]) == 0
            # Text: BOS caption EOS, then padding flagged in text_pad.
            length = int((~b["text_pad"][i]).sum())
            assert tok.decode(b["text"][i, :length]) == row["text"]
            assert (b["text"][i, length:] == tok.pad_id).all()
    assert sorted(k for b in batches for k in b["__key__"] if k) == sorted(rows)


def test_some_demo_samples_lack_a_modality(demo_shards):
    rows = _manifest(demo_shards, "train")
    missing = sum("image" not in r or "audio" not in r for r in rows.values())
    assert 0.03 * len(rows) < missing < 0.2 * len(rows)


def test_ranks_read_disjoint_shards(demo_shards):
    """With 4 shards and 2 ranks, the first epoch's samples split without overlap."""
    cfg = _cfg(demo_shards, shuffle_buffer=0)
    keys = []
    for rank in (0, 1):
        it = iter(build_loader(cfg, split="train", batch_size=32, rank=rank, world_size=2))
        keys.append({k for _ in range(4) for k in next(it)["__key__"]})  # 2 shards × 64 samples
    assert len(keys[0]) == len(keys[1]) == 128
    assert not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(_manifest(demo_shards, "train"))


def test_train_stream_is_endless_and_seeded(demo_shards):
    cfg = _cfg(demo_shards)
    first = [next(iter(build_loader(cfg, split="train", batch_size=64)))["__key__"] for _ in range(2)]
    assert first[0] == first[1]
    # Without a shuffle buffer (which mixes across the epoch boundary), two
    # epochs hold every sample exactly twice.
    it = iter(build_loader(_cfg(demo_shards, shuffle_buffer=0), split="train", batch_size=64))
    seen = [k for _ in range(8) for k in next(it)["__key__"]]  # two epochs of 256
    assert len(seen) == 512 and all(seen.count(k) == 2 for k in set(seen)) and len(set(seen)) == 256


def test_pipe_urls_need_opt_in():
    with pytest.raises(ValueError, match="allow_pipe"):
        expand_shards("pipe:curl -s http://127.0.0.1/x.tar")
    assert expand_shards("pipe:cat a.tar", allow_pipe=True) == ["pipe:cat a.tar"]


def test_pattern_matching_nothing_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_shards(str(tmp_path / "nothing-here-{000..003}.tar"))


def test_brace_and_directory_patterns(demo_shards):
    d = demo_shards["train"]
    assert expand_shards(str(d)) == expand_shards(str(d / "shard-{000000..000003}.tar"))
    assert len(expand_shards(f"{d}::{demo_shards['heldout']}")) == 5


@pytest.mark.parametrize("cpus,ranks,want", [(2, 2, 1), (2, 1, 1), (8, 1, 7), (32, 8, 3), (64, 1, 8), (1, 4, 1)])
def test_auto_workers_share_the_cpus_among_local_ranks(monkeypatch, cpus, ranks, want):
    from data_pipeline.config import worker_count

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    assert worker_count("auto", local_ranks=ranks) == want
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(ranks))
    assert worker_count("auto") == want


def test_worker_count_takes_numbers_and_refuses_the_rest():
    from data_pipeline.config import worker_count

    assert worker_count(0) == 0 and worker_count(3) == 3 and worker_count("2") == 2
    for bad in (-1, "many", 1.5, None):
        with pytest.raises(ValueError, match="data.num_workers"):
            worker_count(bad)
