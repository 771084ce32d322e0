"""Raw files or a manifest -> WebDataset tar shards + an index file.

Every image and audio input is decoded once to validate it. By default a shard
member is byte-identical to its source file; EncodeOptions re-encodes images
as JPEG (optionally downsized) and audio as mono FLAC at a new rate. A sample
that cannot be used is skipped and written to OUT/rejects.jsonl as
{"key", "reason", "detail", "source"}: reason is one of REJECT_REASONS, detail
names the bad file or field, source is the manifest line or directory stem.

Samples are prepared in worker processes and written in input order, so the
shards do not depend on the number of workers.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import tarfile
import tempfile
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile
import soxr
import webdataset as wds
from PIL import Image, ImageOps
from tqdm import tqdm

from data_pipeline.decode import AUDIO_EXTS, IMAGE_EXTS
from data_pipeline.manifest import RawSample

INDEX_NAME = "index.json"
REJECTS_NAME = "rejects.jsonl"
REJECT_REASONS = (
    "bad_row",
    "bad_meta",
    "bad_text",
    "empty",
    "missing_file",
    "unreadable",
    "unsupported",
    "bad_image",
    "bad_audio",
    "duplicate_key",
)
DEFAULT_JPEG_QUALITY = 90
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_CHUNK = 8  # samples per task sent to a worker
_MTIME = 0  # fixed member mtime, so equal input gives byte-identical shards


@dataclass(frozen=True)
class EncodeOptions:
    """Re-encoding; all None keeps the source bytes. Images are re-encoded as
    JPEG when either image option is set (quality DEFAULT_JPEG_QUALITY unless
    given); audio as mono FLAC when audio_rate is set."""

    image_max_side: int | None = None
    jpeg_quality: int | None = None
    audio_rate: int | None = None

    def __post_init__(self) -> None:
        if self.image_max_side is not None and self.image_max_side < 1:
            raise ValueError(f"image max side must be at least 1 pixel, got {self.image_max_side}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        if self.audio_rate is not None and not 1 <= self.audio_rate <= 655350:
            raise ValueError(f"audio rate must be in 1..655350 Hz (FLAC's range), got {self.audio_rate}")

    @property
    def reencode_image(self) -> bool:
        return self.image_max_side is not None or self.jpeg_quality is not None


@dataclass
class Prepared:
    key: str
    members: dict[str, bytes]  # extension -> bytes
    source: str


@dataclass
class Reject:
    key: str
    reason: str
    detail: str
    source: str


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _member_ext(p: Path) -> str:
    ext = p.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Rejected("missing_file", f"{path} does not exist") from None
    except OSError as e:
        raise _Rejected("unreadable", f"{path}: {e.strerror or e}") from None


def _decode_error(path: Path, e: Exception) -> str:
    # Decoders name the in-memory buffer by its address; drop it so rejects.jsonl is deterministic.
    return f"{path}: {type(e).__name__}: {_BUFFER_REPR.sub('the file', str(e))}"


def _check_ext(path: Path, known: tuple[str, ...], option: str) -> str:
    ext = _member_ext(path)
    if ext not in known:
        raise _Rejected("unsupported", f"{path}: .{ext} is none of {', '.join(known)}; re-encode it with {option}")
    return ext


def _fit(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """(w, h) scaled so the long side is at most max_side; never larger."""
    w, h = size
    if max_side is None or max(w, h) <= max_side:
        return size
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _encode_jpeg(img: Image.Image, opts: EncodeOptions) -> bytes:
    if opts.image_max_side is not None:
        # JPEG decodes at 1/2, 1/4 or 1/8 scale directly, keeping both sides >= the request.
        img.draft("RGB", (opts.image_max_side, opts.image_max_side))
    img = ImageOps.exif_transpose(img).convert("RGB")
    size = _fit(img.size, opts.image_max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=opts.jpeg_quality or DEFAULT_JPEG_QUALITY)
    return buf.getvalue()


def _image_member(path: Path, opts: EncodeOptions) -> tuple[str, bytes]:
    data = _read(path)
    ext = "jpg" if opts.reencode_image else _check_ext(path, IMAGE_EXTS, "--jpeg-quality")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if opts.reencode_image:
                return ext, _encode_jpeg(img, opts)
            img.load()
            return ext, data
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on corrupt input
        raise _Rejected("bad_image", _decode_error(path, e)) from None


def _encode_flac(wav: np.ndarray, rate: int, out_rate: int) -> bytes:
    """frames×channels float -> mono 16-bit FLAC at out_rate."""
    mono = wav.mean(axis=1)
    if rate != out_rate:
        mono = soxr.resample(mono, rate, out_rate, quality="HQ")
    buf = io.BytesIO()
    soundfile.write(buf, np.clip(mono, -1.0, 1.0), out_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _audio_member(path: Path, opts: EncodeOptions) -> tuple[str, bytes]:
    data = _read(path)
    ext = "flac" if opts.audio_rate else _check_ext(path, AUDIO_EXTS, "--audio-rate")
    try:
        wav, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # LibsndfileError, or TypeError/RuntimeError for an unknown format
        raise _Rejected("bad_audio", _decode_error(path, e)) from None
    if len(wav) == 0:
        raise _Rejected("bad_audio", f"{path}: no audio frames")
    return ext, data if opts.audio_rate is None else _encode_flac(wav, rate, opts.audio_rate)


def _members(sample: RawSample, opts: EncodeOptions) -> dict[str, bytes]:
    if sample.error is not None:
        raise _Rejected(*sample.error)
    if sample.image is None and sample.audio is None and sample.text is None:
        raise _Rejected("empty", "no image, no audio and no text")
    members: dict[str, bytes] = {}
    if sample.image is not None:
        ext, members[ext] = _image_member(sample.image, opts)
    if sample.audio is not None:
        ext, members[ext] = _audio_member(sample.audio, opts)
    if sample.text is not None:
        try:
            members["txt"] = sample.text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from a JSON "\ud800" escape
            raise _Rejected("bad_text", f"text is not valid Unicode: {e}") from None
    members["json"] = json.dumps(sample.meta, sort_keys=True).encode("utf-8")
    return members


def prepare(sample: RawSample, opts: EncodeOptions = EncodeOptions()) -> Prepared | Reject:
    """Reads and decodes one sample's files, re-encoding them if opts ask."""
    try:
        return Prepared(sample.key, _members(sample, opts), sample.source)
    except _Rejected as r:
        return Reject(sample.key, r.reason, r.detail, sample.source)
    except Exception as e:
        raise RuntimeError(f"preparing sample {sample.key!r} ({sample.source}) failed: {e}") from e


