"""The shard writer on real files: rejects, re-encoding, workers, limits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from shardkit import read_tars

from data_pipeline.__main__ import main as cli
from data_pipeline.writer import INDEX_NAME, REJECT_REASONS, REJECTS_NAME


def _image(w: int, h: int, fmt: str, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _sound(frames: int, rate: int, fmt: str = "FLAC", channels: int = 1) -> bytes:
    wav = np.random.default_rng(frames).normal(0, 0.1, (frames, channels)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wav, rate, format=fmt)
    return buf.getvalue()


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / REJECTS_NAME).read_text().splitlines()]


def _manifest(raw: Path, rows: list[dict | str]) -> Path:
    path = raw / "m.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def messy(tmp_path) -> Path:
    """A manifest of 4 good rows with gaps and 6 bad rows; returns its path."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "full.jpg").write_bytes(_image(64, 40, "JPEG"))
    (raw / "full.flac").write_bytes(_sound(1600, 16000))
    (raw / "small.png").write_bytes(_image(8, 6, "PNG"))
    (raw / "other.jpg").write_bytes(_image(20, 30, "JPEG", seed=1))
    (raw / "only.wav").write_bytes(_sound(800, 16000, "WAV", channels=2))
    (raw / "cut.jpg").write_bytes(_image(64, 40, "JPEG")[:1500])  # a truncated real JPEG
    (raw / "noise.flac").write_bytes(np.random.default_rng(0).bytes(2000))
    return _manifest(
        raw,
        [
            {"key": "full", "image": "full.jpg", "audio": "full.flac", "text": "a full row", "label": 1},
            {"key": "no_audio", "image": "small.png", "text": "no audio column"},
            {"key": "no_text", "image": "other.jpg", "audio": "full.flac", "text": ""},
            {"key": "audio_only", "audio": "only.wav"},
            {"key": "missing", "image": "nope.jpg", "text": "its image is gone"},
            {"key": "bad_jpeg", "image": "cut.jpg", "text": "truncated"},
            {"key": "bad_flac", "audio": "noise.flac", "text": "random bytes"},
            {"key": "empty", "text": "  ", "label": 3},
            "{not json",
            {"key": "full", "text": "the same key again"},
        ],
    )


def test_bad_rows_are_rejected_with_reasons_and_good_rows_round_trip(messy, tmp_path):
    out = tmp_path / "out"
    assert cli(["write", str(messy), str(out), "--workers", "0"]) == 0
    raw = messy.parent
    got = read_tars(out)
    assert got == {
        "full": {
            "jpg": (raw / "full.jpg").read_bytes(),
            "flac": (raw / "full.flac").read_bytes(),
            "txt": b"a full row",
            "json": b'{"label": 1}',
        },
        "no_audio": {"png": (raw / "small.png").read_bytes(), "txt": b"no audio column", "json": b"{}"},
        "no_text": {"jpg": (raw / "other.jpg").read_bytes(), "flac": (raw / "full.flac").read_bytes(), "json": b"{}"},
        "audio_only": {"wav": (raw / "only.wav").read_bytes(), "json": b"{}"},
    }
    rejects = _rejects(out)
    assert [(r["key"], r["reason"]) for r in rejects] == [
        ("missing", "missing_file"),
        ("bad_jpeg", "bad_image"),
        ("bad_flac", "bad_audio"),
        ("empty", "empty"),
        ("000000008", "bad_row"),
        ("full", "duplicate_key"),
    ]
    assert {r["reason"] for r in rejects} <= set(REJECT_REASONS)
    assert [r["source"] for r in rejects] == [f"{messy}:{line}" for line in (5, 6, 7, 8, 9, 10)]
    for r, name in zip(rejects, ("nope.jpg", "cut.jpg", "noise.flac")):
        assert name in r["detail"]
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["samples"] == 4 and [s["image"] for s in index["shards"]] == [3]


