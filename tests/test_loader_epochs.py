"""Epoch and resampled modes, exact resume, bad data, HTTP sources."""

from __future__ import annotations

import functools
import http.server
import io
import json
import socket
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from shardkit import flac, jpeg, png, text_shards, write_tar

from data_pipeline import DataConfig, build_loader
from data_pipeline.config import SourceConfig


def _cfg(train, **kw) -> DataConfig:
    base = dict(
        train=str(train),
        heldout=str(train),
        num_workers=0,
        shuffle_buffer=8,
        image_size=16,
        n_mels=16,
        audio_frames=16,
        hop_length=160,
        n_fft=256,
        max_text_len=32,
    )
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("index", [False, True], ids=["scanned", "indexed"])
def test_exactly_once_across_2_ranks_and_2_workers(tmp_path, index):
    keys = text_shards(tmp_path, [37, 5, 61, 12, 1, 29], index=index)  # 145 samples, uneven shards
    cfg = _cfg(tmp_path, num_workers=2)
    seen: Counter = Counter()
    counts = []
    for rank in (0, 1):
        loader = build_loader(cfg, split="train", batch_size=8, rank=rank, world_size=2)
        it = iter(loader)
        n = loader.batches_per_epoch()
        batches = [next(it) for _ in range(n)]
        assert all(len(b["__key__"]) == 8 for b in batches)  # padded to full size
        seen.update(k for b in batches for k in b["__key__"] if k)
        counts.append(n)
        next(it)
        assert loader.epoch == 1  # the next batch already belongs to epoch 1
    assert counts[0] == counts[1] == 10  # ceil(145 / 16)
    assert seen == Counter(keys)


def test_epochs_reshuffle_but_stay_exact(tmp_path):
    keys = text_shards(tmp_path, [20, 20, 20])
    loader = build_loader(_cfg(tmp_path), split="train", batch_size=10)
    it = iter(loader)
    epochs = [[k for _ in range(6) for k in next(it)["__key__"]] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(keys)
    assert epochs[0] != epochs[1]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["__key__"] == y["__key__"]
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, y[k]), k


def _stop_and_resume(cfg: DataConfig, *, stop_at: int, then: int) -> tuple[dict, list[dict], list[dict]]:
    """Reads stop_at batches, saves the state, resumes a new loader from it
    and reads `then` more. Returns (state, resumed batches, the batches an
    uninterrupted loader gives at the same positions)."""
    straight = iter(build_loader(cfg, split="train", batch_size=8))
    expected = [next(straight) for _ in range(stop_at + then)][stop_at:]
    first = build_loader(cfg, split="train", batch_size=8)
    it = iter(first)
    for _ in range(stop_at):
        next(it)
    state = first.state_dict()
    resumed = build_loader(cfg, split="train", batch_size=8)
    resumed.load_state_dict(state)
    it = iter(resumed)
    return state, [next(it) for _ in range(then)], expected


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_batches_an_uninterrupted_loader_gives(tmp_path, workers):
    text_shards(tmp_path, [70, 90, 40, 100], with_images=True)  # 300 samples: 40 batches of 8 cross an epoch
    state, resumed, expected = _stop_and_resume(_cfg(tmp_path, num_workers=workers), stop_at=40, then=8)
    assert (state["epoch"], state["batches"]) == (1, 2)  # 38 batches per epoch
    _assert_same_batches(resumed, expected)


def test_resume_in_resampled_mode(tmp_path):
    text_shards(tmp_path / "a", [30, 50], prefix="a")
    text_shards(tmp_path / "b", [40], prefix="b")
    cfg = _cfg(
        tmp_path,
        mode="resampled",
        num_workers=2,
        sources=[SourceConfig(str(tmp_path / "a"), 0.5), SourceConfig(str(tmp_path / "b"), 0.5)],
    )
    _, resumed, expected = _stop_and_resume(cfg, stop_at=25, then=6)
    _assert_same_batches(resumed, expected)


def test_resume_refuses_a_changed_setup(tmp_path):
    text_shards(tmp_path, [30, 30])
    loader = build_loader(_cfg(tmp_path), split="train", batch_size=8)
    state = loader.state_dict()
    other = build_loader(_cfg(tmp_path), split="train", batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)


def test_mixing_weights_hold_over_5000_samples(tmp_path):
    text_shards(tmp_path / "a", [100, 100], prefix="a")
    text_shards(tmp_path / "b", [100, 100], prefix="b")
    cfg = _cfg(
        tmp_path,
        mode="resampled",
        num_workers=2,
        shuffle_buffer=64,
        sources=[SourceConfig(str(tmp_path / "a"), 0.8), SourceConfig(str(tmp_path / "b"), 0.2)],
    )
    it = iter(build_loader(cfg, split="train", batch_size=50))
    keys = [k for _ in range(100) for k in next(it)["__key__"]]
    assert len(keys) == 5000
    share = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(share - 0.8) < 0.02


