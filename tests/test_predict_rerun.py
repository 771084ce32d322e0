"""train.predict run again into the same out=: a finished shard is known by
what it is, not by its place in the sorted shard list, and rows of another
model, mode or world size never mix with this run's."""

from __future__ import annotations

import json
import shutil

import pytest
from test_predict import classifier_export as classifier_export  # noqa: F401 (a fixture)
from test_predict import pretrained_export, read_rows


@pytest.fixture
def one_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def predict_main(capsys, *args) -> tuple[int, str]:
    from train.predict import main

    code = main([*args, "data.num_workers=0", "batch_size=32"])
    return code, capsys.readouterr().err.strip()


def test_a_shard_added_to_the_pattern_is_predicted_and_none_twice(demo_shards, tmp_path, capsys, one_rank):
    """Two shards, then a third whose name sorts first: all 192 samples,
    each once (by position, the new shard took the first one's place and
    was never read, while the second one's rows were written twice)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    train = sorted(demo_shards["train"].glob("*.tar"))
    for s in train[1:3]:
        shutil.copy(s, shards / s.name)
    export = pretrained_export(tmp_path / "export" / "model.safetensors", seed=0)
    args = [f"checkpoint={export}", f"shards={shards}", f"out={tmp_path / 'out'}", "--embed"]
    assert predict_main(capsys, *args)[0] == 0
    assert len(read_rows(tmp_path / "out")) == 128
    shutil.copy(train[0], shards / "a-first.tar")
    code, err = predict_main(capsys, *args)
    assert code == 0, err
    keys = [r["key"] for r in read_rows(tmp_path / "out")]
    assert len(keys) == len(set(keys)) == 192
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == 192 and manifest["shards"] == 3


def test_another_checkpoint_or_mode_is_refused_and_overwrite_replaces(
    classifier_export, demo_shards, tmp_path, capsys, one_rank
):
    out = tmp_path / "out"
    first = pretrained_export(tmp_path / "a" / "model.safetensors", seed=0)
    second = pretrained_export(tmp_path / "b" / "model.safetensors", seed=1)
    shards = f"shards={demo_shards['heldout']}"
    assert predict_main(capsys, f"checkpoint={first}", shards, f"out={out}", "--embed")[0] == 0
    before = read_rows(out)

    # Another checkpoint into the same out=: refused in one line, nothing changed.
    code, err = predict_main(capsys, f"checkpoint={second}", shards, f"out={out}", "--embed")
    assert code == 2 and len(err.splitlines()) == 1 and "another run" in err and "overwrite=true" in err, err
    assert read_rows(out) == before
    # A classifier over a retrieval index's out=: refused too.
    code, err = predict_main(capsys, f"checkpoint={classifier_export}", shards, f"out={out}")
    assert code == 2 and "mode 'embed' -> 'classify'" in err, err
    # Other decoding settings: refused, naming the key.
    code, err = predict_main(capsys, f"checkpoint={first}", shards, f"out={out}", "--embed", "data.image_size=48")
    assert code == 2 and "data.image_size 32 -> 48" in err, err

    # overwrite=true: the second model's rows, as a fresh out= gets them, and nothing of the first's.
    code, err = predict_main(capsys, f"checkpoint={second}", shards, f"out={out}", "--embed", "overwrite=true")
    assert code == 0, err
    assert predict_main(capsys, f"checkpoint={second}", shards, f"out={tmp_path / 'fresh'}", "--embed")[0] == 0
    key = lambda r: r["key"]  # noqa: E731
    assert sorted(read_rows(out), key=key) == sorted(read_rows(tmp_path / "fresh"), key=key) != sorted(before, key=key)
    assert len(list((out / "parts").iterdir())) == 1  # the first run's parts are gone


def test_rank_files_of_a_run_with_more_ranks_are_removed(demo_shards, tmp_path, capsys, one_rank):
    out = tmp_path / "out"
    export = pretrained_export(tmp_path / "export" / "model.safetensors", seed=0)
    args = [f"checkpoint={export}", f"shards={demo_shards['heldout']}", f"out={out}", "--embed"]
    assert predict_main(capsys, *args)[0] == 0
    # As a 2-rank run into the same out= would have left them.
    shutil.copy(out / "predictions-rank0.jsonl", out / "predictions-rank1.jsonl")
    shutil.copy(out / "rank0.summary.json", out / "rank1.summary.json")
    assert predict_main(capsys, *args)[0] == 0
    assert sorted(p.name for p in out.glob("predictions-rank*")) == ["predictions-rank0.jsonl"]
    assert not (out / "rank1.summary.json").exists()
    assert len(read_rows(out)) == 64


def test_an_out_dir_without_a_record_of_its_run_is_refused(demo_shards, tmp_path, capsys, one_rank):
    """Parts named by position, as earlier versions wrote them, say nothing
    of the model that made them."""
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "000000.jsonl").write_text('{"key": "old"}\n')
    (out / "parts" / "000000.done.json").write_text('{"rows": 1, "skipped": {}}\n')
    export = pretrained_export(tmp_path / "export" / "model.safetensors", seed=0)
    args = [f"checkpoint={export}", f"shards={demo_shards['heldout']}", f"out={out}", "--embed"]
    code, err = predict_main(capsys, *args)
    assert code == 2 and "without a record" in err, err
    code, err = predict_main(capsys, *args, "overwrite=true")
    assert code == 0, err
    assert "old" not in {r["key"] for r in read_rows(out)} and not (out / "parts" / "000000.jsonl").exists()
