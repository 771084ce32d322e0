"""train.predict's reader (data_pipeline.shardwise): shards cut into pieces
only when there are few per worker, and one set of workers reading every
shard with each shard's samples in order."""

from __future__ import annotations

from test_predict import classifier_export as classifier_export  # noqa: F401 (a fixture)
from test_predict import corpus as corpus  # noqa: F401 (a fixture)
from test_predict import read_rows


def test_shards_are_cut_into_pieces_only_when_there_are_few_per_worker():
    from data_pipeline.shardwise import ShardPiece, shard_pieces

    def pieces(shards, workers, sizes=None):
        return shard_pieces(shards, sizes or [1000] * 10, workers=workers, batch_size=64)

    assert pieces([3, 5, 7], 1) == [ShardPiece(3), ShardPiece(5), ShardPiece(7)]
    assert pieces([4], 0) == [ShardPiece(4)]
    assert pieces(list(range(8)), 2) == [ShardPiece(i) for i in range(8)]
    assert pieces(list(range(5)), 2) == [ShardPiece(i, k, 2) for i in range(5) for k in range(2)]
    assert pieces([3, 5], 3) == [ShardPiece(s, k, 3) for s in (3, 5) for k in range(3)]
    assert pieces([], 4) == []
    # Never pieces of under a batch: each would be a padded batch of its own.
    assert pieces([0, 1], 4, sizes=[130, 63]) == [ShardPiece(0, 0, 2), ShardPiece(0, 1, 2), ShardPiece(1)]


def test_one_worker_set_reads_all_shards_and_pieces_keep_sample_order(
    classifier_export, corpus, demo_shards, tmp_path, monkeypatch
):
    """A rank's shards go through one set of data workers (not one set per
    shard), and a shard cut into pieces for more workers than shards
    yields its rows in the same order as one in-process reader."""
    import os

    import data_pipeline.loader as loader_module
    from train.predict import PredictArgs, predict

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    started = tmp_path / "started"
    started.mkdir()
    quiet = loader_module.ignore_stop_signals

    def count_start(worker_id):
        quiet(worker_id)
        (started / f"{os.getpid()}-{worker_id}").touch()

    monkeypatch.setattr(loader_module, "ignore_stop_signals", count_start)
    common = {"checkpoint": str(classifier_export), "batch_size": 16}
    summary = predict(
        PredictArgs(**common, shards=str(corpus["root"]), out=str(tmp_path / "all")), ["data.num_workers=1"]
    )
    assert len(summary["shards"]) == 5 and summary["rows"] == len(corpus["keys"] - corpus["bad"])
    assert len(list(started.iterdir())) == 1, "a worker set per shard"

    heldout = str(demo_shards["heldout"])
    predict(PredictArgs(**common, shards=heldout, out=str(tmp_path / "here")), ["data.num_workers=0"])
    predict(PredictArgs(**common, shards=heldout, out=str(tmp_path / "pieces")), ["data.num_workers=3"])
    here, pieces = read_rows(tmp_path / "here"), read_rows(tmp_path / "pieces")
    assert [r["key"] for r in pieces] == [r["key"] for r in here] and len(here) == 64
    assert [r["label"] for r in pieces] == [r["label"] for r in here]
