"""Shard writing: every key and every byte survives write -> read."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from shardkit import read_tars

from data_pipeline.__main__ import main as cli
from data_pipeline.writer import INDEX_NAME


def _make_raw(root: Path, n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        row = {"key": f"s{i:03d}", "text": f"caption number {i} ünïcode", "label": i % 3}
        if i % 4 != 1:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG" if i % 2 else "JPEG")
            path = root / f"img{i}.{'png' if i % 2 else 'jpg'}"
            path.write_bytes(buf.getvalue())
            row["image"] = path.name
        if i % 4 != 2:
            path = root / f"snd{i}.flac"
            soundfile.write(path, rng.normal(0, 0.1, 800).astype(np.float32), 8000)
            row["audio"] = path.name
        rows.append(row)
    return rows


def _check_round_trip(rows: list[dict], raw: Path, out: Path) -> None:
    got = read_tars(out)
    assert sorted(got) == sorted(r["key"] for r in rows)
    for r in rows:
        members = got[r["key"]]
        assert members["txt"] == r["text"].encode("utf-8")
        assert json.loads(members["json"]) == {"label": int(r["label"])}
        for field, exts in (("image", {"jpg", "png"}), ("audio", {"flac"})):
            if field in r:
                ext = r[field].rsplit(".", 1)[1]
                assert members[ext] == (raw / r[field]).read_bytes()
            else:
                assert not exts & set(members)


def test_jsonl_round_trip_keeps_every_key_and_byte(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = _make_raw(raw, 10)
    (raw / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["write", str(raw / "m.jsonl"), str(tmp_path / "out"), "--max-samples", "3"]) == 0
    assert len(list((tmp_path / "out").glob("shard-*.tar"))) == 4
    _check_round_trip(rows, raw, tmp_path / "out")
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert index["samples"] == 10
    assert [s["samples"] for s in index["shards"]] == [3, 3, 3, 1]
    assert sum(s["image"] for s in index["shards"]) == sum("image" in r for r in rows)
    assert sum(s["audio"] for s in index["shards"]) == sum("audio" in r for r in rows)


def test_csv_manifest_round_trip(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = _make_raw(raw, 6)
    with open(raw / "m.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["key", "image", "audio", "text", "label"])
        w.writeheader()
        w.writerows(rows)
    assert cli(["write", str(raw / "m.csv"), str(tmp_path / "out")]) == 0
    got = read_tars(tmp_path / "out")
    # CSV cells are strings: extra fields arrive in .json as written.
    assert json.loads(got["s000"]["json"]) == {"label": "0"}
    assert got["s003"]["flac"] == (raw / "snd3.flac").read_bytes()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _flac(frames: int, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(frames, np.float32), rate, format="FLAC")
    return buf.getvalue()


def test_directory_of_stems_round_trip(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("first")
    (raw / "a.flac").write_bytes(_flac(400))
    (raw / "b.png").write_bytes(_png(8, 6))
    (raw / "b.json").write_text('{"label": 2}')
    (raw / "notes.md").write_text("not a sample")
    assert cli(["write", str(raw), str(tmp_path / "out")]) == 0
    got = read_tars(tmp_path / "out")
    assert got == {
        "a": {"txt": b"first", "flac": (raw / "a.flac").read_bytes(), "json": b"{}"},
        "b": {"png": (raw / "b.png").read_bytes(), "json": b'{"label": 2}'},
    }


def test_missing_file_is_rejected_and_the_rest_written(tmp_path, capsys):
    (tmp_path / "ok.png").write_bytes(_png(4, 4))
    rows = [{"key": "gone", "image": "nope.jpg", "text": "x"}, {"key": "ok", "image": "ok.png", "text": "y"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli(["write", str(tmp_path / "m.jsonl"), str(tmp_path / "out")]) == 0
    assert sorted(read_tars(tmp_path / "out")) == ["ok"]
    (reject,) = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert reject["key"] == "gone" and reject["reason"] == "missing_file"
    assert "nope.jpg" in reject["detail"] and reject["source"].endswith("m.jsonl:1")
    assert "rejected 1 (missing_file 1)" in capsys.readouterr().out


def test_every_sample_rejected_exits_2_naming_the_rejects(tmp_path, capsys):
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "nope.jpg", "text": "x"}) + "\n")
    assert cli(["write", str(tmp_path / "m.jsonl"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "all 1 samples" in err and "missing_file 1" in err and "rejects.jsonl" in err
    assert "nope.jpg" in (tmp_path / "out" / "rejects.jsonl").read_text()
    assert not list((tmp_path / "out").glob("*.tar"))


def test_unknown_input_kind_is_a_clear_error(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="manifest"):
        cli(["write", str(tmp_path / "m.parquet"), str(tmp_path / "out")])