def _prepare_chunk(samples: list[RawSample], opts: EncodeOptions) -> list[Prepared | Reject]:
    return [prepare(s, opts) for s in samples]


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus)


def _pool_context() -> multiprocessing.context.BaseContext:
    # Not fork: the caller may hold threads (torch, tqdm) that fork would copy
    # mid-lock. The fork server imports this module once and forks each
    # worker from that clean process, so workers start in milliseconds.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _prepare_all(samples: Iterable[RawSample], opts: EncodeOptions, workers: int) -> Iterator[Prepared | Reject]:
    """prepare() over samples, in input order; with workers > 1 at most
    2 × workers chunks are in flight, so memory stays bounded."""
    if workers <= 1:
        yield from (prepare(s, opts) for s in samples)
        return
    it = iter(samples)
    pending: deque[Future] = deque()
    with ProcessPoolExecutor(workers, mp_context=_pool_context()) as pool:
        while chunk := list(islice(it, _CHUNK)):
            pending.append(pool.submit(_prepare_chunk, chunk, opts))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


# --- writing shards ------------------------------------------------------------


_USER = _GROUP = "data"
_MODE = 0o444


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def _member_bytes(name: str, size: int) -> int:
    """What webdataset's TarWriter adds to the archive for one member."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, _MTIME, _MODE, _USER, _GROUP
    return len(info.tobuf(tarfile.PAX_FORMAT)) + _round_up(size, tarfile.BLOCKSIZE)


def _closed_size(offset: int) -> int:
    # Closing a tar appends two zero blocks and pads to a whole record.
    return _round_up(offset + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


class _ShardSink:
    """PREFIX-%06d.tar shards written by webdataset's ShardWriter, of at most
    max_samples samples and max_bytes bytes (a sample bigger than max_bytes
    gets a shard to itself); each is written as NAME.tmp and renamed when
    complete, so a reader never sees half a shard."""

    def __init__(self, out_dir: Path, prefix: str, max_samples: int, max_bytes: int, publish=None):
        self.max_bytes = max_bytes
        self.publish = publish  # called with each finished shard's path (an upload)
        self.shards: list[dict] = []
        self._file = None
        self._writer = wds.ShardWriter(
            str(out_dir / f"{prefix}-%06d.tar"),
            maxcount=max_samples,
            maxsize=float("inf"),
            opener=self._open,
            post=self._finish,
            verbose=0,
            mtime=_MTIME,
            user=_USER,
            group=_GROUP,
            mode=_MODE,
        )

    def _open(self, name: str):
        self.shards.append(
            {"name": os.path.basename(name), "samples": 0, "bytes": 0, "image": 0, "audio": 0, "text": 0}
        )
        self._file = open(name + ".tmp", "wb")
        return self._file

    def _finish(self, name: str) -> None:
        self._file.close()
        entry = self.shards[-1]
        if entry["samples"] == 0:  # ShardWriter opens a shard before the first sample
            os.unlink(name + ".tmp")
            self.shards.pop()
            return
        os.replace(name + ".tmp", name)
        entry["bytes"] = os.path.getsize(name)
        if self.publish is not None:
            self.publish(Path(name))

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(_member_bytes(f"{key}.{ext}", len(data)) for ext, data in members.items())
        entry = self.shards[-1]
        if entry["samples"] and _closed_size(self._writer.tarstream.tarstream.offset + size) > self.max_bytes:
            self._writer.next_stream()
        self._writer.write({"__key__": key, **members})
        entry = self.shards[-1]
        entry["samples"] += 1
        entry["image"] += any(ext in IMAGE_EXTS for ext in members)
        entry["audio"] += any(ext in AUDIO_EXTS for ext in members)
        entry["text"] += "txt" in members

    def close(self) -> None:
        self._writer.close()


class _LocalDir:
    """Where write_dataset puts its files: a local directory."""

    def __init__(self, path: str | Path):
        self.dir = self.staging = Path(path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = self.dir.name
        self.publish = None  # shards are written in place

    def names(self) -> list[str]:
        return [p.name for p in self.dir.iterdir()]

    def remove(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)

    def put(self, name: str, text: str) -> None:
        """Writes a small file whole (the index: as a tmp file, then renamed)."""
        tmp = self.dir / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.dir / name)

    def close(self) -> None:
        pass


class _ObjectStoreDir:
    """Where write_dataset puts its files: an object-store prefix (s3://,
    gs://, az://). Each shard is written to a local staging directory, then
    uploaded whole (an object appears complete or not at all) and deleted,
    so the staging disk holds one shard at a time."""

    def __init__(self, url: str):
        from data_pipeline.sources import object_store

        self.url = url.rstrip("/")
        self.fs, self.root = object_store(self.url)
        self.name = self.url.rsplit("/", 1)[-1]
        self._tmp = tempfile.TemporaryDirectory(prefix="mm-shards-")
        self.staging = Path(self._tmp.name)

    def publish(self, local: Path) -> None:
        self.fs.put_file(str(local), f"{self.root}/{local.name}")
        local.unlink()

    def names(self) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)]
        except FileNotFoundError:
            return []

    def remove(self, name: str) -> None:
        path = f"{self.root}/{name}"
        if self.fs.exists(path):
            self.fs.rm(path)

    def put(self, name: str, text: str) -> None:
        local = self.staging / name
        local.write_text(text, encoding="utf-8")
        self.publish(local)

    def close(self) -> None:
        self._tmp.cleanup()


def _remove_stale(out, prefix: str, keep: set[str]) -> list[str]:
    """Deletes PREFIX-NNNNNN.tar(.tmp) files an earlier run left beyond this one's:
    a loader listing the directory would read them."""
    ours = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar(\.tmp)?")
    stale = sorted(n for n in out.names() if ours.fullmatch(n) and n not in keep)
    for name in stale:
        out.remove(name)
    return stale


@dataclass
class WriteReport:
    index: dict
    rejected: dict[str, int]  # reason -> samples, sorted by reason
    stale_removed: list[str]  # shard names an earlier run left, now deleted


def check_limits(*, max_samples: int, max_bytes: int, workers: int) -> None:
    for name, value, least in (
        ("max samples per shard", max_samples, 1),
        ("max bytes per shard", max_bytes, 1),
        ("workers", workers, 0),
    ):
        if value < least:
            raise ValueError(f"{name} must be at least {least}, got {value}")


def write_dataset(
    samples: Iterable[RawSample],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_samples: int = 1000,
    max_bytes: int = 1 << 30,
    encode: EncodeOptions = EncodeOptions(),
    workers: int = 0,
    total: int | None = None,
) -> WriteReport:
    """Writes PREFIX-%06d.tar shards, rejects.jsonl and index.json to out_dir:
    a local directory, or an object-store prefix (s3://bucket/shards, gs://,
    az://), where the index is uploaded last."""
    from data_pipeline.sources import OBJECT_STORES

    check_limits(max_samples=max_samples, max_bytes=max_bytes, workers=workers)
    target = str(out_dir)
    out = _ObjectStoreDir(target) if target.startswith(OBJECT_STORES) else _LocalDir(target)
    try:
        # An earlier run's index would promise sample counts that the new shards break.
        out.remove(INDEX_NAME)
        rejected: Counter[str] = Counter()
        rejects_file = out.staging / REJECTS_NAME
        seen: set[str] = set()
        with (
            closing(_ShardSink(out.staging, prefix, max_samples, max_bytes, publish=out.publish)) as sink,
            open(rejects_file, "w", encoding="utf-8") as rejects,
            tqdm(total=total, desc=f"writing {out.name}", unit="sample") as bar,
        ):
            for result in _prepare_all(samples, encode, workers):
                if isinstance(result, Prepared) and result.key in seen:
                    result = Reject(
                        result.key, "duplicate_key", f"an earlier sample has key {result.key!r}", result.source
                    )
                if isinstance(result, Reject):
                    rejects.write(json.dumps(asdict(result), ensure_ascii=False) + "\n")
                    rejected[result.reason] += 1
                    bar.set_postfix(rejected=sum(rejected.values()), refresh=False)
                else:
                    seen.add(result.key)
                    sink.write(result.key, result.members)
                bar.update()
        if out.publish is not None:
            out.publish(rejects_file)
        index = {"shards": sink.shards, "samples": sum(s["samples"] for s in sink.shards)}
        stale = _remove_stale(out, prefix, {s["name"] for s in sink.shards})
        out.put(INDEX_NAME, json.dumps(index, indent=1) + "\n")
    finally:
        out.close()
    return WriteReport(index, dict(sorted(rejected.items())), stale)


def write_shards(samples: Iterable[RawSample], out_dir: str | Path, **options) -> dict:
    """write_dataset() with the same keyword options, returning only the index."""
    return write_dataset(samples, out_dir, **options).index