def test_bad_data_is_skipped_counted_and_the_rest_arrives(tmp_path):
    good = text_shards(tmp_path, [20, 20])
    bad = [
        {"__key__": "ok_img", "txt": b"fine", "jpg": jpeg(1)},
        {"__key__": "bad_jpg", "txt": b"x", "jpg": jpeg(2)[:60]},
        {"__key__": "bad_flac", "txt": b"y", "flac": b"fLaC" + b"\x00" * 50},
        {"__key__": "ok_flac", "txt": b"z", "flac": flac(3)},
        {"__key__": "empty_txt", "txt": b"   ", "png": png(4)},
        {"__key__": "no_keys", "cls": b"3"},
        {"__key__": "latin1_txt", "txt": "crème brûlée".encode("latin-1"), "png": png(5)},  # not UTF-8
    ]
    write_tar(tmp_path / "s-000002.tar", bad)
    trunc_samples = [{"__key__": f"t_{j:03d}", "txt": f"cap {j}".encode(), "png": png(j)} for j in range(30)]
    write_tar(tmp_path / "s-000003.tar", trunc_samples)
    data = (tmp_path / "s-000003.tar").read_bytes()
    (tmp_path / "s-000003.tar").write_bytes(data[: len(data) // 2])
    # The index (as `python -m data_pipeline write` leaves it) promises 30
    # samples in the truncated shard, so the lost ones are counted.
    names = {"s-000000.tar": 20, "s-000001.tar": 20, "s-000002.tar": 7, "s-000003.tar": 30}
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": k, "samples": v} for k, v in names.items()]}))

    cfg = _cfg(tmp_path)
    loader = build_loader(cfg, split="heldout", batch_size=16)
    batches = list(loader)
    seen = Counter(k for b in batches for k in b["__key__"] if k)
    survivors = {k for k in seen if k.startswith("t_")}
    assert 0 < len(survivors) < 30
    assert all(seen[k] == 1 for k in seen)
    assert set(good) | {"ok_img", "ok_flac"} | survivors == set(seen)
    skipped = loader.skipped
    assert skipped["bad_image"] == 1 and skipped["bad_audio"] == 1
    assert skipped["empty_text"] == 1 and skipped["no_modalities"] == 1
    assert skipped["bad_text"] == 1  # a caption that is not UTF-8: a counted skip, never a crash
    assert skipped["truncated_shard"] + skipped["short_shard"] == 30 - len(survivors)
    # Surviving samples decode to exactly what was written.
    ok = next(b for b in batches if "ok_img" in b["__key__"])
    assert ok["image_mask"][ok["__key__"].index("ok_img")]


def test_required_modality_filters_and_counts(tmp_path):
    write_tar(
        tmp_path / "s-000000.tar",
        [
            {"__key__": "with", "txt": b"a", "png": png(1)},
            {"__key__": "without", "txt": b"b"},
        ],
    )
    loader = build_loader(_cfg(tmp_path, require=["image"]), split="heldout", batch_size=4)
    keys = [k for b in loader for k in b["__key__"] if k]
    assert keys == ["with"] and loader.skipped == Counter({"missing_image": 1})


def test_too_many_consecutive_errors_stop_naming_the_shard(tmp_path):
    write_tar(
        tmp_path / "broken-000000.tar", [{"__key__": f"k{j}", "txt": b"c", "jpg": b"not a jpeg"} for j in range(10)]
    )
    loader = build_loader(_cfg(tmp_path, max_consecutive_errors=5), split="heldout", batch_size=4)
    with pytest.raises(RuntimeError, match="broken-000000.tar"):
        list(loader)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_source_reads_like_local(tmp_path):
    text_shards(tmp_path, [25, 25, 25], with_images=True, index=True)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/s-{{000000..000002}}.tar"
        remote = build_loader(_cfg(url, num_workers=2), split="train", batch_size=8)
        local = build_loader(_cfg(tmp_path, num_workers=2), split="train", batch_size=8)
        assert remote.batches_per_epoch() == local.batches_per_epoch() == 10
        r, l = iter(remote), iter(local)
        _assert_same_batches([next(r) for _ in range(12)], [next(l) for _ in range(12)])
    finally:
        server.shutdown()


def _encoded(fmt: str, seed: int) -> bytes:
    buf = io.BytesIO()
    if fmt in ("webp", "png", "jpeg"):
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
            buf, fmt.upper()
        )
    else:
        wav = np.random.default_rng(seed).normal(0, 0.1, 8000).astype(np.float32)
        soundfile.write(buf, wav, 22050, format=fmt.upper())
    return buf.getvalue()


def test_shards_from_other_tools_read_without_conversion(tmp_path):
    # img2dataset layout: KEY.jpg|png|webp + KEY.txt + KEY.json.
    write_tar(
        tmp_path / "img-000000.tar",
        [
            {"__key__": "000000000", "jpg": _encoded("jpeg", 1), "txt": b"a cat", "json": b'{"url": "x"}'},
            {"__key__": "000000001", "webp": _encoded("webp", 2), "txt": b"a dog", "json": b"{}"},
            {"__key__": "000000002", "png": _encoded("png", 3), "txt": b"a cow", "json": b"{}"},
        ],
    )
    # Audio-set layout: KEY.flac|wav|ogg + KEY.json, no caption.
    write_tar(
        tmp_path / "aud-000000.tar",
        [
            {"__key__": "clip_a", "wav": _encoded("wav", 4), "json": b'{"label": 1}'},
            {"__key__": "clip_b", "ogg": _encoded("ogg", 5), "json": b'{"label": 2}'},
            {"__key__": "clip_c", "flac": _encoded("flac", 6), "json": b'{"label": 3}'},
        ],
    )
    loader = build_loader(_cfg(tmp_path), split="heldout", batch_size=8)
    (batch,) = list(loader)
    rows = {k: i for i, k in enumerate(batch["__key__"]) if k}
    assert len(rows) == 6 and not loader.skipped
    for key in ("000000000", "000000001", "000000002"):
        assert batch["image_mask"][rows[key]] and batch["text_mask"][rows[key]] and not batch["audio_mask"][rows[key]]
    for key in ("clip_a", "clip_b", "clip_c"):
        i = rows[key]
        assert batch["audio_mask"][i] and not batch["image_mask"][i] and not batch["text_mask"][i]
        assert batch["audio"][i].std() > 0


def test_unindexed_truncated_shard_keeps_its_readable_samples(tmp_path):
    text_shards(tmp_path, [10])
    samples = [{"__key__": f"t_{j:03d}", "txt": f"cap {j}".encode(), "png": png(j, size=64)} for j in range(20)]
    write_tar(tmp_path / "s-000001.tar", samples)
    data = (tmp_path / "s-000001.tar").read_bytes()
    (tmp_path / "s-000001.tar").write_bytes(data[: len(data) // 2])
    loader = build_loader(_cfg(tmp_path), split="heldout", batch_size=8)
    keys = [k for b in loader for k in b["__key__"] if k]
    survivors = [k for k in keys if k.startswith("t_")]
    assert 5 <= len(survivors) < 20 and len(keys) == len(set(keys)) == 10 + len(survivors)


def test_a_good_sample_resets_the_count_of_errors_in_a_row(tmp_path):
    """4 bad, 1 good, 4 bad, 1 good, ...: 16 bad samples in all but never 5
    in a row, so max_consecutive_errors=5 never trips; 5 in a row does."""
    samples = []
    for j in range(20):
        good = j % 5 == 4
        samples.append({"__key__": f"k{j:02d}", "txt": b"c", "jpg": jpeg(j) if good else b"not a jpeg"})
    write_tar(tmp_path / "mixed-000000.tar", samples)
    loader = build_loader(_cfg(tmp_path, max_consecutive_errors=5), split="heldout", batch_size=4)
    keys = [k for b in loader for k in b["__key__"] if k]
    assert keys == ["k04", "k09", "k14", "k19"] and loader.skipped == Counter({"bad_image": 16})
    loader = build_loader(_cfg(tmp_path, max_consecutive_errors=4), split="heldout", batch_size=4)
    with pytest.raises(RuntimeError, match="4 bad samples in a row"):
        list(loader)


class _DroppingHandler(http.server.BaseHTTPRequestHandler):
    """Serves files with Range support; the first request for each .tar sends
    40% of it and then drops the connection."""

    root: Path = Path(".")
    dropped: set = set()
    ranges: list = []

    def do_GET(self):
        path = self.root / self.path.lstrip("/").split("?")[0]
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        if self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            self.ranges.append((path.name, start))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if path.suffix == ".tar" and path.name not in self.dropped:
            self.dropped.add(path.name)
            self.wfile.write(data[: int(len(data) * 0.4)])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


def test_a_dropped_connection_mid_shard_loses_no_sample(tmp_path):
    text_shards(tmp_path, [25, 25, 25], with_images=True, index=True)
    handler = type("Handler", (_DroppingHandler,), {"root": tmp_path, "dropped": set(), "ranges": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/s-{{000000..000002}}.tar"
        remote = build_loader(_cfg(url, num_workers=0), split="heldout", batch_size=8)
        keys = [k for b in remote for k in b["__key__"] if k]
    finally:
        server.shutdown()
    local = build_loader(_cfg(tmp_path, num_workers=0), split="heldout", batch_size=8)
    assert keys == [k for b in local for k in b["__key__"] if k] and len(keys) == 75
    assert not remote.skipped, remote.skipped
    assert handler.dropped == {"s-000000.tar", "s-000001.tar", "s-000002.tar"}
    assert all(start > 0 for _, start in handler.ranges) and len(handler.ranges) == 3  # resumed, not restarted
