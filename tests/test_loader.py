"""The streaming loader: batch contract, masks, splitting, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from data_pipeline import ByteTokenizer, DataConfig, build_loader, collate
from data_pipeline.sources import expand_shards


def _cfg(shards, **kw) -> DataConfig:
    base = dict(
        train=str(shards["train"]),
        heldout=str(shards["heldout"]),
        num_workers=0,
        shuffle_buffer=16,
        image_size=32,
        n_mels=32,
        audio_frames=48,
        max_text_len=48,
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


def _heldout_keys(cfg) -> tuple[list[str], dict]:
    loader = build_loader(cfg, split="heldout", batch_size=16)
    keys = [k for b in loader for k in b["__key__"] if k]
    return keys, dict(loader.skipped)


def test_a_file_named_like_a_pipe_url_is_read_as_a_file(demo_shards, tmp_path, monkeypatch):
    """A shard called "pipe:touch PWNED;.tar", matched by a relative glob,
    is data: reading it runs nothing, even with data.allow_pipe=true."""
    import shutil

    [shard] = sorted(demo_shards["heldout"].glob("*.tar"))
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(shard, folder / "a-000000.tar")
    shutil.copy(shard, folder / "pipe:touch PWNED;.tar")
    monkeypatch.chdir(folder)
    for allow_pipe in (False, True):
        urls = expand_shards("*.tar", allow_pipe=allow_pipe)
        assert all(not u.startswith("pipe:") for u in urls) and len(urls) == 2
        keys, skipped = _heldout_keys(_cfg(demo_shards, heldout="*.tar", allow_pipe=allow_pipe))
        assert len(keys) == 128 and not skipped
        assert not (folder / "PWNED").exists()


def test_a_failing_pipe_command_is_a_counted_error_not_a_short_shard(demo_shards, tmp_path):
    [shard] = sorted(demo_shards["heldout"].glob("*.tar"))
    keys, skipped = _heldout_keys(_cfg(demo_shards, heldout=f"pipe:cat {shard}", allow_pipe=True))
    assert len(keys) == 64 and not skipped
    # A command that dies half-way through its shard: what it sent is read, the rest is counted as pipe_failed.
    half = tmp_path / "half.sh"
    half.write_text(f"head -c 300000 {shard}; echo 'connection reset' >&2; exit 3\n")
    from data_pipeline.sources import PipeFailed, open_url, read_shard

    items = list(read_shard(f"pipe:sh {half}", size=64))
    reasons = {i.reason for i in items if not isinstance(i, dict)}
    assert reasons == {"pipe_failed"}, reasons
    assert any("status 3" in i.detail and "connection reset" in i.detail for i in items if not isinstance(i, dict))
    with pytest.raises(PipeFailed, match="status 1"):
        with open_url("pipe:cat /nonexistent/shard.tar") as f:
            f.read()


def test_an_oversized_member_is_a_counted_skip_never_read(tmp_path):
    from shardkit import jpeg, write_tar

    samples = [{"__key__": f"s{i}", "jpg": jpeg(i, size=32), "txt": f"caption {i}".encode()} for i in range(6)]
    samples[2]["txt"] = b"x" * 300_000  # 300 kB of caption
    root = tmp_path / "shards"
    root.mkdir()
    write_tar(root / "a-000000.tar", samples)
    cfg = DataConfig(train=str(root), heldout=str(root), num_workers=0, image_size=32, max_member_bytes=100_000)
    keys, skipped = _heldout_keys(cfg)
    assert sorted(keys) == ["s0", "s1", "s3", "s4", "s5"] and skipped == {"oversized_member": 1}
    keys, skipped = _heldout_keys(DataConfig(**{**cfg.__dict__, "max_member_bytes": 1 << 20}))
    assert len(keys) == 6 and not skipped


def test_only_the_audio_and_text_a_sample_uses_are_decoded(monkeypatch):
    import io

    import miniaudio
    import numpy as np
    import soundfile

    from data_pipeline.decode import decode_audio
    from data_pipeline.stream import decode_caption

    cfg = DataConfig(sample_rate=16000, n_mels=32, audio_frames=48, hop_length=320)
    rng = np.random.default_rng(0)
    # A long FLAC or WAV is not decoded whole by miniaudio: soundfile reads
    # about 0.96 s of a 60 s file, of any format, never all of it.
    for rate, fmt in ((16000, "FLAC"), (22050, "FLAC"), (22050, "WAV"), (22050, "OGG")):
        long = rng.normal(0, 0.1, rate * 60).astype(np.float32)  # a minute; the model uses 0.96 s
        whole, head = io.BytesIO(), io.BytesIO()
        soundfile.write(whole, long, rate, format=fmt)
        soundfile.write(head, long[: rate * 2], rate, format=fmt)
        read = soundfile.SoundFile.read
        frames_read = []

        def spy(self, frames=-1, *args, read=read, frames_read=frames_read, **kwargs):  # the real read, recorded
            out = read(self, frames, *args, **kwargs)
            frames_read.append(len(out))
            return out

        def whole_decode(*args, **kwargs):
            raise AssertionError("miniaudio decoded a long file")

        monkeypatch.setattr(soundfile.SoundFile, "read", spy)
        monkeypatch.setattr(miniaudio, "stream_memory", whole_decode)
        got = decode_audio(whole.getvalue(), cfg)
        monkeypatch.undo()
        assert 0 < sum(frames_read) <= rate, (fmt, frames_read)  # about 0.96 s of a 60 s file
        if fmt != "OGG":  # lossless: the start of the long file is the short file
            torch.testing.assert_close(got, decode_audio(head.getvalue(), cfg), atol=1e-4, rtol=0)
    huge = ("ünïcödé " * 2_000_000).encode()  # 22 MB of caption
    caption = decode_caption(huge, max_tokens=48)
    assert 0 < len(caption.encode()) <= 4096
    with pytest.raises(UnicodeDecodeError):
        decode_caption(b"bad \xff byte", max_tokens=48)


@pytest.mark.parametrize("image_size", [32, 24])  # the demo's 64² JPEGs: draft-decoded to size, or resized too
def test_a_batch_finished_at_once_equals_samples_decoded_one_by_one(demo_shards, image_size):
    """The loader's workers leave images as uint8 and audio as waveforms,
    and collate() scales and takes log-mels for the batch at once; the rows
    equal decode_image and decode_audio sample by sample, each in its own
    row, with samples lacking a modality in between."""
    from data_pipeline.decode import AUDIO_EXTS, IMAGE_EXTS, decode_audio, decode_image, first_present
    from data_pipeline.sources import expand_shards, read_shard, shard_sizes

    cfg = _cfg(demo_shards, image_size=image_size)
    (batch,) = build_loader(cfg, split="heldout", batch_size=64)
    (url,) = expand_shards(cfg.heldout)
    raw = {s["__key__"]: s for s in read_shard(url, size=shard_sizes([url])[0])}
    assert not batch["image_mask"].all() and not batch["audio_mask"].all()  # rows without them in between
    for i, key in enumerate(batch["__key__"]):
        image, audio = first_present(raw[key], IMAGE_EXTS), first_present(raw[key], AUDIO_EXTS)
        assert bool(batch["image_mask"][i]) == (image is not None)
        assert bool(batch["audio_mask"][i]) == (audio is not None)
        if image is None:
            assert torch.count_nonzero(batch["image"][i]) == 0
        else:
            torch.testing.assert_close(batch["image"][i], decode_image(image, size=image_size), atol=0, rtol=0)
        if audio is None:
            assert torch.count_nonzero(batch["audio"][i]) == 0
        else:
            torch.testing.assert_close(batch["audio"][i], decode_audio(audio, cfg), atol=1e-5, rtol=0)


def test_a_loader_decodes_only_the_modalities_its_model_reads(demo_shards, monkeypatch):
    """A classifier over image and text never decodes audio; a sample that
    carries only audio is still a row (every mask False), not a skip."""
    import data_pipeline.stream as stream

    cfg = _cfg(demo_shards)
    full = list(build_loader(cfg, split="heldout", batch_size=24))
    calls = []
    real = stream.audio_wave
    monkeypatch.setattr(stream, "audio_wave", lambda *a, **k: calls.append(1) or real(*a, **k))
    loader = build_loader(cfg, split="heldout", batch_size=24, modalities=("text", "image"))
    part = list(loader)
    assert not calls
    assert [b["__key__"] for b in part] == [b["__key__"] for b in full] and not loader.skipped
    for b, f in zip(part, full):
        assert not b["audio_mask"].any() and torch.count_nonzero(b["audio"]) == 0
        for key in ("image", "image_mask", "text", "text_pad", "text_mask", "label"):
            assert torch.equal(b[key], f[key]), key
    # data.require still means "the sample carries it", decoded or not.
    with_audio = build_loader(_cfg(demo_shards, require=["audio"]), split="heldout", batch_size=24)
    narrowed = build_loader(_cfg(demo_shards, require=["audio"]), split="heldout", batch_size=24, modalities=("image",))
    assert [b["__key__"] for b in narrowed] == [b["__key__"] for b in with_audio]
    with pytest.raises(ValueError, match="non-empty subset"):
        build_loader(cfg, split="heldout", batch_size=24, modalities=("smell",))


def test_image_pixels_keep_each_pixel_and_channel_in_place():
    """Lossless images of known pixels: at their own size they come back
    exactly, channels first; grey becomes three equal channels; a wide image
    is resized by its shorter side and centre-cropped."""
    import io

    import numpy as np
    from PIL import Image

    from data_pipeline.decode import decode_image, image_pixels

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    wide = np.zeros((8, 24, 3), dtype=np.uint8)
    wide[:, 8:16] = (10, 200, 30)  # the centre third, the rest black

    def png(array) -> bytes:
        out = io.BytesIO()
        Image.fromarray(array).save(out, "PNG")
        return out.getvalue()

    got = image_pixels(png(rgb), size=16)
    assert got.dtype == torch.uint8 and got.shape == (3, 16, 16)
    assert torch.equal(got, torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(image_pixels(png(grey), size=16), torch.from_numpy(grey).expand(3, 16, 16))
    centre = image_pixels(png(wide), size=8)
    assert torch.equal(centre, torch.tensor([10, 200, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8))
    scaled = decode_image(png(rgb), size=16)
    torch.testing.assert_close(scaled, torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1)


def test_collate_fits_a_callers_own_waveform():
    """A waveform handed to collate() that is not audio_wave's (another
    length, float64) is cropped or padded first: its row equals the
    single-clip log-mel."""
    import numpy as np

    from data_pipeline.decode import log_mel

    cfg = DataConfig(sample_rate=16000, n_fft=512, n_mels=32, audio_frames=48, hop_length=320)
    rng = np.random.default_rng(2)
    short, long = rng.normal(0, 0.1, 9000), rng.normal(0, 0.1, 40000)  # float64
    batch = collate(
        [
            {"__key__": k, "image": None, "audio": torch.from_numpy(w), "text": None}
            for k, w in (("s", short), ("l", long))
        ],
        cfg=cfg,
    )
    for row, wav in zip(batch["audio"], (short, long)):
        torch.testing.assert_close(row, log_mel(wav, cfg), atol=1e-5, rtol=0)