def test_summary_line_counts_modalities_and_reject_reasons(messy, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["write", str(messy), str(out), "--workers", "0", "--max-samples", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote 4 samples in 2 shards to {out} (image 3, audio 3, text 2); rejected 6 "
        "(bad_audio 1, bad_image 1, bad_row 1, duplicate_key 1, empty 1, missing_file 1), "
        f"listed in {out / REJECTS_NAME}"
    ]


def test_two_workers_write_the_same_bytes_as_one_process(messy, tmp_path):
    rows = [json.loads(line) for line in messy.read_text().splitlines() if line.startswith('{"')]
    # 27 rows: several chunks in flight at once, so order has to be restored.
    _manifest(messy.parent, [{**r, "key": f"{r['key']}_{n}"} for n in range(3) for r in rows])
    outs = {}
    for workers in ("0", "2"):
        outs[workers] = tmp_path / f"out{workers}"
        args = ["write", str(messy), str(outs[workers]), "--workers", workers, "--max-samples", "4"]
        assert cli(args + ["--image-max-side", "16", "--audio-rate", "8000"]) == 0
    files = {w: {p.name: p.read_bytes() for p in sorted(out.iterdir())} for w, out in outs.items()}
    assert len([n for n in files["0"] if n.endswith(".tar")]) == 3
    assert files["2"] == files["0"]


def test_image_max_side_resizes_to_jpeg_and_never_upscales(messy, tmp_path):
    out = tmp_path / "out"
    assert cli(["write", str(messy), str(out), "--workers", "0", "--image-max-side", "16"]) == 0
    got = read_tars(out)
    sizes = {}
    for key in ("full", "no_audio", "no_text"):
        assert "png" not in got[key]
        with Image.open(io.BytesIO(got[key]["jpg"])) as img:
            sizes[key] = (img.format, img.size)
    assert sizes == {"full": ("JPEG", (16, 10)), "no_audio": ("JPEG", (8, 6)), "no_text": ("JPEG", (11, 16))}


def test_jpeg_quality_alone_reencodes_at_full_size(messy, tmp_path):
    out = tmp_path / "out"
    assert cli(["write", str(messy), str(out), "--workers", "0", "--jpeg-quality", "20"]) == 0
    got = read_tars(out)
    with Image.open(io.BytesIO(got["full"]["jpg"])) as img:
        assert img.size == (64, 40)
    assert len(got["full"]["jpg"]) < len((messy.parent / "full.jpg").read_bytes())


def test_audio_rate_resamples_to_mono_flac(messy, tmp_path):
    out = tmp_path / "out"
    assert cli(["write", str(messy), str(out), "--workers", "0", "--audio-rate", "8000"]) == 0
    got = read_tars(out)
    assert "wav" not in got["audio_only"]
    for key, source_frames in (("full", 1600), ("audio_only", 800)):  # 16 kHz sources
        info = soundfile.info(io.BytesIO(got[key]["flac"]))
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 8000, 1)
        assert abs(info.frames - source_frames // 2) <= 2
    assert got["full"]["jpg"] == (messy.parent / "full.jpg").read_bytes()  # images untouched


def test_max_bytes_is_a_hard_limit_per_shard(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(12):
        (raw / f"{i}.jpg").write_bytes(_image(40, 40, "JPEG", seed=i))  # about 2.5 kB each
    manifest = _manifest(raw, [{"key": f"k{i}", "image": f"{i}.jpg"} for i in range(12)])
    out = tmp_path / "out"
    assert cli(["write", str(manifest), str(out), "--workers", "0", "--max-bytes", "20k"]) == 0
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(index["shards"]) >= 2 and index["samples"] == 12
    for shard in index["shards"]:
        assert shard["bytes"] == (out / shard["name"]).stat().st_size <= 20 * 1024
    assert sorted(read_tars(out)) == sorted(f"k{i}" for i in range(12))


def test_rewriting_removes_shards_an_earlier_run_left(messy, tmp_path):
    out = tmp_path / "out"
    assert cli(["write", str(messy), str(out), "--workers", "0", "--max-samples", "1"]) == 0
    assert len(list(out.glob("*.tar"))) == 4
    assert cli(["write", str(messy), str(out), "--workers", "0", "--max-samples", "2"]) == 0
    index = json.loads((out / INDEX_NAME).read_text())
    assert (
        sorted(p.name for p in out.glob("*.tar"))
        == [s["name"] for s in index["shards"]]
        == ["shard-000000.tar", "shard-000001.tar"]
    )


def test_directory_input_rejects_unreadable_text_and_stray_metadata(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.png").write_bytes(_image(4, 4, "PNG"))
    (raw / "latin.txt").write_bytes("café".encode("latin-1"))
    (raw / "lonely.json").write_text('{"label": 1}')
    out = tmp_path / "out"
    assert cli(["write", str(raw), str(out), "--workers", "0"]) == 0
    assert sorted(read_tars(out)) == ["good"]
    assert [(r["key"], r["reason"]) for r in _rejects(out)] == [("latin", "bad_text"), ("lonely", "empty")]


def test_an_extension_the_loader_cannot_read_is_rejected_unless_reencoded(tmp_path):
    (tmp_path / "pic.gif").write_bytes(_image(6, 4, "GIF"))
    manifest = _manifest(tmp_path, [{"key": "g", "image": "pic.gif"}, {"key": "t", "text": "keeps the run alive"}])
    assert cli(["write", str(manifest), str(tmp_path / "kept"), "--workers", "0"]) == 0
    assert [(r["key"], r["reason"]) for r in _rejects(tmp_path / "kept")] == [("g", "unsupported")]
    assert cli(["write", str(manifest), str(tmp_path / "jpeg"), "--workers", "0", "--jpeg-quality", "90"]) == 0
    assert set(read_tars(tmp_path / "jpeg")["g"]) == {"jpg", "json"}


@pytest.mark.parametrize(
    "option, named",
    [
        (["--image-max-side", "0"], "image max side"),
        (["--jpeg-quality", "101"], "JPEG quality"),
        (["--workers", "-1"], "workers"),
    ],
)
def test_bad_options_are_refused_before_writing(messy, tmp_path, capsys, option, named):
    assert cli(["write", str(messy), str(tmp_path / "out"), *option]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
